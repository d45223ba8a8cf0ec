"""gsa: Gist Sparse Attention — gists after every chunk, the question unfolds the chunks its
heads select (fixed top-k, adaptive k, or top-p).

H-GSA (gist-of-gist): `meta` names the gists per <mgist> of each level above the first, e.g.
"gsa:chunk=8:meta=4" (32x, two levels) or "gsa:chunk=8:meta=4x4" (three levels; "x", not ",",
which separates methods in benchmarks/rag_eval.py --methods); selection runs coarse to fine.
"""

import math
from dataclasses import dataclass

from gsa_rag.config import GistConfig
from gsa_rag.eval.methods.base import Method, RunContext


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
        if self.meta_chunks:
            sizes = ",".join(str(n) for n in (self.chunk, *self.meta_chunks))
            return f"H-GSA {self.compression_ratio():.0f}x ({sizes}), {k}"
        return f"GSA {self.chunk}x, {k}"

    def gist_config(self, ctx: RunContext) -> GistConfig:
        return GistConfig(chunk_size=self.chunk, top_k=self.k, k_policy=self.policy, top_p=self.p,
                          adaptive_ratio=self.ratio, meta_chunks=self.meta_chunks)

    def compression_ratio(self) -> float:
        return float(math.prod((self.chunk, *self.meta_chunks)))
