"""quest: training-free chunk selection by per-chunk min/max keys over raw chunks, no gists
(the inference-time sparse baseline; gsa_rag.eval.quest holds its layout and attention state).

Same chunks, k and k policy as `gsa` at the same options, so the same token budget.
"""

from dataclasses import dataclass

from gsa_rag.config import GistConfig
from gsa_rag.eval.methods.base import Method, RunContext
from gsa_rag.eval.quest import QuestPlan, quest_layout
from gsa_rag.prompt import build_segments


@dataclass
class Quest(Method):
    name = "quest"
    selects = True
    chunk: int = 8  # raw tokens per chunk ("page")
    k: int = 4  # chunks per query head before the budget top-up
    policy: str = "fixed"  # "fixed" or "adaptive"
    ratio: float = 8.0  # adaptive k aims at context_length / ratio raw tokens per KV head

    def __post_init__(self) -> None:
        if self.policy not in ("fixed", "adaptive"):
            raise ValueError(f"quest policy must be 'fixed' or 'adaptive', got {self.policy!r}")

    @property
    def label(self) -> str:
        k = f"top-{self.k}" if self.policy == "fixed" else "adaptive k"
        return f"Quest {self.chunk}-token chunks, {k}"

    def gist_config(self, ctx: RunContext | None) -> GistConfig:
        # the trained model's sink, local window and word cuts, as the gist methods take them: a
        # Quest row and a GSA row then differ only in how the chunks are chosen. first_selecting_layer
        # 0: Quest's keys are raw, so layer 0 can select as well
        trained = ctx.trained if ctx is not None and ctx.trained is not None else GistConfig()
        return GistConfig(chunk_size=self.chunk, top_k=self.k, k_policy=self.policy, adaptive_ratio=self.ratio,
                          first_selecting_layer=0, sink=trained.sink, num_previous_chunks=trained.num_previous_chunks,
                          word_aware=trained.word_aware)

    def layout(self, engine, questions, passages):
        segments = [build_segments(engine.tokenizer, q, p) for q, p in zip(questions, passages, strict=True)]
        return quest_layout(segments, engine.config, engine.tokenizer, device=engine.device)

    def state_factory(self, config: GistConfig):
        return QuestPlan(config, first_selecting_layer=0).state  # a fresh plan (bounds cache) per batch

    def compression_ratio(self) -> float:
        return float(self.chunk)
