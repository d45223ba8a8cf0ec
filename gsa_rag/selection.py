"""Recall: score the gist keys, choose chunks per query head, union over each GQA group.

Torch reference; kernels/ holds the fast path. Shapes: B batch, Hq query heads, Hkv KV heads
(G = Hq // Hkv query heads share one), Tq query rows, C chunks, D head dim.

With the hierarchy (H-GSA) `select_hierarchical` runs the same scoring and top-k coarse to
fine: the top-level gists, then only the children of what was chosen, down to the chunks
(`select_coarse_to_fine` is the same walk over gists given by key columns and parent maps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gsa_rag.config import GistConfig
from gsa_rag.kernels.gist_keys8 import Int8GistKeys, quantize_gist_keys, scaled_query
from gsa_rag.layout import GistLayout


def gist_scores(query: torch.Tensor, key: torch.Tensor, gist_index: torch.Tensor, gist_valid: torch.Tensor) -> torch.Tensor:
    """Raw dot products q . k_gist (no scale, no softmax), -inf for missing chunks.

    Args:
        query: [B, Hq, Tq, D].
        key: [B, Hkv, T, D], the whole key cache of the layer.
        gist_index: long [B, C], column of each chunk's gist.
        gist_valid: bool [B, C].

    Returns:
        float32 [B, Hq, Tq, C].
    """
    B, Hkv, _, D = key.shape
    return _gist_scores(query, key, gist_index[:, None, :, None].expand(B, Hkv, -1, D), ~gist_valid[:, None, None, :])


def _gist_scores(query: torch.Tensor, key: torch.Tensor, gather_index: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """`gist_scores` from its per-forward parts: gather_index long [B, Hkv, C, D] (the gist
    columns, expanded over heads and dims), missing bool [B, 1, 1, C]."""
    return _grouped_scores(query, torch.gather(key, 2, gather_index), missing)


def int8_gist_scores(query: torch.Tensor, keys: Int8GistKeys, gist_valid: torch.Tensor) -> torch.Tensor:
    """`gist_scores` over the int8 copy of the gist keys (`GistConfig.score_dtype` "int8";
    gsa_rag.kernels.gist_keys8): the query times its KV head's channel scales, rounded to its
    dtype as the kernels round it, against the int8 values.

    Args:
        query: [B, Hq, Tq, D]; keys: the layer's `Int8GistKeys`; gist_valid: bool [B, C].

    Returns:
        float32 [B, Hq, Tq, C], -inf for missing chunks.
    """
    return _grouped_scores(scaled_query(query, keys), keys.values, ~gist_valid[:, None, None, :])


def _grouped_scores(query: torch.Tensor, gist_keys: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """query [B, Hq, Tq, D] against gist_keys [B, Hkv, C, D] -> float32 [B, Hq, Tq, C], -inf where
    missing (bool [B, 1, 1, C])."""
    B, Hkv = gist_keys.shape[:2]
    Hq, Tq = query.shape[1:3]
    # query head h reads KV head h // G: the G heads of a group share one matmul over their rows,
    # so the gist keys are never repeated per query head
    rows = query.float().reshape(B, Hkv, (Hq // Hkv) * Tq, -1)
    scores = torch.matmul(rows, gist_keys.float().transpose(-1, -2)).view(B, Hq, Tq, -1)
    return scores.masked_fill(missing, float("-inf"))


def adaptive_k(context_len: torch.Tensor, num_chunks: torch.Tensor, group_size: int, config: GistConfig) -> torch.Tensor:
    """k = floor(L / (ratio * G * chunk)) + 1, capped at max(1, num_chunks // 4).

    L is the context length in tokens. Each of the G heads of a group picks k chunks and the
    group attends to their union, so a group unfolds about L / ratio raw tokens.
    """
    k = torch.div(context_len, config.adaptive_ratio * group_size * config.chunk_size, rounding_mode="floor").long() + 1
    return torch.minimum(k, torch.clamp(num_chunks // 4, min=1))


def choose_chunks(scores: torch.Tensor, k: torch.Tensor | None = None, top_p: float | None = None, scale: float = 1.0) -> torch.Tensor:
    """Per query head: top-k (k per batch row) or top-p over softmax(scale * scores).

    Args:
        scores: float [B, Hq, Tq, C], -inf for missing chunks.
        k: long [B], chunks per head (clamped to the chunks that exist).
        top_p: keep the smallest set of chunks whose softmax mass reaches top_p.
        scale: softmax temperature for top_p (1/sqrt(D), as attention would use).

    Returns:
        bool [B, Hq, Tq, C]; never selects a missing chunk.
    """
    if top_p is None:
        return _top_k(scores, _rank_kept(k, scores.shape[-1]))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    sorted_scores = scores.gather(-1, order)
    mass = torch.softmax(sorted_scores * scale, dim=-1).nan_to_num(0.0)
    before = mass.cumsum(-1) - mass  # mass of the better chunks
    keep = (before < top_p) & torch.isfinite(sorted_scores)
    return torch.zeros_like(keep).scatter(-1, order, keep)


def _rank_kept(k: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """long [B] k -> bool [B, 1, 1, C]: rank < k (`_top_k`'s cut)."""
    return torch.arange(num_chunks, device=k.device) < k.view(-1, 1, 1, 1)


def _top_k(scores: torch.Tensor, rank_kept: torch.Tensor) -> torch.Tensor:
    """`choose_chunks` top-k, given rank_kept bool [B, 1, 1, C] = (rank < k) (per forward)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    keep = rank_kept & torch.isfinite(scores.gather(-1, order))
    return torch.zeros_like(keep).scatter(-1, order, keep)


def union_over_groups(chosen: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, Tq, C] -> [B, Hkv, Tq, C]: a KV head unfolds what any of its query heads chose."""
    B, Hq, Tq, C = chosen.shape
    return chosen.view(B, num_kv_heads, Hq // num_kv_heads, Tq, C).any(dim=2)


def select_chunks(
    query: torch.Tensor,
    key: torch.Tensor,
    gist_index: torch.Tensor,
    gist_valid: torch.Tensor,
    context_len: torch.Tensor,
    config: GistConfig,
) -> torch.Tensor:
    """Chunks each KV head unfolds for each query row, under the config's k policy.

    Args:
        query: [B, Hq, Tq, D] (RoPE applied).
        key: [B, Hkv, T, D] (RoPE applied).
        gist_index, gist_valid: [B, C], see GistLayout.
        context_len: long [B], tokens before the tail (for adaptive k).
        config: k policy.

    Returns:
        bool [B, Hkv, Tq, C].
    """
    return ChunkSelector(gist_index, gist_valid, context_len, config)(query, key)


class ChunkSelector:
    """`select_chunks` for every layer of one forward: what is the same in every layer (k, the
    rank cut, the gathered gist columns, the missing chunks) is worked out once, at the first
    layer (the heads and head dim come with its query and key), so a layer runs only its own
    scores, sort and union: the engine's question forward runs this in each of its layers."""

    def __init__(self, gist_index: torch.Tensor, gist_valid: torch.Tensor, context_len: torch.Tensor, config: GistConfig):
        self.gist_index, self.gist_valid, self.context_len, self.config = gist_index, gist_valid, context_len, config
        self._parts: tuple | None = None  # (heads and head dim, gather index, missing, rank cut)

    def chunks_per_head(self, group_size: int) -> torch.Tensor:
        """long [B], the k that each query head picks under the config's top-k policy (fixed
        top_k, or adaptive k for this GQA group size); not for top_p."""
        num_chunks = self.gist_valid.sum(-1)
        if self.config.k_policy == "adaptive":
            return adaptive_k(self.context_len, num_chunks, group_size, self.config)
        return torch.full_like(num_chunks, self.config.top_k)

    def _prepare(self, query: torch.Tensor, key: torch.Tensor) -> tuple:
        B, Hkv, _, D = key.shape
        shape = (query.shape[1], Hkv, D)
        if self._parts is None or self._parts[0] != shape:
            rank_kept = None
            if self.config.k_policy != "top_p":
                rank_kept = _rank_kept(self.chunks_per_head(query.shape[1] // Hkv), self.gist_index.shape[1])
            gather_index = self.gist_index[:, None, :, None].expand(B, Hkv, -1, D)
            self._parts = (shape, gather_index, ~self.gist_valid[:, None, None, :], rank_kept)
        return self._parts

    def __call__(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """query [B, Hq, Tq, D], key [B, Hkv, T, D] -> bool [B, Hkv, Tq, C]."""
        _, gather_index, missing, rank_kept = self._prepare(query, key)
        if self.config.score_dtype == "int8":
            scores = int8_gist_scores(query, quantize_gist_keys(key, self.gist_index, self.gist_valid), self.gist_valid)
        else:
            scores = _gist_scores(query, key, gather_index, missing)
        if rank_kept is None:
            chosen = choose_chunks(scores, top_p=self.config.top_p, scale=1.0 / math.sqrt(query.shape[-1]))
        else:
            chosen = _top_k(scores, rank_kept)
        return union_over_groups(chosen, key.shape[1])


@dataclass
class HierarchicalSelection:
    """What coarse-to-fine selection chose and what it had to read, per gist level.

    Attributes:
        chosen: per level l = 0..L-1, bool [B, Hkv, Tq, N_l]: the units (chunks for l = 0,
            level-l sections above) a KV head unfolds.
        scored: per level, bool [B, Hkv, Tq, N_l]: the units whose gist keys were scored (all
            top-level ones; below, the children of the sections chosen one level up).
    """

    chosen: list[torch.Tensor]
    scored: list[torch.Tensor]

    @property
    def chunks(self) -> torch.Tensor:
        """bool [B, Hkv, Tq, C], the chunks to unfold (dense_unfold_mask's `selected`)."""
        return self.chosen[0]

    @property
    def sections(self) -> list[torch.Tensor]:
        """Levels 1..L-1 of `chosen` (dense_unfold_mask's `sections`)."""
        return self.chosen[1:]


def _choose_among(scores: torch.Tensor, candidates: torch.Tensor, k: int, config: GistConfig, head_dim: int) -> torch.Tensor:
    """Per query head, top-k (or top-p) among the candidate units only.

    Args:
        scores: float [B, Hq, Tq, N]; candidates: bool [B, Hkv, Tq, N] (the GQA group's set).

    Returns:
        bool [B, Hkv, Tq, N], the union over each group of what its heads chose.
    """
    B, Hq = scores.shape[:2]
    Hkv = candidates.shape[1]
    allowed = candidates.repeat_interleave(Hq // Hkv, dim=1)
    scores = scores.masked_fill(~allowed, float("-inf"))  # never a unit outside the chosen sections
    if config.k_policy == "top_p":
        chosen = choose_chunks(scores, top_p=config.top_p, scale=1.0 / math.sqrt(head_dim))
    else:
        chosen = choose_chunks(scores, k=torch.full((B,), k, dtype=torch.long, device=scores.device))
    return union_over_groups(chosen, Hkv)


def select_hierarchical(query: torch.Tensor, key: torch.Tensor, layout: GistLayout, config: GistConfig) -> HierarchicalSelection:
    """Coarse to fine (H-GSA): the k best top-level gists, then the k best among the children of
    the chosen sections, level by level down to the chunks (k = `GistConfig.level_top_k`: top_k
    for the chunks, section_top_k, default top_k, for the sections; or top_p at every level).
    Each level takes the union over the query heads of a KV head before going down, so a KV
    head reads about k * G * (children per section) gists per level instead of every gist.

    Args:
        query: [B, Hq, Tq, D] (RoPE applied).
        key: [B, Hkv, T, D] (RoPE applied), the whole key cache of the layer.
        layout: a hierarchical layout (`units` and `parents` give each level's gists).
        config: k policy ("fixed" or "top_p").

    Returns:
        HierarchicalSelection with L levels.
    """
    units = [layout.units(level) for level in range(layout.levels)]
    parents = [layout.parents(level) for level in range(layout.levels - 1)]
    return select_coarse_to_fine(query, key, units, parents, config)


def select_coarse_to_fine(
    query: torch.Tensor,
    key: torch.Tensor,
    units: list[tuple[torch.Tensor, torch.Tensor]],
    parents: list[torch.Tensor],
    config: GistConfig,
) -> HierarchicalSelection:
    """`select_hierarchical` over gists named by their key columns and parent maps instead of a
    layout: gist memory's search runs it over passages' gist keys taken out of any prompt.

    Args:
        query: [B, Hq, Tq, D] (RoPE applied).
        key: [B, Hkv, T, D] (RoPE applied), holding every gist `units` names.
        units: per level l = 0..L-1, (long [B, N_l] key column of each unit's gist, bool
            [B, N_l] which units exist), as `GistLayout.units`.
        parents: per level l = 0..L-2, long [B, N_l], the level-(l+1) section of each unit (as
            `GistLayout.parents`; anything where the unit does not exist).
        config: k policy ("fixed" or "top_p").

    Returns:
        HierarchicalSelection with L levels.
    """
    B, Hkv, Tq = query.shape[0], key.shape[1], query.shape[2]
    top = len(units) - 1
    _, valid = units[top]
    candidates = valid[:, None, None, :].expand(B, Hkv, Tq, -1)  # every top-level gist is scored
    chosen, scored = [None] * len(units), [None] * len(units)
    for level in range(top, -1, -1):
        index, valid = units[level]
        # the reference scores every gist of the level and masks; a kernel reads only candidates
        scores = gist_scores(query, key, index, valid)
        scored[level] = candidates
        chosen[level] = _choose_among(scores, candidates, config.level_top_k(level), config, query.shape[-1])
        if level > 0:  # the children of the chosen sections are the next level's candidates
            _, child_valid = units[level - 1]
            candidates = _children(chosen[level], parents[level - 1]) & child_valid[:, None, None, :]
    return HierarchicalSelection(chosen, scored)


def _children(chosen: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """bool [B, Hkv, Tq, S] chosen sections, long [B, N] parent section of each child ->
    bool [B, Hkv, Tq, N]: children whose parent was chosen."""
    B, Hkv, Tq, S = chosen.shape
    index = parent.clamp(0, S - 1)[:, None, None, :].expand(B, Hkv, Tq, -1)
    return torch.gather(chosen, 3, index)


# --------------------------------------------------------------------------------------------
# which chunks are eligible, which hold gold passages (selection loss, gold-selection metrics)


def gold_chunk_mask(layout, gold: list[frozenset[int] | set[int] | None]) -> torch.Tensor:
    """bool [B, C]: the chunks holding raw tokens of each row's gold passages.

    Args:
        layout: the batch's layout (passage_id, chunk_id, is_gist, valid, num_chunks).
        gold: per row, the gold passages' numbers (0-based, prompt order; `Segment.passage_id`),
            empty or None where none is known.
    """
    B, C = layout.gist_index.shape
    out = torch.zeros(B, C, dtype=torch.bool, device=layout.chunk_id.device)
    for b, passages in enumerate(gold):
        if not passages:
            continue
        wanted = torch.tensor(sorted(passages), dtype=torch.long, device=layout.passage_id.device)
        chunk = layout.chunk_id[b]
        cols = (layout.valid[b] & ~layout.is_gist[b] & (chunk >= 0) & (chunk < layout.num_chunks[b])
                & torch.isin(layout.passage_id[b], wanted))
        out[b, chunk[cols].unique()] = True
    return out


def lift_units(layout, mask: torch.Tensor, level: int) -> torch.Tensor:
    """bool [B, N_(level-1)] over the units of level - 1 -> bool [B, N_level]: the level-`level`
    sections (of an H-GSA layout, see GistLayout.units) that hold at least one marked unit."""
    _, child_valid = layout.units(level - 1)
    _, valid = layout.units(level)
    parent = layout.parents(level - 1).clamp(0, max(0, valid.shape[1] - 1))
    marked = (mask & child_valid).long()
    out = torch.zeros(valid.shape, dtype=torch.long, device=valid.device).scatter_reduce(1, parent, marked, "amax")
    return (out > 0) & valid


def eligible_chunk_mask(layout, num_previous_chunks: int) -> torch.Tensor:
    """bool [B, C]: closed chunks outside the question's local window (the ones selection chooses among;
    the window's chunks are visible anyway)."""
    c = torch.arange(layout.gist_index.shape[1], device=layout.num_chunks.device)
    return c[None, :] < (layout.num_chunks - num_previous_chunks)[:, None]
