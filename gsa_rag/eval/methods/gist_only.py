"""gist-only: gists inserted, nothing unfolded (the compression-only baseline).

Every layer keeps the forgetting mask for the question too (first_selecting_layer = number of
layers), so the question sees the sink, all gists, the last context chunk and itself. Single
level (compression = chunk); sink, window and the other layout fields as in `gsa`: the trained
ones unless named.
"""

from dataclasses import dataclass

from gsa_rag.config import GistConfig
from gsa_rag.eval.methods.base import (
    TRAINED,
    Method,
    RunContext,
    layout_label,
    over_trained,
)


@dataclass
class GistOnly(Method):
    name = "gist-only"
    chunk: int = 8
    sink: int = TRAINED  # as gsa's
    window: int = TRAINED

    @property
    def label(self) -> str:
        return f"gist-only {self.chunk}x (no unfolding){layout_label(self.sink, self.window)}"

    def gist_config(self, ctx: RunContext) -> GistConfig:
        # no hierarchy whatever the model was trained with: section_top_k needs one
        return over_trained(ctx, sink=self.sink, window=self.window, chunk_size=self.chunk, meta_chunks=(),
                            section_top_k=None, first_selecting_layer=ctx.num_layers)

    def compression_ratio(self) -> float:
        return float(self.chunk)
