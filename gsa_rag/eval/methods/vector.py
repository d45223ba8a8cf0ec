"""vector: the classic RAG pipeline — a FAISS vector store over sentence-transformers embeddings
(LlamaIndex VectorStoreIndex, see gsa_rag.eval.retrieval), the top-k passages in full text,
full attention over them.

source "given" ranks each question's own passages (MiniLM re-ranking the given ten); "corpus"
retrieves from the pooled Wikipedia corpus (open domain). Retrieved passages go into the prompt
best first. Rankings are cached under the run's retrieval directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from gsa_rag.eval.data import Passage
from gsa_rag.eval.methods.base import Method, RunContext
from gsa_rag.eval.retrieval import (
    CORPUS_DEPTH,
    DEFAULT_EMBEDDER,
    RetrievalCache,
    VectorRetriever,
    rank_given,
    search_corpus,
)


@dataclass
class Vector(Method):
    name = "vector"
    k: int = 5  # passages kept
    source: str = "given"  # "given" (rank the question's passages) or "corpus" (open domain)
    embed: str = ""  # a local sentence-transformers directory; "" (or "all-MiniLM-L6-v2"): the bundled MiniLM
    _picked: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.source not in ("given", "corpus"):
            raise ValueError(f"vector source must be 'given' or 'corpus', got {self.source!r}")
        if self.k < 1:
            raise ValueError(f"vector k must be >= 1, got {self.k}")

    @property
    def label(self) -> str:
        where = "of the given passages" if self.source == "given" else "from the corpus"
        return f"vector top-{self.k} {where}"

    def options(self) -> dict:
        return {"k": self.k, "source": self.source, "embed": self.embed or DEFAULT_EMBEDDER}

    @property
    def embedder(self) -> str:
        return self.embed or DEFAULT_EMBEDDER

    def setup(self, examples, ctx: RunContext) -> None:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.embedder).name)
        cache = RetrievalCache(Path(ctx.retrieval_dir) / f"{ctx.data}.{self.source}.{slug}.json", self.embedder,
                               self.source)

        def make_retriever() -> VectorRetriever:
            return VectorRetriever(None if self.embedder == DEFAULT_EMBEDDER else self.embed, device=ctx.embed_device)

        if self.source == "given":
            ranking = rank_given(examples, cache, make_retriever)
            self._picked = {ex.id: [ex.passages[i] for i in ranking[ex.id][: self.k]] for ex in examples}
        else:
            corpus = ctx.load_corpus()
            by_id = {p.id: p for p in corpus}
            found = search_corpus(examples, max(self.k, CORPUS_DEPTH), cache, corpus, make_retriever)
            self._picked = {ex.id: [_as_passage(by_id[pid], ex) for pid, _ in found[ex.id][: self.k]]
                            for ex in examples}

    def passages(self, example) -> list:
        if example.id not in self._picked:
            raise RuntimeError("vector.setup() has not seen this example")
        return self._picked[example.id]

    def extra(self, example) -> dict:
        picked = self._picked[example.id]
        # as the selecting methods' gold recall: only questions that have a gold passage count
        # (TriviaQA marks every passage of most questions not gold)
        has_gold = any(p.is_gold for p in example.passages)
        return {"retrieved": [p.title for p in picked],
                "gold_retrieved": any(bool(p.is_gold) for p in picked) if has_gold else None}


def _as_passage(hit, example) -> Passage:
    """A CorpusPassage as a Passage; gold when it is one of the example's gold passages."""
    gold_texts = {p.text for p in example.passages if p.is_gold}
    known = any(p.is_gold is not None for p in example.passages)
    return Passage(title=hit.title, text=hit.text, is_gold=(hit.text in gold_texts) if known else None)
