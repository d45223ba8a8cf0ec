"""gist-only: gists inserted, nothing unfolded (the compression-only baseline).

Every layer keeps the forgetting mask for the question too (first_selecting_layer = number of
layers), so the question sees the sink, all gists, the last context chunk and itself.
"""

from dataclasses import dataclass

from gsa_rag.config import GistConfig
from gsa_rag.eval.methods.base import Method, RunContext


@dataclass
class GistOnly(Method):
    name = "gist-only"
    chunk: int = 8

    @property
    def label(self) -> str:
        return f"gist-only {self.chunk}x (no unfolding)"

    def gist_config(self, ctx: RunContext) -> GistConfig:
        return GistConfig(chunk_size=self.chunk, first_selecting_layer=ctx.num_layers)

    def compression_ratio(self) -> float:
        return float(self.chunk)
