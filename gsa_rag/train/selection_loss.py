"""Auxiliary selection loss: teach the question's queries to score gold chunks' gists highest.

    gsa-rag train sft --data nq/train.jsonl --init-adapter runs/cpt8 --output runs/sft8-sel --selection-loss 1.0

Why. Top-k is hard: the answer loss reaches the selection only through attention over what
top-k chose, never through the choice itself. After CPT+SFT the 8x adapter's question heads
unfold a gold chunk *less* often than chance (NQ 42% vs 49%; README, "What the run shows"):
nothing taught them to score gists by content. This loss gives the scores a direct signal.

What. In every selecting layer (>= `config.first_selecting_layer`), for the query rows chosen
by `rows` (below), the raw gist scores q . k_gist — `gsa_rag.selection.gist_scores` on the
layer's very query and key, read through the `GistState` hook, so they are exactly the scores
selection ranks — are turned into a listwise cross-entropy:

    p = softmax(scores / sqrt(D)) over the eligible chunks
    target "any" (default): loss = - log (sum over gold chunks g of p_g)
    target "all":           loss = - mean over gold chunks g of log p_g   (uniform over gold chunks)

per query head and row, averaged over heads, rows and layers, then over the examples that have
a gold chunk. "any" asks for what top-k needs: that the gold passage's mass beats the rest, met by
its best chunks alone. "all" also demands mass on every gold chunk, including those that say
nothing about the question; on the H200 (round 2, benchmarks/results/h200_round2) it sat at the
uniform distribution's value (~ln of the eligible count) after 232 steps, and gold recall stayed
below chance. Eligible chunks are those selection may choose that the question does not see
anyway: every closed chunk but the last `num_previous_chunks` (the local window; the same rule
as `gsa_rag.eval.harness.gold_selection`). Gold chunks are the eligible chunks holding raw tokens
of a passage marked `is_gold` in the training file. With H-GSA the same loss runs at every level
coarse-to-fine selection passes through, and the loss is their mean: level 0 over the chunk
gists as above, level l over the level-l (meta-)gists, where a section is eligible when it
holds an eligible chunk and gold when it holds a gold one (`selection.lift_units`). The coarse
levels are where H-GSA's selection failed on the H200: its sections picked gold less often than
chance (README, round 3).

Rows. "last" (default): the prompt's last token, the row that predicts the first answer token —
the prefill row whose selection `gold_selection` measures and the one that decides what the
answer starts from. "tail": every tail row (question, assistant header and answer tokens; every
row that selects during prefill and decoding).

The loss is per example (no statistic across the batch or processes), so DDP averages its
gradients like the answer loss's. Under gradient checkpointing the hook runs again during
recomputation (so the checkpoint sees the same saved tensors) but records only the first forward.
"""

from __future__ import annotations

import math

import torch

from gsa_rag.selection import eligible_chunk_mask, gist_scores, gold_chunk_mask, lift_units  # noqa: F401 (re-exported)

ROWS = ("last", "tail")
TARGETS = ("any", "all")


