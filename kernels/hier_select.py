"""H-GSA decode step: coarse-to-fine selection and its key list, scoring only the candidates.

The decode query (one tail column q) of a hierarchical layout (L gist levels) sees, per KV head,
the columns of `gsa_rag.masks.dense_unfold_mask` for the sets `gsa_rag.selection.
select_hierarchical` chooses. As in gist_select.py that set splits into

    base           = visible(recall=False): sink, local window (its meta-gists included),
                     link tokens, the query; the same for every layer and head;
    extra_0(c)     = what a chosen chunk c adds: its raw tokens and level-0 gist (not in base);
    extra_l(s)     = what a chosen level-l section s adds (l >= 1): its closing gist (not in base),

so the list of KV head h is base ++ extra_{L-1}(chosen at L-1) ++ ... ++ extra_0(chosen chunks).
`HierPlan` holds every extra_l as CSR over units and, per section level, the children of each
section (a section's children are a contiguous range of the level below: sections, like
chunks, follow column order).

Per layer, level by level from the top (one host-sync-free pass, 3 launches a level):
    1. scores: the gist-scoring kernel of gist_select.py over the level's candidate list (every
       top-level gist; below, one list per (batch, KV head): the children of what that head
       chose one level up), so a step reads N_top + sum_l (units chosen at l+1) * c_l gist keys,
       not every level-0 gist;
    2. top-k + GQA union: the fused select kernel of gist_select.py over the candidate slots
       (its size table is the identity, so it writes a 0/1 union flag per slot; rows above
       TOPK_MAX_CHUNKS streamed); top-p goes through the torch reference `choose_chunks`;
    3. unfold (`_unfold_kernel`, here): one program per (batch, KV head) walks its slots in
       order, appends the extra columns of the chosen units to the key list (after what the
       levels above wrote) and writes their children, with their gist columns, as the next
       level's candidate list. Slots stay in ascending unit order at every level, so top-k
       ties go to the lower unit as in the reference's stable sort.

Shapes: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv, N_l units of level l (chunks for
l = 0, level-l sections above), D head dim. Lists are int32 [B, Hkv, CAP] with int32 lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from gsa_rag.config import GistConfig
from gsa_rag.kernels.gist_select import (
    DecodePlan,
    _scores_launch,
    csr_columns,
    select_counters,
    topk_union_launch,
)
from gsa_rag.kernels.pdl import pdl_launch
from gsa_rag.kernels.sparse_decode import next_pow2
from gsa_rag.layout import GistLayout
from gsa_rag.masks import visible
from gsa_rag.selection import choose_chunks, union_over_groups

try:  # triton is optional (see gist_select.py)
    import triton
    import triton.language as tl
    from gsa_rag.kernels.pdl import wait_for_previous
except ImportError:  # pragma: no cover
    triton = None


@dataclass
class HierPlan:
    """Selection bookkeeping of one hierarchical decode step, shared by all layers.

    Attributes (lists indexed by level l = 0..L-1):
        flat: the single-level plan of the same layout (gist_select.DecodePlan, which applies
            the hierarchical rule: base, the forgetting row, k, and extra_0 as its chunk CSR).
        extra_ptr, extra_cols: int32 [B, N_l + 1] offsets into int32 [B, NX_l] columns, the
            columns a chosen unit adds to the list (level 0: flat.chunk_ptr / chunk_cols).
        extra_max: the most columns one unit of the level adds (host int).
        child_ptr: level l >= 1: int32 [B, N_l + 1], the children of section s are units
            child_ptr[s] .. child_ptr[s + 1] - 1 of level l - 1 (None at level 0).
        child_max: the most children a section of the level has (host int; 0 at level 0).
        unit_index: long [B, N_l], the gist column of each unit; num_units: long [B].
        slots: candidate list width per level: every top-level unit; below, at most
            (units chosen one level up) x (their children).
        room: list entries the sections' gists can add (capacity = flat.capacity + room).
        section_k: long [B] sections per query head at every level above the chunks
            (GistConfig.level_top_k; flat.k, the chunks' k, when the config leaves it None;
            None under top_p); section_k_max: its maximum (host int).
        ident: int32 [max slots + 1] = 0, 1, 2, ...: the top level's candidate units, and the
            select kernel's size table (every slot counts 1, so it writes union flags).
    """

    flat: DecodePlan
    extra_ptr: list[torch.Tensor]
    extra_cols: list[torch.Tensor]
    extra_max: list[int]
    child_ptr: list[torch.Tensor | None]
    child_max: list[int]
    unit_index: list[torch.Tensor]
    num_units: list[torch.Tensor]
    slots: list[int]
    room: int
    ident: torch.Tensor
    section_k: torch.Tensor | None
    section_k_max: int

    @property
    def capacity(self) -> int:
        return self.flat.capacity + self.room

    @property
    def grown(self) -> int:
        """Tail columns the lists hold beyond their lineage's first step's (DecodePlan.grown)."""
        return self.flat.grown

    @classmethod
    def build(cls, layout: GistLayout, config: GistConfig, group_size: int, flat: DecodePlan | None = None) -> HierPlan:
        """Plans the step whose single query is the last column of `layout` (a tail token).

        Everything but `flat` depends only on the closed part of the layout (appended tail
        tokens are never gists and sit in the window), so layouts grown by `GistLayout.append`
        reuse it from their lineage cache; `flat` comes from `DecodePlan.build` (cached too).
        """
        flat = DecodePlan.build(layout, config, group_size) if flat is None else flat
        lineage = layout.__dict__.get("_lineage")
        key = ("hier", config.num_previous_chunks, config.k_policy, config.top_k, config.section_top_k, config.sink, group_size)
        cached = lineage.get(key) if lineage is not None else None
        if cached is not None and cached.section_index is layout.section_index and cached.num_chunks is layout.num_chunks:
            return replace(cached.plan, flat=flat)
        plan = cls._build(layout, config, group_size, flat)
        if lineage is not None:
            lineage[key] = _HierCache(layout.section_index, layout.num_chunks, plan)
        return plan

    @classmethod
    def _build(cls, layout: GistLayout, config: GistConfig, group_size: int, flat: DecodePlan) -> HierPlan:
        device = layout.input_ids.device
        B, T = layout.input_ids.shape
        L = layout.levels
        b = torch.arange(B, device=device)[:, None]
        q = torch.full((1, 1), T - 1, device=device)
        kv = torch.arange(T, device=device)[None, :]
        P = config.num_previous_chunks
        base_mask = visible(layout, b, q, kv, P, torch.zeros(B, T, dtype=torch.bool, device=device))
        extra_ptr, extra_cols, child_ptr = [flat.chunk_ptr], [flat.chunk_cols], [None]
        unit_index, num_units = [layout.gist_index], [layout.num_chunks]
        stats = [layout.num_chunks.max()]
        for level in range(1, L):
            index, valid = layout.units(level)
            N = index.shape[1]
            section = layout.section_id[..., level - 1]
            # a chosen section unfolds its closing gist (dense_unfold_mask's `sections` term)
            closes = (layout.level == level) & (section >= 0) & (section < layout.num_sections[:, level - 1, None])
            ptr, order, _ = csr_columns(visible(layout, b, q, kv, P, closes) & ~base_mask, section, N)
            extra_ptr.append(ptr)
            extra_cols.append(order.to(torch.int32))  # trimmed after the sync below
            _, child_valid = layout.units(level - 1)
            parent = torch.where(child_valid, layout.parents(level - 1), N)
            counts = torch.zeros(B, N + 1, dtype=torch.long, device=device).scatter_add_(1, parent, torch.ones_like(parent))
            child_ptr.append(torch.cat([counts.new_zeros(B, 1), counts[:, :N].cumsum(-1)], 1).to(torch.int32))
            unit_index.append(index)
            num_units.append(layout.num_sections[:, level - 1])
            stats += [valid.sum(-1).max(), ptr[:, -1].max().long(), (ptr[:, 1:] - ptr[:, :-1]).max().long(), counts[:, :N].max()]
        stats = torch.stack([s.long() for s in stats]).tolist()  # the one host sync
        n_max = [stats[0]] + stats[1::4]
        extra_max = [flat.max_chunk_len] + stats[3::4]
        child_max = [0] + stats[4::4]
        extra_cols = [extra_cols[0]] + [c[:, : max(1, n)].contiguous() for c, n in zip(extra_cols[1:], stats[2::4])]

        section_k, section_k_max = flat.k, flat.k_max
        if flat.k is not None and config.section_top_k is not None:
            section_k, section_k_max = torch.full_like(flat.k, config.section_top_k), config.section_top_k

        def chosen(slots: int) -> int:  # sections one KV head can choose among `slots` candidates
            return slots if section_k is None else min(slots, group_size * section_k_max)

        slots = [0] * L
        slots[L - 1] = max(1, n_max[L - 1])
        for level in range(L - 1, 0, -1):
            slots[level - 1] = max(1, min(n_max[level - 1], chosen(slots[level]) * child_max[level]))
        room = sum(min(nx, chosen(slots[level])) for level, nx in zip(range(1, L), stats[2::4]))
        ident = torch.arange(max(slots) + 1, dtype=torch.int32, device=device)
        return cls(flat, extra_ptr, extra_cols, extra_max, child_ptr, child_max, unit_index, num_units,
                   slots, room, ident, section_k, section_k_max)


@dataclass
class _HierCache:
    section_index: torch.Tensor  # the layout tensors the plan was built from (identity = same lineage step)
    num_chunks: torch.Tensor
    plan: HierPlan


if triton is not None:

    @triton.jit
    def _unfold_kernel(
        UNITS, FLAGS, XPTR, XCOLS, OUT, LEN,
        CPTR, CIDX, NEXT, NEXT_COLS, NEXT_LEN, BASE, BASE_LEN,
        s_ur, s_fr, s_xb, s_cb, s_or,
        s_pb, s_ib, s_nr, s_bb,
        Hkv, NC,
        BLOCK: tl.constexpr, XMAX: tl.constexpr, CMAX: tl.constexpr, CHILDREN: tl.constexpr,
        FROM_BASE: tl.constexpr, BASE_BLOCK: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # one program per (batch, KV head) row: its NC candidate slots in blocks of BLOCK, two
        # running offsets carried across blocks: where the chosen units' extra columns go in the
        # key list (LEN: what base and the levels above already hold, updated on exit), and
        # where their children go in the next level's candidate list (from 0). Slot order is
        # kept in both (prefix sums), so lists stay in ascending unit order. The top level
        # (FROM_BASE) first copies the batch row's base list to the row's start: two launches
        # (a copy and a fill of LEN) less per layer.
        wait_for_previous(PDL)
        row = tl.program_id(0)
        b = row // Hkv
        if FROM_BASE:
            off = tl.load(BASE_LEN + b)
            for i0 in range(0, off, BASE_BLOCK):
                i = i0 + tl.arange(0, BASE_BLOCK)
                tl.store(OUT + row * s_or + i, tl.load(BASE + b * s_bb + i, mask=i < off), mask=i < off)
        else:
            off = tl.load(LEN + row)
        nxt = tl.zeros([], dtype=tl.int32)
        t = tl.arange(0, XMAX)
        tc = tl.arange(0, CMAX)
        for j0 in range(0, NC, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            chosen = tl.load(FLAGS + row * s_fr + j, mask=j < NC, other=0) != 0
            u = tl.load(UNITS + row * s_ur + j, mask=chosen, other=0)
            lo = tl.load(XPTR + b * s_xb + u, mask=chosen, other=0)
            size = tl.load(XPTR + b * s_xb + u + 1, mask=chosen, other=0) - lo  # 0 where not chosen
            start = off + tl.cumsum(size, 0) - size
            m = t[None, :] < size[:, None]
            cols = tl.load(XCOLS + b * s_cb + lo[:, None] + t[None, :], mask=m, other=0)
            tl.store(OUT + row * s_or + start[:, None] + t[None, :], cols, mask=m)
            off += tl.sum(size, 0)
            if CHILDREN:
                first = tl.load(CPTR + b * s_pb + u, mask=chosen, other=0)
                n = tl.load(CPTR + b * s_pb + u + 1, mask=chosen, other=0) - first
                at = nxt + tl.cumsum(n, 0) - n
                mc = tc[None, :] < n[:, None]
                child = first[:, None] + tc[None, :]
                gist = tl.load(CIDX + b * s_ib + child, mask=mc, other=0).to(tl.int32)
                tl.store(NEXT + row * s_nr + at[:, None] + tc[None, :], child, mask=mc)
                tl.store(NEXT_COLS + row * s_nr + at[:, None] + tc[None, :], gist, mask=mc)
                nxt += tl.sum(n, 0)
        tl.store(LEN + row, off)
        if CHILDREN:
            tl.store(NEXT_LEN + row, nxt)


def _union_flags(scores: torch.Tensor, plan: HierPlan, counters: torch.Tensor, num_kv_heads: int,
                 config: GistConfig, head_dim: int, level: int) -> torch.Tensor:
    """Per query head top-k (top-p) over the candidate slots of gist level `level`, union over
    each GQA group.

    Args:
        scores: float32 [B, Hq, NC], -inf past each (batch, KV head)'s candidates.
        counters: `select_counters`, zeroed by the scores launch just before.

    Returns:
        int32 [B, Hkv, NC], 1 where a slot is chosen.
    """
    B, Hq, NC = scores.shape
    k = plan.flat.k if level == 0 else plan.section_k
    if k is None:  # top-p: the reference's choice, on the small candidate rows
        top_p = config.top_p if k is None else None
        chosen = choose_chunks(scores[:, :, None], k=k, top_p=top_p, scale=1.0 / math.sqrt(head_dim))
        return union_over_groups(chosen, num_kv_heads)[:, :, 0].to(torch.int32)
    flags = torch.empty(B, num_kv_heads, NC, dtype=torch.int32, device=scores.device)
    picks = torch.empty(B, Hq, NC, dtype=torch.int8, device=scores.device)
    # the identity size table (stride 0 over batch): each chosen slot's "size" is 1; no prefix sum
    topk_union_launch(scores, k, plan.ident, 0, picks, flags, None, counters, num_kv_heads)
    return flags


# elements of one unfold step's widest tile ([block, XMAX] columns or [block, CMAX] children):
# the walk over a row's slots is serial, so the top level (every top-level gist: 3,705 slots at
# 128K, 32x) takes 2 steps at this size where 64-slot steps took 58
UNFOLD_TILE = 8192


def unfold_block(slots: int, xmax: int, cmax: int) -> int:
    """Slots per step of `_unfold_kernel`: the whole row when it fits in UNFOLD_TILE, at least 64."""
    widest = next_pow2(max(1, xmax, cmax))
    return max(64, min(next_pow2(max(1, slots)), UNFOLD_TILE // widest))


def select_hier_index_list_triton(query: torch.Tensor, key: torch.Tensor, layout: GistLayout, plan: HierPlan,
                                  config: GistConfig, scored: torch.Tensor | None = None,
                                  block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selecting layers' key list of a hierarchical layout (module docstring), no host sync.

    Args:
        query: [B, Hq, D] (RoPE applied); key: [B, Hkv, T, D] the layer's cache.
        scored: optional int32 [B * Hkv], zeroed by the caller: each (batch, KV head) adds the
            gist keys the scoring kernel read for it, over all levels.
        block: slots per unfold step at every level, and base entries per copy step (a power
            of two); default `unfold_block` and 256.

    Returns:
        (int32 [B, Hkv, plan.capacity], int32 [B, Hkv]): base first, then each level's columns
        from the top down; entries past a row's length are unwritten.
    """
    B, Hq, D = query.shape
    Hkv = key.shape[1]
    device = query.device
    flat = plan.flat
    out = torch.empty(B, Hkv, plan.capacity, dtype=torch.int32, device=device)
    lengths = torch.empty(B, Hkv, dtype=torch.int32, device=device)  # the top level's unfold starts it at base_len
    counters = select_counters(B, Hq, device)
    top = layout.levels - 1
    units, gist_cols, count = plan.ident, plan.unit_index[top], plan.num_units[top]  # every top-level unit
    s_ur = 0
    for level in range(top, -1, -1):
        scores = _scores_launch(query, key, gist_cols, count, counters=counters, scored=scored)
        flags = _union_flags(scores, plan, counters, Hkv, config, D, level)
        NC = flags.shape[-1]
        children = level > 0
        if children:
            width = plan.slots[level - 1]
            nxt = torch.empty(B, Hkv, width, dtype=torch.int32, device=device)
            nxt_cols = torch.empty_like(nxt)
            nxt_len = torch.empty(B, Hkv, dtype=torch.int32, device=device)
            cptr, cidx = plan.child_ptr[level], plan.unit_index[level - 1]
        else:  # unused pointers (CHILDREN is off)
            nxt = nxt_cols = nxt_len = cptr = cidx = lengths
            width = 0
        xptr, xcols = plan.extra_ptr[level], plan.extra_cols[level]
        xmax, cmax = next_pow2(max(1, plan.extra_max[level])), next_pow2(max(1, plan.child_max[level]))
        step = unfold_block(NC, xmax, cmax) if block is None else block
        _unfold_kernel[(B * Hkv,)](
            units, flags, xptr, xcols, out, lengths,
            cptr, cidx, nxt, nxt_cols, nxt_len, flat.base, flat.base_len,
            s_ur, NC, xptr.stride(0), xcols.stride(0), plan.capacity,
            cptr.stride(0) if children else 0, cidx.stride(0) if children else 0, width, flat.base.stride(0),
            Hkv, NC,
            BLOCK=step, XMAX=xmax, CMAX=cmax, CHILDREN=children, FROM_BASE=level == top, BASE_BLOCK=256 if block is None else block,
            **pdl_launch(device), num_warps=4 if step * max(xmax, cmax) <= 2048 else 8,
        )
        units, gist_cols, count, s_ur = nxt, nxt_cols, nxt_len, width
    return out, lengths


def select_hier_index_list(query: torch.Tensor, key: torch.Tensor, layout: GistLayout, plan: HierPlan,
                           config: GistConfig, layer_idx: int, scored: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The key list of one hierarchical decode step in one layer (gist_select.select_index_list's
    contract; H is 1 in layers that do not select: the forgetting row, every head alike)."""
    flat = plan.flat
    if layer_idx < config.first_selecting_layer or not config.uses_gists or not flat.selects:
        return flat.forget, flat.forget_len
    return select_hier_index_list_triton(query, key, layout, plan, config, scored)
