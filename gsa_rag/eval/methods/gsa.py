"""gsa: Gist Sparse Attention — gists after every chunk, the question unfolds the chunks its
heads select (fixed top-k, adaptive k, or top-p)."""

from dataclasses import dataclass

from gsa_rag.config import GistConfig
from gsa_rag.eval.methods.base import Method, RunContext


@dataclass
class GSA(Method):
    name = "gsa"
    selects = True
    chunk: int = 8  # raw tokens per gist
    k: int = 4  # chunks per query head (policy "fixed")
    policy: str = "fixed"  # "fixed", "adaptive" or "top_p"
    p: float = 0.9  # mass for policy "top_p"
    ratio: float = 8.0  # adaptive k aims at context_length / ratio raw tokens per KV head

    @property
    def label(self) -> str:
        k = {"fixed": f"top-{self.k}", "adaptive": "adaptive k", "top_p": f"top-p {self.p}"}.get(self.policy, self.policy)
        return f"GSA {self.chunk}x, {k}"

    def gist_config(self, ctx: RunContext) -> GistConfig:
        return GistConfig(chunk_size=self.chunk, top_k=self.k, k_policy=self.policy, top_p=self.p,
                          adaptive_ratio=self.ratio)

    def compression_ratio(self) -> float:
        return float(self.chunk)