def query_rows(layout, prompt_end: torch.Tensor, rows: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The query rows whose gist scores enter the loss.

    Args:
        prompt_end: long [B], column of each row's last prompt token.
        rows: "last" or "tail" (see the module docstring).

    Returns:
        (long [B, R] columns, bool [B, R] which are real rows).
    """
    if rows == "last":
        cols = prompt_end[:, None]
        return cols, layout.is_tail.gather(1, cols)
    if rows == "tail":
        T = layout.seq_len
        R = max(1, int(layout.is_tail.sum(-1).max()))  # the tail is a suffix of every (left-padded) row
        cols = torch.arange(T - R, T, device=prompt_end.device)[None].expand(layout.batch_size, -1)
        return cols, layout.is_tail[:, T - R :]
    raise ValueError(f"selection-loss rows must be one of {ROWS}, got {rows!r}")


class ScoreCollector:
    """A `GistState.hook` that records, per selecting layer, the gist scores of the loss rows.

    Attributes:
        scores: layer -> float32 [B, Hq, R, C], `gist_scores` of the rows (graph attached).
        section_scores: H-GSA only: level l >= 1 -> layer -> float32 [B, Hq, R, N_l], the scores of
            the level-l gists (GistLayout.units).
        calls: how many times the attention path called the hook while recording.
        head_dim: D, the queries' head dimension (the softmax temperature is 1 / sqrt(D)).
        recording: set False after the forward (checkpoint recomputation must not record again).
    """

    reads_mask = False  # the attention function then skips materialising the per-head mask for it

    def __init__(self, layout, cols: torch.Tensor, first_selecting_layer: int):
        self.layout = layout
        self.cols = cols
        self.first_selecting_layer = first_selecting_layer
        self.scores: dict[int, torch.Tensor] = {}
        self.section_scores: dict[int, dict[int, torch.Tensor]] = {level: {} for level in range(1, layout.levels)}
        self.calls = 0
        self.head_dim = 1
        self.recording = True

    def __call__(self, layer_idx: int, query, key, value, mask) -> None:
        if self.recording:
            self.calls += 1
        if layer_idx < self.first_selecting_layer:
            return
        B, Hq, _, D = query.shape
        self.head_dim = D
        rows = torch.gather(query, 2, self.cols[:, None, :, None].expand(B, Hq, -1, D))
        # the function selection ranks with, on the same query rows and key cache
        scores = gist_scores(rows, key, self.layout.gist_index, self.layout.gist_valid)
        if self.recording:
            self.scores[layer_idx] = scores
            for level, by_layer in self.section_scores.items():
                by_layer[layer_idx] = gist_scores(rows, key, *self.layout.units(level))


def listwise_loss(scores: dict[int, torch.Tensor], gold: torch.Tensor, eligible: torch.Tensor,
                  row_valid: torch.Tensor, head_dim: int, target: str = "any") -> torch.Tensor:
    """Listwise loss of softmax(scores / sqrt(D)) over eligible chunks: minus the log of the gold
    chunks' total probability ("any") or cross-entropy against uniform-over-gold ("all").

    Args:
        scores: layer -> float [B, Hq, R, C] raw gist scores (-inf for missing chunks).
        gold, eligible: bool [B, C] (gold chunks outside `eligible` are ignored).
        row_valid: bool [B, R], rows that count.
        head_dim: D.
        target: "any" or "all" (see the module docstring).

    Returns:
        A scalar: mean over heads, valid rows and layers per example, then over the examples
        with at least one eligible gold chunk; 0 (no graph) when there are none.
    """
    if target not in TARGETS:
        raise ValueError(f"selection-loss target must be one of {TARGETS}, got {target!r}")
    gold = gold & eligible
    has = gold.any(-1) & row_valid.any(-1)  # [B]
    device = gold.device
    if not scores or not bool(has.any()):
        return torch.zeros((), device=device)
    weights = gold.float() / gold.sum(-1, keepdim=True).clamp(min=1)  # [B, C]: uniform over gold
    rows = row_valid.float()
    per_layer = []
    for layer in sorted(scores):
        logits = (scores[layer] / math.sqrt(head_dim)).masked_fill(~eligible[:, None, None, :], float("-inf"))
        logits = torch.where(has[:, None, None, None], logits, 0.0)  # rows with nothing to learn: finite
        logp = torch.log_softmax(logits, dim=-1)
        if target == "any":
            # rows with nothing to learn sum over every column instead of none, so no value is -inf
            # and the gradient behind the torch.where does not hinge on how logsumexp treats -inf rows
            pick = (gold | ~has[:, None])[:, None, None, :]
            ce = torch.where(has[:, None, None], -torch.logsumexp(logp.masked_fill(~pick, float("-inf")), dim=-1), 0.0)
        else:
            ce = -(torch.where(gold[:, None, None, :], logp, 0.0) * weights[:, None, None, :]).sum(-1)  # [B, Hq, R]
        per_row = ce.mean(1)  # over heads -> [B, R]
        per_layer.append((per_row * rows).sum(-1) / rows.sum(-1).clamp(min=1))  # [B]
    per_example = torch.stack(per_layer).mean(0)
    return per_example[has].mean()


def collected_loss(collector: ScoreCollector, gold: torch.Tensor, eligible: torch.Tensor, row_valid: torch.Tensor,
                   target: str = "any") -> torch.Tensor:
    """`listwise_loss` at every gist level the collector scored, averaged: the chunks, and with
    H-GSA each level of sections (gold / eligible: the sections holding a gold / eligible chunk).

    Args:
        gold, eligible: bool [B, C] over the chunks; row_valid: bool [B, R].
    """
    losses = [listwise_loss(collector.scores, gold, eligible, row_valid, collector.head_dim, target)]
    gold = gold & eligible
    for level in sorted(collector.section_scores):
        gold, eligible = lift_units(collector.layout, gold, level), lift_units(collector.layout, eligible, level)
        losses.append(listwise_loss(collector.section_scores[level], gold, eligible, row_valid, collector.head_dim,
                                    target))
    return torch.stack(losses).mean()
