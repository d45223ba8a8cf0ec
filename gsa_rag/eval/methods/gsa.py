"""gsa: Gist Sparse Attention — gists after every chunk, the question unfolds the chunks its
heads select (fixed top-k, adaptive k, or top-p). `reuse=1`: KV reuse, answers from one gist memory
shared by the run, one question at a time; each passage encoded once, alone, shown unnumbered
with link tokens after it; otherwise the plain prompt (details below).

H-GSA (gist-of-gist): `meta` names the gists per <mgist> of each level above the first, e.g.
"gsa:chunk=8:meta=4" (32x, two levels) or "gsa:chunk=8:meta=4x4" (three levels; "x", not ",",
which separates methods in benchmarks/rag_eval.py --methods); selection runs coarse to fine,
`k` per level, or `sk` sections per head above the chunks ("gsa:chunk=8:meta=4:sk=8": a wider
beam, still k chunks unfolded).

`score=int8` scores an int8 copy of the gist keys (GistConfig.score_dtype; single level only).

Layout: the options set chunk size and hierarchy (defaults: 8, single level); every other
GistConfig field is the one the model was trained with (RunContext.trained), unless `sink` or
`window` (local window, num_previous_chunks) names another ("gsa:window=0").

KV reuse ("gsa:reuse=1", with any other option): one GistMemory (gsa_rag.memory) serves the whole
run; each passage is encoded once, alone, and its cached KV re-rotated to its place in every
prompt that uses it (gsa_rag.eval.reuse). The prompt is the plain method's (same system line,
template and question) except what reuse needs: passages are rendered without their number
("Document (Title: t) text", so a passage encodes the same wherever it lands), they do not attend
to each other, and the adapter's link tokens follow each one. Questions are answered one at a
time (a memory's cache holds one question). TTFT includes encoding the passages a question brings
that the memory does not hold yet (`encode_seconds` in the summary sums that part);
`budget_mb` caps the memory's KV (0: a quarter of the free GPU memory, 4 GiB on the CPU).
"""

import math
from dataclasses import dataclass, field

from gsa_rag.config import GistConfig
from gsa_rag.eval.methods.base import (
    TRAINED,
    Method,
    RunContext,
    layout_label,
    over_trained,
)
from gsa_rag.eval.reuse import ReuseMemory


@dataclass
class GSA(Method):
    name = "gsa"
    selects = True
    chunk: int = 8  # raw tokens per gist
    k: int = 4  # chunks per query head (policy "fixed"; every level with meta)
    policy: str = "fixed"  # "fixed", "adaptive" or "top_p"
    p: float = 0.9  # mass for policy "top_p"
    ratio: float = 8.0  # adaptive k aims at context_length / ratio raw tokens per KV head
    meta: str = ""  # H-GSA: gists per <mgist> per level above the first ("4", "4x4"); "" single level
    sk: int = 0  # H-GSA: sections per query head above the chunks (GistConfig.section_top_k); 0: k
    reuse: bool = False  # answer from one gist memory shared by the run (KV reuse)
    budget_mb: int = 0  # with reuse: the memory's KV budget in MiB; 0: automatic
    sink: int = TRAINED  # sink tokens; -1: the trained config's (as every field no option sets)
    window: int = TRAINED  # chunks a raw token sees before its own (num_previous_chunks); -1: the trained
    score: str = "cache"  # the gist keys scoring reads: "cache" or "int8" (GistConfig.score_dtype)
    _reuse: ReuseMemory | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.budget_mb and not self.reuse:
            raise ValueError("gsa option budget_mb is the gist memory's budget: it needs reuse=1")
        if self.sk < 0:
            raise ValueError(f"gsa option sk must be >= 0 (0: the same as k), got {self.sk}")
        if self.sk or self.score != "cache":  # GistConfig's rules (the beam; int8 single-level), at parse time
            self.gist_config(None)
        if self.budget_mb < 0:
            raise ValueError(f"gsa option budget_mb must be >= 0 (0: automatic), got {self.budget_mb}")

    @property
    def meta_chunks(self) -> tuple[int, ...]:
        """`meta` as GistConfig.meta_chunks ("4x4" -> (4, 4); "4,4" too, outside --methods lists)."""
        try:
            return tuple(int(x) for x in self.meta.replace("x", ",").split(",") if x.strip())
        except ValueError as error:
            raise ValueError(f"gsa option meta wants gists per <mgist> like 4 or 4x4, got {self.meta!r}") from error

    @property
    def label(self) -> str:
        k = {"fixed": f"top-{self.k}", "adaptive": "adaptive k", "top_p": f"top-p {self.p}"}.get(self.policy, self.policy)
        rest = layout_label(self.sink, self.window) + (", KV reuse" if self.reuse else "")
        rest += f", {self.score} scores" if self.score != "cache" else ""
        if self.meta_chunks:
            sizes = ",".join(str(n) for n in (self.chunk, *self.meta_chunks))
            beam = f", {self.sk} sections" if self.sk else ""
            return f"H-GSA {self.compression_ratio():.0f}x ({sizes}), {k}{beam}{rest}"
        return f"GSA {self.chunk}x, {k}{rest}"

    def gist_config(self, ctx: RunContext | None) -> GistConfig:
        return over_trained(ctx, sink=self.sink, window=self.window, chunk_size=self.chunk, top_k=self.k,
                            k_policy=self.policy, top_p=self.p, adaptive_ratio=self.ratio,
                            meta_chunks=self.meta_chunks, section_top_k=self.sk or None, score_dtype=self.score)

    def compression_ratio(self) -> float:
        return float(math.prod((self.chunk, *self.meta_chunks)))

    # --- KV reuse --------------------------------------------------------------------------

    def prepare(self, engine, questions, passages):
        if not self.reuse:
            return super().prepare(engine, questions, passages)
        if self._reuse is None:
            self._reuse = ReuseMemory(self.budget_mb)
        (question,), (shown,) = questions, passages  # batch_limit is 1
        return self._reuse.prepare(engine, question, shown)

    @property
    def batch_limit(self) -> int | None:
        return 1 if self.reuse else None

    def finish(self) -> dict:
        reuse, self._reuse = self._reuse, None  # the memory's KV goes before the next method runs
        return reuse.report() if reuse is not None else {}
