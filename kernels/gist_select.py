"""Recall for one decode step: score the gist keys, choose chunks, emit a compact key list.

A decode query (one tail column q) sees, per KV head, exactly the columns of
`gsa_rag.masks.visible` with recall = "the key's chunk is closed and selected by a query head
of this KV head". That set splits into two parts (visible is an OR over recall):

    base     = visible(recall=False): sink, local window (chunks n-P..n, the tail included),
               link tokens, the query itself. The same for every layer and head.
    extra(c) = the columns of closed chunk c that recall adds: chunk_id == c, valid, kv <= q,
               not isolated, not already in base (raw tokens and gist of chunk c).

so the key list of head h is base ++ concat(extra(c) for c selected by h). `DecodePlan`
computes base and extra (as CSR over chunks) once per decode step (plan-then-run, shared by
every layer); per layer only the scores, the top-k and the list expansion run.

Layers that do not select (below first_selecting_layer, or nothing to select) use the
forgetting row: base plus every closed gist; that list is also built once per step.

Fast path (`select_index_list_triton`, no host sync), four launches: the scores kernel (grid
(B * Hkv, C / (BLOCK_C * STEPS)), each program scoring STEPS blocks in turn; gist keys loaded
once per KV head, shared by its G query heads; with `GistConfig.score_dtype` "int8" from the
contiguous int8 copy of `gist_keys8`) -> the
select kernel (`_topk_union_kernel`, grid B * Hq: each query head's k-th largest score by a
bisection over the bits of its key in registers, stopping once exactly k scores lie above it, or
with SEARCH_INTERP by interpolation on a normal fit of the row, fewer reductions; it writes each
head's picks) -> the union kernel (`_union_kernel`, grid (B * Hkv, C / UNION_TILE): the OR of each
GQA group's picks, the union's chunk sizes and one sum per block of 64 chunks, ENDS_BLOCKS; with
ENDS_PREFIX, or UNION_KERNEL off, the last head of each group to finish writes them instead, the
prefix sum along the row for ENDS_PREFIX) -> the expansion kernel (grid
(B * Hkv, C / 64 + base blocks): every chunk block writes its columns at base_len + prefix sum;
no serial walk, no dense mask; where every chunk's extra columns are one run of consecutive
columns, the usual case (`DecodePlan.contiguous`), they are its first column + 0, 1, .. instead
of a gather through the CSR offsets, EXPAND_CONTIGUOUS). Above TOPK_MAX_CHUNKS chunks a row no
longer fits in registers and the select kernel streams it from memory at every pass instead
(`streams_rows`), unless they are few: then `window_select` takes them (each row's k-th place
among the candidates of a window placed from a sample, rows split over programs; the union kernel
then reads the scores against its thresholds; WINDOW_SELECT). The older path, torch.topk, the mark
kernel (each pick writes its chunk's extra-column count: the GQA union) and torch.cumsum, stays
for `fused_topk=False`. Reference path
(torch): `gist_scores_ref` is `gsa_rag.selection.gist_scores`; `build_index_list_ref` expands
column-wise from a mask. Top-p goes through the reference `choose_chunks` on both.

Shapes: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv, T key columns, C chunks,
D head dim. Index lists are int32 [B, H, CAP] padded with 0, with int32 lengths [B, H]
(H = Hkv, or 1 when every head shares the list).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from gsa_rag.kernels.dispatch import interpreting
from gsa_rag.kernels.gist_keys8 import Int8GistKeys, gist_keys_of_layer
from gsa_rag.kernels.pdl import pdl_launch
from gsa_rag.kernels.sparse_decode import next_pow2, num_sms
from gsa_rag.kernels.window_select import COUNTER_WORDS, window_select_launch

from gsa_rag.config import GistConfig
from gsa_rag.layout import GistLayout
from gsa_rag.masks import gist_recall, visible
from gsa_rag.selection import (
    adaptive_k,
    choose_chunks,
    gist_scores,
    int8_gist_scores,
    union_over_groups,
)

try:  # triton is optional: the references below need only torch
    import triton
    import triton.language as tl
    from gsa_rag.kernels.pdl import wait_for_previous
    from gsa_rag.kernels.row_search import (
        float_key,
        key_float,
        kth_interp,
        kth_largest,
        pick_top,
        row_count,
        row_stats,
        score_tile,
    )
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def pack_columns(mask: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compacts a column mask into an ascending, zero-padded int32 index list.

    Args:
        mask: bool [..., T].
        capacity: list width (default: the largest count; needs one host sync).

    Returns:
        (int32 [..., capacity], int32 [...]) the columns and their counts.
    """
    counts = mask.sum(-1)
    if capacity is None:
        capacity = max(1, int(counts.max()) if counts.numel() else 1)
    slot = torch.cumsum(mask.long(), -1) - 1
    slot = torch.where(mask, slot, capacity)  # unselected columns go to a spill slot, dropped below
    cols = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.int32).expand_as(mask)
    out = torch.zeros(*mask.shape[:-1], capacity + 1, dtype=torch.int32, device=mask.device)
    out.scatter_(-1, slot, cols)
    return out[..., :capacity].contiguous(), counts.to(torch.int32)


def csr_columns(mask: torch.Tensor, unit: torch.Tensor, num_units: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The columns of `mask` grouped by unit (ascending inside a unit), as CSR.

    Args:
        mask: bool [B, T]; unit: long [B, T], the unit (chunk, section) of each column, in
            [0, num_units) where mask is set (anything elsewhere).

    Returns:
        (int32 [B, N + 1] offsets, long [B, T] columns, long [B, T] the unit of each entry):
        a row's first ptr[:, N] entries are its columns; the rest are padding (unit N).
    """
    B, T = mask.shape
    unit = torch.where(mask, unit, num_units)
    kv = torch.arange(T, device=mask.device)[None, :]
    order = torch.argsort(unit * T + kv, dim=-1, stable=True)  # by (unit, column)
    counts = torch.zeros(B, num_units + 1, dtype=torch.long, device=mask.device)
    counts.scatter_add_(1, unit, torch.ones_like(unit))
    ptr = torch.cat([counts.new_zeros(B, 1), counts[:, :num_units].cumsum(-1)], 1).to(torch.int32)
    return ptr, order, torch.gather(unit, 1, order)


@dataclass
class DecodePlan:
    """Selection bookkeeping of one decode step (query column q = T-1), shared by all layers.

    Attributes:
        base: int32 [B, NB] columns every head sees (see module docstring), padded with 0.
        base_len: int32 [B].
        chunk_ptr: int32 [B, C + 1], CSR offsets of each chunk's extra columns in chunk_cols.
        chunk_cols: int32 [B, NX], extra columns grouped by chunk (ascending inside a chunk).
        chunk_of_col: long [B, NX], the chunk of each chunk_cols entry (C where padding).
        forget: int32 [B, 1, NF] the forgetting row (non-selecting layers), forget_len int32 [B, 1].
        k: long [B] chunks per query head (None under top_p); k_max: its maximum (host int).
        max_chunk_len: the longest extra(c) (host int).
        capacity: list width that any selection fits in (host int).
        num_chunks: long [B].
        selects: whether selecting layers select at all (some row has a chunk).
        uniform_k: every row has the same k (top-k may then skip sorting its picks).
        nb_max: the longest base list (host int).
        chunk_first: int32 [B, C], each chunk's first extra column (chunk_cols[chunk_ptr[c]];
            anything where the chunk has none). None in plans made by hand.
        contiguous: every chunk's extra columns, in every row, are one run chunk_first[c] + t
            (raw tokens then gist, nothing of base between them; host bool): the expansion then
            computes them instead of gathering them from chunk_cols (`_expand_launch`).
        grown: tail columns every list of the plan holds beyond the lists of its lineage's first
            step (`_PlanCache`): n at the n-th step after it; a graph step's plan (`plan_at`) the
            whole room, the later steps' columns past each row's length. The attention sizes a
            list's splits for its width less these, the first step's width, so every step of a
            generation, eager or replayed, splits its lists alike and rounds alike
            (`sparse_decode_triton`'s split_width).

    Built with one host sync (the sizes above); nothing per layer syncs.
    """

    base: torch.Tensor
    base_len: torch.Tensor
    chunk_ptr: torch.Tensor
    chunk_cols: torch.Tensor
    chunk_of_col: torch.Tensor
    forget: torch.Tensor
    forget_len: torch.Tensor
    k: torch.Tensor | None
    k_max: int
    max_chunk_len: int
    capacity: int
    num_chunks: torch.Tensor
    selects: bool
    uniform_k: bool = False
    nb_max: int = 1
    chunk_first: torch.Tensor | None = None
    contiguous: bool = False
    grown: int = 0

    @property
    def chunk_size(self) -> torch.Tensor:
        """int32 [B, C], the number of extra columns of each chunk."""
        return self.chunk_ptr[:, 1:] - self.chunk_ptr[:, :-1]

    @classmethod
    def cached(cls, layout: GistLayout, config: GistConfig, group_size: int) -> DecodePlan | None:
        """The plan from the layout's lineage cache (see `build`), or None; never syncs."""
        lineage = layout.__dict__.get("_lineage")
        if lineage is None:
            return None
        entry = lineage.get(_plan_key(config, group_size))
        if entry is None:
            return None
        return entry.plan_for(layout)

    @classmethod
    def build(cls, layout: GistLayout, config: GistConfig, group_size: int) -> DecodePlan:
        """Plans the step whose single query is the last column of `layout` (a tail token).

        Layouts made by `GistLayout.append` share a lineage cache: everything about the columns
        of an earlier step's layout (T0 of them) stays fixed while tail tokens are appended, and
        every later query sees all of the appended columns [T0, T) (they are in its own open
        chunk). So a step of a known lineage costs a few views (no device work, no host sync):
        the base and forgetting lists are kept with their future tail columns already written.

        Args:
            layout: the sequence so far, the new token included.
            config: P (num_previous_chunks), the k policy.
            group_size: G, query heads per KV head (for adaptive k and the capacity bound).
        """
        plan = cls.cached(layout, config, group_size)
        if plan is not None:
            return plan
        plan = cls.build_full(layout, config, group_size)
        lineage = layout.__dict__.get("_lineage")
        if lineage is not None:
            key = _plan_key(config, group_size)
            spent = lineage.get(key)  # a generation past its cache's room: its lists keep their first step's splits
            if spent is not None and spent.same_chunks(layout) and layout.seq_len > spent.T0:
                plan = dataclasses.replace(plan, grown=spent.plan.grown + layout.seq_len - spent.T0)
            lineage[key] = _PlanCache(layout, plan, group_size)
        return plan

    @classmethod
    def build_full(cls, layout: GistLayout, config: GistConfig, group_size: int) -> DecodePlan:
        """`build` from scratch (the whole sequence through `gsa_rag.masks.visible`; one host sync)."""
        device = layout.input_ids.device
        B, T = layout.input_ids.shape
        C = layout.gist_index.shape[1]
        P = config.num_previous_chunks
        b = torch.arange(B, device=device)[:, None]
        q = torch.full((1, 1), T - 1, device=device)
        kv = torch.arange(T, device=device)[None, :]
        # the engine's rule itself, once without recall and once with every closed chunk recalled
        base_mask = visible(layout, b, q, kv, P, torch.zeros(B, T, dtype=torch.bool, device=device))
        closed = (layout.chunk_id >= 0) & (layout.chunk_id < layout.num_chunks[:, None])
        forget_recall = layout.is_gist
        if layout.levels > 1:
            # H-GSA (masks.dense_unfold_mask): a chunk unfolds its raw tokens and level-0 gist only
            # (the meta-gists are unfolded by their sections: kernels.hier_select); the forgetting
            # row recalls the top-level gists and those of its own sections
            closed = closed & (layout.level <= 0)
            forget_recall = gist_recall(layout, b, q, kv)
        extra_mask = visible(layout, b, q, kv, P, closed) & ~base_mask
        forget_mask = visible(layout, b, q, kv, P, forget_recall)

        # capacities are upper bounds here (T columns); the lists are trimmed after the one sync
        base, base_len = pack_columns(base_mask, T)
        forget, forget_len = pack_columns(forget_mask, T)

        chunk_ptr, order, chunk = csr_columns(extra_mask, layout.chunk_id, C)
        counts = chunk_ptr[:, 1:] - chunk_ptr[:, :-1]
        # a chunk is one run where each of its entries after the first is the previous column + 1
        # (padding entries carry unit C and are left out)
        same = (chunk[:, 1:] == chunk[:, :-1]) & (chunk[:, 1:] < C)
        gap = (same & (order[:, 1:] - order[:, :-1] != 1)).any()
        chunk_first = torch.gather(order, 1, chunk_ptr[:, :C].long().clamp(max=T - 1)).to(torch.int32)

        num_chunks = layout.num_chunks
        if config.k_policy == "top_p":
            k = None
        elif config.k_policy == "adaptive":
            context_len = (layout.valid & ~layout.is_tail).sum(-1)
            k = adaptive_k(context_len, num_chunks, group_size, config)
        else:
            k = torch.full_like(num_chunks, config.top_k)
        zero = num_chunks.new_zeros(())
        # the one host sync of the step: every size the kernels' grids need
        stats = torch.stack([
            base_len.max().long(),
            forget_len.max().long(),
            extra_mask.sum(-1).max().long(),
            counts.max().long() if C else zero,
            k.max() if k is not None else zero,
            k.min() if k is not None else zero,
            num_chunks.max(),
            gap.long(),
        ]).tolist()
        nb_max, nf_max, nx, max_chunk_len, k_max, k_min, n_max, gaps = stats
        nb_max, nf_max, nx = max(1, nb_max), max(1, nf_max), max(1, nx)
        base, forget = base[:, :nb_max].contiguous(), forget[:, :nf_max].contiguous()
        chunk_cols = order[:, :nx].to(torch.int32)
        chunk_of_col = chunk[:, :nx]
        uniform_k = k is not None and k_min == k_max
        k_max = min(k_max, C) if k is not None else C
        picked = C if k is None else min(C, group_size * k_max)
        capacity = max(1, nb_max + min(nx, picked * max_chunk_len))
        return cls(base, base_len, chunk_ptr, chunk_cols, chunk_of_col, forget[:, None], forget_len[:, None],
                   k, k_max, max_chunk_len, capacity, num_chunks, n_max > 0, uniform_k, nb_max,
                   chunk_first=chunk_first, contiguous=not gaps)


def _plan_key(config: GistConfig, group_size: int) -> tuple:
    return (config.num_previous_chunks, config.k_policy, config.top_k, config.adaptive_ratio, config.chunk_size,
            config.sink, group_size)


class _PlanCache:
    """A plan built at T0 columns, and its base / forgetting lists with the next `room` tail
    columns T0.. already written after each row's entries (the list of step T is a prefix view)."""

    ROOM = 256

    def __init__(self, layout: GistLayout, plan: DecodePlan, group_size: int, room: int | None = None):
        self.T0 = layout.seq_len
        self.num_chunks, self.gist_index = layout.num_chunks, layout.gist_index
        self.plan = plan
        device = plan.base.device
        self.room = room = self.ROOM if room is None else room
        tail = self.T0 + torch.arange(room, device=device, dtype=torch.int32)
        steps = torch.arange(room + 1, device=device, dtype=torch.int32)[:, None]

        def extend(lst, lens):  # [B, N] list, [B] lengths -> [B, N + room] list, [room + 1, B] lengths
            B, N = lst.shape
            buf = torch.zeros(B, N + room, dtype=torch.int32, device=device)
            buf[:, :N] = lst
            buf.scatter_(1, lens.long()[:, None] + torch.arange(room, device=device), tail.expand(B, room))
            return buf, (lens[None, :] + steps).to(torch.int32).contiguous()

        self.base, self.base_len = extend(plan.base, plan.base_len)
        forget, self.forget_len = extend(plan.forget[:, 0], plan.forget_len[:, 0])
        self.forget = forget[:, None]
        self.picked_cols = plan.capacity - plan.nb_max  # the capacity's chunk part (fixed)

    def same_chunks(self, layout: GistLayout) -> bool:
        """Whether `layout` grew from this cache's by tail tokens only (its chunks are the same)."""
        return layout.num_chunks is self.num_chunks and layout.gist_index is self.gist_index

    def plan_for(self, layout: GistLayout) -> DecodePlan | None:
        n = layout.seq_len - self.T0
        if not 0 <= n <= self.room or not self.same_chunks(layout):
            return None
        if n == 0:
            return self.plan
        return self._view(n, self.base_len[n], self.forget_len[n], grown=self.plan.grown + n)

    def plan_at(self, n: torch.Tensor) -> DecodePlan:
        """The plan of the step at T0 + n columns for a long [1] device tensor `n` <= room: the lists
        at their full width (the room's tail columns included, past each row's length) and the
        lengths read at `n` on the device. No host value depends on `n`, so one CUDA graph of a
        step serves every step (`gsa_rag.graph_decode`); `plan_for` gives the same lists, trimmed."""
        return self._view(self.room, self.base_len.index_select(0, n)[0], self.forget_len.index_select(0, n)[0],
                          grown=self.plan.grown + self.room)

    def _view(self, extra: int, base_len: torch.Tensor, forget_len: torch.Tensor, **fields) -> DecodePlan:
        """The plan with `extra` of the room's tail columns in its base and forgetting lists, these
        lengths ([B] each) and any other `fields` changed."""
        p = self.plan
        nb = p.nb_max + extra
        return dataclasses.replace(
            p, base=self.base[:, :nb], base_len=base_len, forget=self.forget[:, :, :p.forget.shape[-1] + extra],
            forget_len=forget_len[:, None], capacity=nb + self.picked_cols, nb_max=nb, **fields,
        )


# --------------------------------------------------------------------------- scoring


def gist_scores_ref(query: torch.Tensor, key: torch.Tensor, gist_index: torch.Tensor, gist_valid: torch.Tensor) -> torch.Tensor:
    """Reference: `gsa_rag.selection.gist_scores` for one query row.

    Args:
        query: [B, Hq, D]; key: [B, Hkv, T, D]; gist_index long [B, C]; gist_valid bool [B, C].

    Returns:
        float32 [B, Hq, C], -inf for missing chunks.
    """
    return gist_scores(query[:, :, None], key, gist_index, gist_valid)[:, :, 0]


if triton is not None:

    @triton.jit
    def _gist_scores_kernel(
        Q, K, GIDX, NCH, S, SIZES, CNT, SCORED, QSCALE,
        s_qb, s_qh, s_qd,
        s_kb, s_kh, s_kt, s_kd,
        s_gb, s_gh, s_gc,
        s_nb, s_nh,
        s_sb, s_sh, s_sc,
        s_xb, s_xh,
        Hkv, G, C, NBLK, TOTAL, PER,
        G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr,
        PRECISION: tl.constexpr, ZERO_SIZES: tl.constexpr, ZERO_CNT: tl.constexpr, ZERO_PAD: tl.constexpr,
        COUNT: tl.constexpr, INT8: tl.constexpr, ONE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # The work is TOTAL = B * Hkv * NBLK blocks of BLOCK_C chunks, numbered (batch, KV head)
        # major; a program scores PER consecutive ones in turn, the next block's loads in flight
        # while one is scored (PER = 1: a program a block; a few programs an SM: each streams one
        # contiguous stretch, and no partial last wave). Each gist key row is read once and scored
        # against all G query heads that share it (one [G_PAD, D] x [D, BLOCK_C] dot; 16-bit
        # products are exact in fp32 and accumulate in fp32, like the reference's fp32 matmul of
        # the upcast inputs). A block also zeroes its part of the [B, Hkv, C] size table that the
        # mark kernel fills next (saves a launch). The gist list and its length are per batch row
        # (s_gh = s_nh = 0) or, for H-GSA's candidate lists, per (batch, KV head).
        wait_for_previous(PDL)
        pid = tl.program_id(0)
        if ONE:  # PER = 1, no loop: a loop of one pipelined step cost the cache's scores a quarter
            _score_row(Q, K, GIDX, NCH, S, SIZES, CNT, SCORED, QSCALE, pid // NBLK, pid % NBLK, pid % NBLK + 1,
                       s_qb, s_qh, s_qd, s_kb, s_kh, s_kt, s_kd, s_gb, s_gh, s_gc, s_nb, s_nh,
                       s_sb, s_sh, s_sc, s_xb, s_xh, Hkv, G, C, G_PAD, D, BLOCK_C, DOT_F32, PRECISION,
                       ZERO_SIZES, ZERO_CNT, ZERO_PAD, COUNT, INT8, True)
        else:
            first = pid * PER
            last = tl.minimum(first + PER, TOTAL)
            # a stretch spans one or two rows when PER <= NBLK: each row's query is loaded once
            for row in range(first // NBLK, (last - 1) // NBLK + 1):
                _score_row(Q, K, GIDX, NCH, S, SIZES, CNT, SCORED, QSCALE, row,
                           tl.maximum(first - row * NBLK, 0), tl.minimum(last - row * NBLK, NBLK),
                           s_qb, s_qh, s_qd, s_kb, s_kh, s_kt, s_kd, s_gb, s_gh, s_gc, s_nb, s_nh,
                           s_sb, s_sh, s_sc, s_xb, s_xh, Hkv, G, C, G_PAD, D, BLOCK_C, DOT_F32, PRECISION,
                           ZERO_SIZES, ZERO_CNT, ZERO_PAD, COUNT, INT8, False)

    @triton.jit
    def _score_row(Q, K, GIDX, NCH, S, SIZES, CNT, SCORED, QSCALE, pid, lo, hi,
                   s_qb, s_qh, s_qd, s_kb, s_kh, s_kt, s_kd, s_gb, s_gh, s_gc, s_nb, s_nh,
                   s_sb, s_sh, s_sc, s_xb, s_xh, Hkv, G, C,
                   G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr,
                   PRECISION: tl.constexpr, ZERO_SIZES: tl.constexpr, ZERO_CNT: tl.constexpr,
                   ZERO_PAD: tl.constexpr, COUNT: tl.constexpr, INT8: tl.constexpr, ONE: tl.constexpr):
        # blocks [lo, hi) of (batch, KV head) `pid`, the next block's keys in flight while one is
        # scored (ONE: the single block lo)
        pid64 = pid * tl.full([], 1, tl.int64)  # (the interpreter's loop index is a Python int)
        b = pid // Hkv
        h = pid % Hkv
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        n = tl.load(NCH + b * s_nb + h * s_nh)
        # int64 batch offsets: question rows stand in for the batch (select_rows_triton), and R * Hq * C
        # passes 2^31 at long contexts
        b64 = b.to(tl.int64)
        q = tl.load(Q + b64 * s_qb + (h * G + g)[:, None] * s_qh + d[None, :] * s_qd,
                    mask=(g < G)[:, None], other=0.0)
        if INT8:  # the channel scales fold into the query, rounded to its dtype like the reference's
            qscale = tl.load(QSCALE + b64 * s_xb + h * s_xh + d)
            q = q.to(tl.float32) * qscale[None, :]
            if DOT_F32:  # the interpreter, bf16: its fp32 -> bf16 truncates, so round to nearest even by the bits
                bits = q.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                q = bits.to(tl.float32, bitcast=True)
            else:
                q = q.to(Q.dtype.element_ty)
        if DOT_F32:
            q = q.to(tl.float32)
        if ONE:
            _score_block(Q, K, GIDX, S, SIZES, SCORED, q, n, b64, h, pid64, lo, s_kb, s_kh, s_kt, s_kd, s_gb, s_gh,
                         s_gc, s_sb, s_sh, s_sc, G, C, G_PAD, D, BLOCK_C, DOT_F32, PRECISION, ZERO_SIZES, COUNT, INT8)
        else:
            for blk in tl.range(lo, hi):
                _score_block(Q, K, GIDX, S, SIZES, SCORED, q, n, b64, h, pid64, blk, s_kb, s_kh, s_kt, s_kd, s_gb,
                             s_gh, s_gc, s_sb, s_sh, s_sc, G, C, G_PAD, D, BLOCK_C, DOT_F32, PRECISION, ZERO_SIZES,
                             COUNT, INT8)
        if ZERO_CNT:  # the counters of the select kernel that runs next: ZERO_CNT words a (batch, KV head)
            if lo == 0:
                w = tl.arange(0, ZERO_PAD)
                tl.store(CNT + pid64 * ZERO_CNT + w, tl.zeros([ZERO_PAD], dtype=tl.int32), mask=w < ZERO_CNT)

    @triton.jit
    def _score_block(Q, K, GIDX, S, SIZES, SCORED, q, n, b64, h, pid64, blk, s_kb, s_kh, s_kt, s_kd, s_gb, s_gh,
                     s_gc, s_sb, s_sh, s_sc, G, C,
                     G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr,
                     PRECISION: tl.constexpr, ZERO_SIZES: tl.constexpr, COUNT: tl.constexpr, INT8: tl.constexpr):
        # block `blk` of one (batch, KV head), its query q already loaded (n chunks exist)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        c = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        exists = c < n
        if INT8:  # K is the contiguous int8 copy (gist_keys8): row c is chunk c's gist
            rows = c.to(tl.int64)
        else:
            rows = tl.load(GIDX + b64 * s_gb + h * s_gh + c * s_gc, mask=exists, other=0).to(tl.int64)
        k = tl.load(K + b64 * s_kb + h * s_kh + rows[:, None] * s_kt + d[None, :] * s_kd,
                    mask=exists[:, None], other=0)
        if DOT_F32:
            k = k.to(tl.float32)
        elif INT8:  # |values| <= 127: exact in every 16-bit float
            k = k.to(Q.dtype.element_ty)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [G_PAD, BLOCK_C] fp32
        s = tl.where(exists[None, :], s, float("-inf"))
        tl.store(S + b64 * s_sb + (h * G + g)[:, None] * s_sh + c[None, :] * s_sc, s,
                 mask=(g < G)[:, None] & c_ok[None, :])
        if ZERO_SIZES:
            tl.store(SIZES + pid64 * C + c, tl.zeros([BLOCK_C], dtype=tl.int32), mask=c_ok)
        if COUNT:  # gist keys this block read (tests and benchmarks count a step's keys)
            tl.atomic_add(SCORED + pid64, tl.sum(exists.to(tl.int32), 0))

    @triton.jit
    def _mark_kernel(
        VALS, IDX, KROW, PTR, SIZES,
        s_vb, s_vh, s_vk,
        s_pb,
        Hq, G, C, KM,
        BLOCK_K: tl.constexpr, USE_RANK: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # one program per (batch, query head): its top-k picks set sizes[b, h // G, chunk] to the
        # chunk's extra-column count (the GQA union: heads of one group write the same value)
        wait_for_previous(PDL)
        pid = tl.program_id(0)
        b = pid // Hq
        hq = pid % Hq
        kb = tl.load(KROW + b)
        sizes = SIZES + (b * (Hq // G) + hq // G).to(tl.int64) * C
        for r0 in range(0, KM, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K)
            ok = r < KM
            v = tl.load(VALS + b * s_vb + hq * s_vh + r * s_vk, mask=ok, other=float("-inf"))
            c = tl.load(IDX + b * s_vb + hq * s_vh + r * s_vk, mask=ok, other=0).to(tl.int32)
            keep = ok & (v > float("-inf"))
            if USE_RANK:
                keep = keep & (r < kb)
            lo = tl.load(PTR + b * s_pb + c, mask=keep, other=0)
            hi = tl.load(PTR + b * s_pb + c + 1, mask=keep, other=0)
            tl.store(sizes + c, hi - lo, mask=keep)

    @triton.jit
    def _chunk_columns(out, start, size, base, cols_row, OFFSET: tl.constexpr, WIDTH: tl.constexpr,
                       CONTIG: tl.constexpr):
        # columns OFFSET .. OFFSET + WIDTH - 1 of each chunk (those below its size), written from
        # start[c] on: its first column base[c] plus t (CONTIG), or gathered from cols_row at its
        # CSR offset base[c]
        t = OFFSET + tl.arange(0, WIDTH)
        m = t[None, :] < size[:, None]
        if CONTIG:
            cols = base[:, None] + t[None, :]
        else:
            cols = tl.load(cols_row + base[:, None] + t[None, :], mask=m, other=0)
        tl.store(out + start[:, None] + t[None, :], cols, mask=m)

    @triton.jit
    def _expand_kernel(
        BASE, BASE_LEN, PTR, COLS, FIRST, SIZES, ENDS, OUT, OUT_LEN,
        s_bb, s_pb, s_cb, s_fb,
        s_ob, s_oh,
        Hkv, C, NPC, NSB,
        BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, SUM_BLOCK: tl.constexpr,
        ENDS_MODE: tl.constexpr, NSB_POW2: tl.constexpr, CONTIG: tl.constexpr, HEAD: tl.constexpr,
        REST: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # grid (B * Hkv, NPC + base blocks): program j < NPC writes the extra columns of chunks
        # [j * BLOCK_C, (j + 1) * BLOCK_C) at base_len + (inclusive prefix sum of sizes) - size;
        # the other programs copy BLOCK entries of the base list each. Deterministic order:
        # base first, then chunk by chunk, ascending inside a chunk. ENDS holds the prefix sum
        # along C (ENDS_PREFIX, [B * Hkv, C]) or one sum per block of SUM_BLOCK chunks (ENDS_BLOCKS,
        # [B * Hkv, NSB]): then each program adds the sums of the blocks before its own (one masked
        # load of <= NSB_POW2 sums) and scans its own BLOCK_C sizes (a multiple of SUM_BLOCK), so no
        # row-wide scan is needed. With CONTIG each chunk's columns are one run from FIRST[c]
        # (DecodePlan.contiguous): computed, not gathered from COLS at PTR[c], so none of the
        # program's loads (sizes, block sums, first columns) waits on another.
        wait_for_previous(PDL)
        pid = tl.program_id(0)
        j = tl.program_id(1)
        b = pid // Hkv
        out = OUT + b.to(tl.int64) * s_ob + (pid % Hkv).to(tl.int64) * s_oh
        nb = tl.load(BASE_LEN + b)
        if j < NPC:
            c = j * BLOCK_C + tl.arange(0, BLOCK_C)
            ok = c < C
            row = pid.to(tl.int64) * C
            size = tl.load(SIZES + row + c, mask=ok, other=0)
            if CONTIG:
                first = tl.load(FIRST + b * s_fb + c, mask=ok, other=0)
            if ENDS_MODE == 2:  # ENDS_BLOCKS
                # (not named `i`: a name bound in both branches of `if j < NPC` must keep one shape)
                jb = tl.arange(0, NSB_POW2)
                bsum = tl.load(ENDS + pid.to(tl.int64) * NSB + jb, mask=jb < NSB, other=0)
                before = tl.sum(tl.where(jb < j * (BLOCK_C // SUM_BLOCK), bsum, 0), 0)
                start = nb + before + tl.cumsum(size, 0) - size
            else:
                start = nb + tl.load(ENDS + row + c, mask=ok, other=0) - size
            if CONTIG:
                base = first
            else:
                base = tl.load(PTR + b * s_pb + c, mask=ok, other=0)
            # a chunk's columns as a power-of-two head and the rest (8 + 1 at chunk 8, where one
            # tile of 16 left 7 of 16 lanes idle in every chunk: ncu found this kernel issue-bound)
            _chunk_columns(out, start, size, base, COLS + b * s_cb, 0, HEAD, CONTIG)
            if REST > 0:
                _chunk_columns(out, start, size, base, COLS + b * s_cb, HEAD, REST, CONTIG)
            if j == 0:
                if ENDS_MODE == 2:
                    total = tl.sum(bsum, 0)
                else:
                    total = tl.load(ENDS + row + C - 1)
                tl.store(OUT_LEN + pid, nb + total)
        else:
            i = (j - NPC) * BLOCK + tl.arange(0, BLOCK)
            tl.store(out + i, tl.load(BASE + b * s_bb + i, mask=i < nb, other=0), mask=i < nb)

    @triton.jit
    def _topk_union_kernel(
        S, KROW, PTR, SEL, SIZES, ENDS, CNT, NRED,
        s_pb,
        Hq, G, C,
        BLOCK: tl.constexpr, EARLY_EXIT: tl.constexpr, UNION: tl.constexpr, ENDS_MODE: tl.constexpr,
        BLOCK_C: tl.constexpr, SEARCH: tl.constexpr, STATS: tl.constexpr, STREAM: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # one program per (batch, query head). Its score row [C] stays in registers (BLOCK >= C),
        # or with STREAM is read tile by tile (BLOCK entries) at every pass: a few registers a
        # thread instead of the whole row, so that several programs share an SM, any C fits, and
        # each pass re-reads the row from L1/L2.
        # (UNION=False stops after step 2: benchmarks/select_kernel.py times the parts apart)
        # 1. the k-th largest score t: SEARCH_BISECT `kth_largest` (bisection over the bits of its
        #    key), SEARCH_INTERP `kth_interp` (interpolation, fewer reductions on smooth rows);
        # 2. pick score > t, plus the first k - count(> t) scores == t by chunk index (the
        #    reference's stable argsort), never -inf; write the pick as an int8 row. When the
        #    search knows count(s >= t) == k (`kth_interp`'s exact), that is s >= t: no reduction;
        # 3. the last program of each GQA group to finish (arrival counter, zeroed by the
        #    scores kernel) ORs the G rows (the union), writes each chunk's extra-column count
        #    and what the expansion kernel places chunks by (ENDS_MODE, see ENDS_PREFIX): the
        #    inclusive prefix sum over the row, or the sums of its blocks of BLOCK_C chunks (the
        #    expansion's blocks; a row-wide scan is the serial tail's largest part), or nothing.
        # STATS (tests, benchmarks): NRED[pid] = (reductions of the search, block reductions and
        # scans of steps 1-2 in all; a streamed pass counts as one).
        wait_for_previous(PDL)
        pid = tl.program_id(0)
        b = pid // Hq
        hq = pid % Hq
        grp = b * (Hq // G) + hq // G
        srow = S + pid.to(tl.int64) * C
        if STREAM:
            s = 0.0  # unused: every reduction streams the row
        else:
            s = score_tile(srow, C, 0, BLOCK)
        if SEARCH == 1:  # SEARCH_INTERP: the finite scores' count, min, max, sum, sum of squares at once
            n, s_min, s_max, s_sum, s_sq = row_stats(s, srow, C, STREAM, BLOCK)
            k = tl.minimum(tl.load(KROW + b).to(tl.int32), n)
            if k == 0:  # no pick: a threshold above every score (NaN if the max is +inf)
                t = key_float(float_key(s_max) + 1)
                exact = tl.full([], 1, tl.int32)
                steps = tl.full([], 0, tl.int32)
            else:
                mean = s_sum / n
                t, exact, steps = kth_interp(s, k, n, s_min, s_max, mean,
                                              tl.sqrt(tl.maximum(s_sq / n - mean * mean, 0.0)),
                                              srow, C, STREAM, BLOCK)
        else:
            # finite: s >= the lowest float (NaN scores, which q.k never gives, count as missing)
            k = tl.minimum(tl.load(KROW + b).to(tl.int32), row_count(s, srow, C, -3.4028234663852886e38, False, STREAM, BLOCK))
            t, steps = kth_largest(s, k, EARLY_EXIT, srow, C, STREAM, BLOCK)
            exact = tl.full([], 0, tl.int32)
        reductions = 1 + steps
        room = k
        ties = tl.full([], 0, tl.int32)
        if exact == 0:  # the tie rule needs count(> t) and whether ties straddle the k-th place
            n_eq = row_count(s, srow, C, t, True, STREAM, BLOCK)
            room = k - (row_count(s, srow, C, t, False, STREAM, BLOCK) - n_eq)
            ties = (n_eq > room).to(tl.int32)
            reductions += 2 + ties
        sel = SEL + pid.to(tl.int64) * C
        if STREAM:
            seen = tl.full([], 0, tl.int32)  # ties picked in earlier tiles
            for start in range(0, C, BLOCK):
                x = score_tile(srow, C, start, BLOCK)
                pick, seen = pick_top(x, t, exact, room, ties, seen)
                c = start + tl.arange(0, BLOCK)
                tl.store(sel + c, pick.to(tl.int8), mask=c < C)
        else:
            pick, _ = pick_top(s, t, exact, room, ties, tl.full([], 0, tl.int32))
            c = tl.arange(0, BLOCK)
            tl.store(sel + c, pick.to(tl.int8), mask=c < C)
        if STATS:
            tl.store(NRED + pid * 2, steps)
            tl.store(NRED + pid * 2 + 1, reductions)
        if UNION:
            tl.debug_barrier()  # every thread's row is stored before the arrival is counted
            arrived = tl.atomic_add(CNT + grp, 1, sem="acq_rel", scope="gpu")
            if arrived == G - 1:
                first = SEL + (b * Hq + (hq // G) * G).to(tl.int64) * C
                sizes = SIZES + grp.to(tl.int64) * C
                if STREAM:
                    carry = tl.full([], 0, tl.int32)  # ENDS_PREFIX: the sizes of earlier tiles
                    for start in range(0, C, BLOCK):
                        carry = _union_tile(first, PTR + b * s_pb, sizes, ENDS, grp, G, C, start, carry,
                                            BLOCK, ENDS_MODE, BLOCK_C)
                else:
                    _union_tile(first, PTR + b * s_pb, sizes, ENDS, grp, G, C, 0, 0, BLOCK, ENDS_MODE, BLOCK_C)

    @triton.jit
    def _union_kernel(SEL, THR, CUT, PTR, SIZES, ENDS, s_pb, Hq, G, C,
                      BLOCK: tl.constexpr, ENDS_MODE: tl.constexpr, BLOCK_C: tl.constexpr,
                      FROM_SCORES: tl.constexpr = False, PDL: tl.constexpr = False):
        # grid (B * Hkv, cdiv(C, BLOCK)): the GQA union of one group's pick rows on BLOCK chunks,
        # as the select kernel's tail writes it but spread over many programs (UNION_KERNEL;
        # no row-wide prefix sum, so ENDS_NONE or ENDS_BLOCKS). FROM_SCORES: SEL is the score
        # rows and each head's picks come from its threshold and tie cut (`window_select`)
        wait_for_previous(PDL)
        grp = tl.program_id(0)
        b = grp // (Hq // G)
        _union_tile(SEL + (grp * G).to(tl.int64) * C, PTR + b * s_pb, SIZES + grp.to(tl.int64) * C, ENDS, grp, G, C,
                    tl.program_id(1) * BLOCK, 0, BLOCK, ENDS_MODE, BLOCK_C, FROM_SCORES, THR + grp * G, CUT + grp * G)

    @triton.jit
    def _union_tile(first, ptr, sizes, ENDS, grp, G, C, start, carry,
                    BLOCK: tl.constexpr, ENDS_MODE: tl.constexpr, BLOCK_C: tl.constexpr,
                    FROM_SCORES: tl.constexpr = False, thr=None, cut=None):
        # the union tail on chunks [start, start + BLOCK): OR of the group's G pick rows (from
        # `first`, written by other programs: read past L1), sizes, and what the expansion places
        # chunks by (`carry`: the sizes before `start`, for ENDS_PREFIX; returned updated).
        # FROM_SCORES: `first` is the G score rows, a pick the finite scores > thr[g] and those
        # == thr[g] at chunks below cut[g]
        c = start + tl.arange(0, BLOCK)
        ok = c < C
        union = tl.zeros([BLOCK], dtype=tl.int32)
        for g in range(G):
            if FROM_SCORES:
                x = score_tile(first + g * C, C, start, BLOCK)
                t = tl.load(thr + g)
                picked = (x > float("-inf")) & ((x > t) | ((x == t) & (c < tl.load(cut + g))))
                union = union | picked.to(tl.int32)
            else:
                union = union | tl.load(first + g * C + c, mask=ok, other=0, cache_modifier=".cg").to(tl.int32)
        lo = tl.load(ptr + c, mask=ok, other=0)
        hi = tl.load(ptr + c + 1, mask=ok, other=0)
        size = tl.where(union != 0, hi - lo, 0)
        tl.store(sizes + c, size, mask=ok)
        if ENDS_MODE == 1:  # ENDS_PREFIX
            tl.store(ENDS + grp.to(tl.int64) * C + c, carry + tl.cumsum(size, 0), mask=ok)
        if ENDS_MODE == 2:  # ENDS_BLOCKS; size is 0 past C, so the last block needs no mask
            nbc = tl.cdiv(C, BLOCK_C)
            if BLOCK >= BLOCK_C:  # tiles start on block boundaries (BLOCK is a multiple)
                bsum = tl.sum(tl.reshape(size, [BLOCK // BLOCK_C, BLOCK_C]), axis=1)
                jb = start // BLOCK_C + tl.arange(0, BLOCK // BLOCK_C)
                tl.store(ENDS + grp.to(tl.int64) * nbc + jb, bsum, mask=jb < nbc)
            else:  # a row shorter than one block (one tile of BLOCK >= 16): one sum
                tl.store(ENDS + grp.to(tl.int64) * nbc, tl.sum(size, 0), mask=nbc > 0)  # C == 0: no room
        return carry + tl.sum(size, 0)


# blocks of chunks one scores program reads in turn (16-bit keys: 64 chunks a block at D >= 128,
# else 128), and for the int8 copy the chunks a block, blocks, warps and pipeline stages; a program
# takes several blocks only where the grid would otherwise hold at least STEPS_MIN_PROGRAMS_PER_SM
# programs an SM (NOTES.md, round 17: at 128K batch 8, 4 blocks of 128 scored the int8 copy in
# 40.5-41.1 us against 44.9 for one block of 256 and 48.6-48.9 for one of 128; at 32K batch 1, 232
# programs of one block, 3.2-3.3 us against 4.7 for 4 blocks). D = 64 (the default model) was not
# swept: it takes D = 128's settings. One block stayed fastest for 16-bit keys at batch 8.
SCORE_STEPS = 1
INT8_BLOCK_C = 128
INT8_STEPS = 4
INT8_WARPS = 4
INT8_STAGES = 3
STEPS_MIN_PROGRAMS_PER_SM = 8
# where the grid is large (as for STEPS), the int8 copy in one wave of programs,
# INT8_PROGRAMS_PER_SM an SM (what its registers and shared memory allow: ncu, round 22), each
# scoring one contiguous stretch of blocks: at 128K batch 8 the grid of 4 blocks a program ran 3.5
# waves, the last one part full; 38.7-39.3 us against 41.2-41.6 (NOTES.md round 22; A/B:
# INT8_PERSISTENT = False). The 16-bit cache's gathered columns lost that way (82.9-189.5 us
# against 67.3 at 128K batch 8), so SCORE_PERSISTENT stays off
INT8_PERSISTENT = True
INT8_PROGRAMS_PER_SM = 4
SCORE_PERSISTENT = False
SCORE_PROGRAMS_PER_SM = 4


def _scores_launch(query, key, gist_index, num_chunks, sizes=None, counters=None, scored=None,
                   keys8: Int8GistKeys | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """gist_index: [B, C] with num_chunks [B] (one list per batch row), or [B, Hkv, C] with
    num_chunks [B, Hkv] (one per KV head: H-GSA's candidates); scored: optional int32 [B * Hkv]
    to which each (batch, KV head) adds the gist keys it read. With keys8 (`gist_keys8`) the
    kernel reads that contiguous int8 copy instead of gathering `key`'s gist columns (gist_index
    then only gives C). out: float32 [B, Hq, C] to write (made here when None)."""
    B, Hq, D = query.shape
    Hkv = key.shape[1]
    C = gist_index.shape[-1]
    G = Hq // Hkv
    per_head = gist_index.dim() == 3
    s_gb, s_gh, s_gc = gist_index.stride() if per_head else (gist_index.stride(0), 0, gist_index.stride(1))
    s_nb, s_nh = num_chunks.stride() if per_head else (num_chunks.stride(0), 0)
    if out is None:
        out = torch.empty(B, Hq, C, dtype=torch.float32, device=query.device)
    words = 0 if counters is None else counters.numel() // (B * Hkv)
    if counters is not None and counters.numel() != words * B * Hkv:
        raise ValueError(f"counters of {counters.numel()} words do not split over {B} x {Hkv} (batch, KV head) rows")
    BLOCK_C, steps, warps, stages = 64 if D >= 128 else 128, SCORE_STEPS, 4, 2
    if keys8 is not None:
        if per_head or keys8.values.shape != (B, Hkv, C, D) or keys8.scale.shape != (B, Hkv, D):
            raise ValueError(f"Int8GistKeys of values {tuple(keys8.values.shape)} / scale {tuple(keys8.scale.shape)} "
                             f"do not fit {B} rows x {Hkv} KV heads x {C} chunks x {D} (one gist list per row)")
        if keys8.scale.stride(2) != 1:
            raise ValueError("Int8GistKeys.scale must be contiguous along the head dim")
        key, qscale = keys8.values, keys8.scale
        BLOCK_C, steps, warps, stages = INT8_BLOCK_C, INT8_STEPS, INT8_WARPS, INT8_STAGES
    blocks = triton.cdiv(C, BLOCK_C)
    total = B * Hkv * blocks
    persistent, per_sm = (INT8_PERSISTENT, INT8_PROGRAMS_PER_SM) if keys8 is not None else (
        SCORE_PERSISTENT, SCORE_PROGRAMS_PER_SM)
    sms = num_sms(query.device)
    slots = per_sm * sms
    few = total < STEPS_MIN_PROGRAMS_PER_SM * sms
    one_wave = persistent and not few
    if few:
        per = 1  # few programs already: each takes one block, all run at once
    elif one_wave:
        per = triton.cdiv(total, slots)  # one wave of programs, each a contiguous stretch
    else:
        per = max(1, min(steps, blocks))
    _gist_scores_kernel[(triton.cdiv(total, per),)](
        query, key, gist_index, num_chunks, out, out if sizes is None else sizes,
        out if counters is None else counters, out if scored is None else scored,
        out if keys8 is None else qscale,
        *query.stride(), *key.stride(), s_gb, s_gh, s_gc, s_nb, s_nh, *out.stride(),
        *((0, 0) if keys8 is None else qscale.stride()[:2]),
        Hkv, G, C, blocks, total, per, G_PAD=max(16, next_pow2(G)), D=D, BLOCK_C=BLOCK_C,
        # Triton's interpreter computes bf16 tl.dot wrongly: upcast there; fp32 inputs: no tf32
        DOT_F32=interpreting() and query.dtype == torch.bfloat16,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", ZERO_SIZES=sizes is not None,
        ZERO_CNT=words, ZERO_PAD=next_pow2(max(1, words)), COUNT=scored is not None, INT8=keys8 is not None, ONE=per == 1,
        # one wave wants every SM's slots at once: launched early, its programs would land on
        # the SMs the kernel before has left free (NOTES.md round 23)
        **pdl_launch(query.device, allow=not one_wave), num_warps=warps, num_stages=stages,
    )
    return out


def gist_scores_triton(query: torch.Tensor, key: torch.Tensor, gist_index: torch.Tensor,
                       num_chunks: torch.Tensor) -> torch.Tensor:
    """Fast path of `gist_scores_ref` (same contract; chunks >= num_chunks score -inf).

    Args:
        query: [B, Hq, D] bf16/fp16/fp32; key: [B, Hkv, T, D] same dtype.
        gist_index: long [B, C]; num_chunks: long [B].

    Returns:
        float32 [B, Hq, C].
    """
    return _scores_launch(query, key, gist_index, num_chunks)


# --------------------------------------------------------------------------- choosing


def choose_union(scores: torch.Tensor, plan: DecodePlan, num_kv_heads: int, config: GistConfig,
                 head_dim: int) -> torch.Tensor:
    """Per query head top-k (or top-p), union over each GQA group.

    Top-k uses torch.topk (radix select on CUDA) instead of the reference's full argsort;
    with distinct scores the chosen sets are the same (the reference breaks exact ties by the
    lower chunk index, topk in an unspecified order). Top-p runs the reference.

    Args:
        scores: float32 [B, Hq, C], -inf for missing chunks.
        head_dim: D (top-p's softmax temperature 1/sqrt(D), as the reference).

    Returns:
        bool [B, Hkv, C].
    """
    B, _, C = scores.shape
    if plan.k is None:
        chosen = choose_chunks(scores[:, :, None], top_p=config.top_p, scale=1.0 / math.sqrt(head_dim))
        return union_over_groups(chosen, num_kv_heads)[:, :, 0]
    k_max = max(1, min(plan.k_max, C))
    vals, idx = torch.topk(scores, k_max, dim=-1)
    rank = torch.arange(k_max, device=scores.device)
    keep = (rank[None, None, :] < plan.k[:, None, None]) & torch.isfinite(vals)
    selected = torch.zeros(B, num_kv_heads, C + 1, dtype=torch.bool, device=scores.device)
    idx = torch.where(keep, idx, C).reshape(B, num_kv_heads, -1)  # dropped picks land in a spill column
    selected.scatter_(2, idx, True)
    return selected[..., :C]


# --------------------------------------------------------------------------- index lists


def build_index_list_ref(plan: DecodePlan, selected: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the columns of base and of every selected chunk's extra, as a column mask.

    Args:
        plan: the step's plan.
        selected: bool [B, Hkv, C].
        seq_len: T.

    Returns:
        (int32 [B, Hkv, plan.capacity], int32 [B, Hkv]), columns ascending.
    """
    B, Hkv, _ = selected.shape
    device = selected.device
    mask = torch.zeros(B, Hkv, seq_len + 1, dtype=torch.bool, device=device)  # last column: spill
    nb = plan.base.shape[1]
    base_cols = torch.where(torch.arange(nb, device=device) < plan.base_len[:, None], plan.base.long(), seq_len)
    mask.scatter_(2, base_cols[:, None, :].expand(B, Hkv, nb), True)
    spill = torch.zeros(B, Hkv, 1, dtype=torch.bool, device=device)
    take = torch.gather(torch.cat([selected, spill], -1), 2, plan.chunk_of_col[:, None, :].expand(B, Hkv, -1))
    extra_cols = torch.where(take, plan.chunk_cols[:, None, :].long(), seq_len)
    mask.scatter_(2, extra_cols, True)
    return pack_columns(mask[..., :seq_len], plan.capacity)


# the select kernel's block sums (ENDS_BLOCKS) are over blocks of EXPAND_BLOCK_C chunks; each
# expansion program places EXPAND_CHUNKS_PER_PROGRAM chunks (a multiple: it adds the sums of the
# blocks before its own). Its work is a short chain of dependent loads (sizes -> offsets ->
# columns), so many small programs pay that latency once per wave: at 128K batch 8, 64 chunks a
# program took 25.3 us, 128 16.7, 256 15.8, 512 20.7; at batch 1 4.6 / 3.4 / 3.6 / 3.7 (NOTES.md, round 13)
EXPAND_BLOCK_C = 64
EXPAND_CHUNKS_PER_PROGRAM = 256
# where the plan's chunks are runs of consecutive columns (DecodePlan.contiguous) the expansion
# computes each chunk's columns from its first one instead of gathering them through its offset:
# the gather, the one load that waits on another, leaves that chain; off: always the CSR gather (A/B)
EXPAND_CONTIGUOUS = True
# what the select kernel's union tail writes for the expansion kernel to place chunks by:
# ENDS_NONE nothing (H-GSA reads the union flags only); ENDS_PREFIX the inclusive prefix sum of the
# sizes along C; ENDS_BLOCKS the sum of each block of EXPAND_BLOCK_C chunks, from which each
# expansion program computes its own block's start (the tail then skips its row-wide scan, the
# larger part of its ~12 us at 16K chunks: benchmarks/results/kernels/NOTES.md, rounds 6 and 9)
ENDS_NONE, ENDS_PREFIX, ENDS_BLOCKS = 0, 1, 2
# the fused path's choice (benchmarks/select_kernel.py times both, select + expansion: NOTES.md round 10)
ENDS_MODE = ENDS_BLOCKS


def ends_width(num_chunks: int, ends_mode: int) -> int:
    """The last dimension of the select kernel's `ends` output: C prefix sums (ENDS_PREFIX) or
    cdiv(C, EXPAND_BLOCK_C) block sums (ENDS_BLOCKS)."""
    return -(-num_chunks // EXPAND_BLOCK_C) if ends_mode == ENDS_BLOCKS else num_chunks


def _default_chunks_per_program(maxlen: int) -> int:
    """EXPAND_CHUNKS_PER_PROGRAM, fewer (down to EXPAND_BLOCK_C) where a chunk's columns are many:
    a program's tile of chunks x MAXLEN columns stays within the 4,096 entries that were timed
    (256 x 16 at chunk 8; before round 13, 64 x 64 at chunk 32 and up)."""
    fit = max(EXPAND_BLOCK_C, 4096 // maxlen // EXPAND_BLOCK_C * EXPAND_BLOCK_C)
    return min(EXPAND_CHUNKS_PER_PROGRAM, fit)


def _expand_launch(plan: DecodePlan, sizes: torch.Tensor, ends: torch.Tensor | None = None,
                   ends_mode: int = ENDS_PREFIX, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                   chunks_per_program: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sizes: int32 [B, Hkv, C] contiguous, each chunk's extra-column count where selected, else 0;
    ends: int32 [B, Hkv, ends_width(C, ends_mode)] contiguous, its inclusive prefix sum along C
    (ENDS_PREFIX; computed here when None) or its sums over blocks of EXPAND_BLOCK_C chunks
    (ENDS_BLOCKS); out: the list and lengths to write into (tests poison them), else new ones;
    chunks_per_program: a multiple of EXPAND_BLOCK_C (default `_default_chunks_per_program`).
    A chunk's columns are chunk_first[c] + t where the plan is `contiguous` (and EXPAND_CONTIGUOUS
    is on), else gathered from chunk_cols at chunk_ptr[c]; the same list either way."""
    assert ends_mode in (ENDS_PREFIX, ENDS_BLOCKS), ends_mode
    B, Hkv, C = sizes.shape
    if out is None:
        out = (torch.empty(B, Hkv, plan.capacity, dtype=torch.int32, device=sizes.device),
               torch.empty(B, Hkv, dtype=torch.int32, device=sizes.device))
    out, out_len = out
    # read at call time, so a benchmark that sets gist_select.EXPAND_CONTIGUOUS switches it;
    # not with C == 0, whose one stand-in chunk below has no chunk_first entry to load
    contig = EXPAND_CONTIGUOUS and plan.contiguous and plan.chunk_first is not None and C > 0
    if C == 0:  # nothing to expand: the base list alone
        sizes, ends = sizes.new_zeros(B, Hkv, 1), None
    if ends is None:
        ends, ends_mode = torch.cumsum(sizes, -1, dtype=torch.int32), ENDS_PREFIX
    C = sizes.shape[-1]
    longest = max(1, plan.max_chunk_len)
    maxlen = next_pow2(longest)
    head = 1 << (longest.bit_length() - 1)  # the largest power of two <= longest
    rest = next_pow2(longest - head) if longest > head else 0
    per = chunks_per_program or _default_chunks_per_program(maxlen)
    if per % EXPAND_BLOCK_C:
        raise ValueError(f"chunks_per_program must be a multiple of {EXPAND_BLOCK_C}, got {per}")
    BLOCK = 1024
    first = plan.chunk_first if contig else plan.chunk_ptr  # unread without CONTIG
    nsb = triton.cdiv(C, EXPAND_BLOCK_C)
    npc = triton.cdiv(C, per)
    _expand_kernel[(B * Hkv, npc + triton.cdiv(plan.nb_max, BLOCK))](
        plan.base, plan.base_len, plan.chunk_ptr, plan.chunk_cols, first, sizes, ends, out, out_len,
        plan.base.stride(0), plan.chunk_ptr.stride(0), plan.chunk_cols.stride(0), first.stride(0),
        out.stride(0), out.stride(1),
        Hkv, C, npc, nsb, BLOCK=BLOCK, BLOCK_C=per, SUM_BLOCK=EXPAND_BLOCK_C,
        HEAD=head, REST=rest, ENDS_MODE=ends_mode,
        NSB_POW2=next_pow2(nsb) if ends_mode == ENDS_BLOCKS else 1, CONTIG=contig,
        **pdl_launch(sizes.device), num_warps=4,
    )
    return out, out_len


def build_index_list_triton(plan: DecodePlan, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast path of `build_index_list_ref`: the same set (base first, then chunk by chunk) and
    the same lengths; entries past a row's length are left unwritten."""
    sizes = torch.where(selected, plan.chunk_size[:, None, :], 0).to(torch.int32).contiguous()
    return _expand_launch(plan, sizes)


# the select kernel holds one score row in registers up to this many chunks (128K tokens at chunk
# 8); longer rows stream through it `STREAM_TILE` scores at a time (`streams_rows`)
TOPK_MAX_CHUNKS = 16384
STREAM_TILE = 2048
STREAM_WARPS = 8
STREAM_ROWS = False
# the GQA union (OR of a group's pick rows, chunk sizes, block sums) in a launch of its own, UNION_TILE
# chunks a program, instead of by each group's last select program (`topk_union_launch`)
UNION_KERNEL = True
UNION_TILE = 512
# the select kernel's threshold search stops once it splits off exactly k (`kth_largest`)
EARLY_EXIT = True
# the select kernel's threshold search: SEARCH_BISECT, a bisection over the 32 bits of the score's
# key (`kth_largest`, one block reduction per bit, EARLY_EXIT), or SEARCH_INTERP, an interpolation
# on a normal fit of the row safeguarded by that bisection (`kth_interp`: fewer reductions on
# smooth rows, the same picks); benchmarks/select_kernel.py times both
SEARCH_BISECT, SEARCH_INTERP = 0, 1
SEARCH = SEARCH_INTERP  # 31.4 -> 22.7 us at 128K batch 1 (NOTES.md, round 11)
# the top-k where the union runs as a launch of its own, rows are longer than TOPK_MAX_CHUNKS (the
# search kernel would stream them) and fill at most half the SMs: `window_select` (a window from a
# sample of each row, its candidates resolved by the row's last program, rows split over programs)
# instead of `_topk_union_kernel`. On the H200 (NOTES.md round 24), select + union at 256K (29,126
# chunks, 32 heads): batch 1 20.8 against 37.7 us, batch 2 23.8 against 39.4; batch 4 (128 rows)
# 41.4 against 37.5, batch 8 68.9 against 64.8; at 128K, where the search holds its rows in
# registers, 16.8 against 14.3 at batch 1. A/B: False
WINDOW_SELECT = True


def select_counters(batch: int, num_heads: int, device: torch.device | str) -> torch.Tensor:
    """The select kernels' int32 counters for [batch, num_heads] score rows, for the scores launch
    to zero (`_scores_launch(counters=)`, COUNTER_WORDS a row: the window select's; the other
    kernel's union tail counts arrivals in the first batch x KV heads words)."""
    return torch.empty(batch * num_heads * COUNTER_WORDS, dtype=torch.int32, device=device)


def _ends_mode_or_default(ends_mode: int | None) -> int:
    """`ends_mode`, or ENDS_MODE when None: the module default read at call time, so a benchmark
    that sets gist_select.ENDS_MODE switches every launcher."""
    return ENDS_MODE if ends_mode is None else ends_mode


def topk_union_launch(scores: torch.Tensor, k: torch.Tensor, chunk_ptr: torch.Tensor, ptr_stride: int,
                      picks: torch.Tensor, sizes: torch.Tensor, ends: torch.Tensor | None, counters: torch.Tensor,
                      num_kv_heads: int, early_exit: bool | None = None, union: bool = True,
                      num_warps: int | None = None, ends_mode: int | None = None, search: int | None = None,
                      stats: torch.Tensor | None = None, stream: bool | None = None,
                      union_kernel: bool | None = None, window: bool | None = None) -> None:
    """Per query head the k best chunks and their GQA union over scores float32 [B, Hq, C]
    (contiguous) with k long [B], chunk_ptr the CSR offsets of each chunk's extra columns (row
    stride `ptr_stride`; 0 shares one row), into sizes int32 [B, Hkv, C], ends int32 [B, Hkv,
    ends_width(C, ends_mode)] contiguous (None: nothing written to place chunks by); counters int32
    (`select_counters`, zeroed by the scores launch; where the select kernel writes the union,
    each group's last arrival counts in the first B * Hkv words).

    window: `window_select` then the union kernel from the scores (default: WINDOW_SELECT's rule,
    where none of the other kernel's settings below is given; picks is then unwritten); else
    `_topk_union_kernel`, writing each head's picks int8 [B, Hq, C]:

    ends_mode: what ends receives, ENDS_PREFIX or ENDS_BLOCKS (default ENDS_MODE);
    early_exit: stop the bisection once it splits off exactly k (default EARLY_EXIT);
    search: SEARCH_BISECT or SEARCH_INTERP (default SEARCH);
    union=False writes the picks only; num_warps: default `_select_warps`; stats: int32 [B, Hq, 2]
    contiguous, or None: receives per head the threshold search's block reductions and those of
    the whole pick (step 1-2 of the kernel, scans included); stream: read the row tile by tile
    at every pass instead of holding it in registers (default `streams_rows`); union_kernel: the
    union in a launch of its own over many programs instead of each group's last select program
    (default UNION_KERNEL; not with ENDS_PREFIX, whose row-wide scan stays in the select kernel).
    The last eight are for benchmarks/select_kernel.py (and ends_mode, search, stats, stream,
    union_kernel for the tests)."""
    B, Hq, C = scores.shape
    mode = ENDS_NONE if ends is None else _ends_mode_or_default(ends_mode)
    separate = union and (UNION_KERNEL if union_kernel is None else union_kernel) and mode != ENDS_PREFIX
    if window and not separate:
        raise ValueError("the window select writes no pick rows: it needs the union as a launch of its own "
                         "(union=True, UNION_KERNEL, not ENDS_PREFIX)")
    if window is None:
        window = (separate and WINDOW_SELECT and C > TOPK_MAX_CHUNKS and 2 * B * Hq <= num_sms(scores.device)
                  and all(v is None for v in (early_exit, num_warps, search, stats, stream)))
    if stream is None:
        stream = streams_rows(C) and not window
    for name, tile, used in (("STREAM_TILE", STREAM_TILE, stream), ("UNION_TILE", UNION_TILE, separate)):
        if used and (tile < EXPAND_BLOCK_C or tile & (tile - 1)):
            raise ValueError(f"{name} must be a power of two >= {EXPAND_BLOCK_C} (block sums start on tile "
                             f"boundaries), got {tile}")
    if window:
        thresholds = torch.empty(B * Hq, dtype=torch.float32, device=scores.device)
        cuts = torch.empty(B * Hq, dtype=torch.int32, device=scores.device)
        window_select_launch(scores, k, counters, thresholds, cuts)
    else:
        _topk_union_launch(scores, k, chunk_ptr, ptr_stride, picks, sizes, ends, counters, num_kv_heads, early_exit,
                           union and not separate, num_warps, mode, search, stats, stream)
    if separate and C > 0:
        _union_kernel[(B * num_kv_heads, triton.cdiv(C, UNION_TILE))](
            scores if window else picks, thresholds if window else picks, cuts if window else picks,
            chunk_ptr, sizes, sizes if ends is None else ends, ptr_stride, Hq, Hq // num_kv_heads, C,
            BLOCK=UNION_TILE, ENDS_MODE=mode, BLOCK_C=EXPAND_BLOCK_C, FROM_SCORES=window,
            **pdl_launch(scores.device), num_warps=4,
        )


def _topk_union_launch(scores, k, chunk_ptr, ptr_stride, picks, sizes, ends, counters, num_kv_heads, early_exit,
                       union, num_warps, mode, search, stats, stream) -> None:
    """`_topk_union_kernel` over every row (`topk_union_launch`'s arguments; union: write the union
    by each group's last program)."""
    B, Hq, C = scores.shape
    block = STREAM_TILE if stream else max(16, next_pow2(C))
    _topk_union_kernel[(B * Hq,)](
        scores, k, chunk_ptr, picks, sizes, sizes if ends is None else ends, counters,
        counters if stats is None else stats,
        ptr_stride, Hq, Hq // num_kv_heads, C,
        BLOCK=block, EARLY_EXIT=EARLY_EXIT if early_exit is None else early_exit, UNION=union, ENDS_MODE=mode,
        BLOCK_C=EXPAND_BLOCK_C, SEARCH=SEARCH if search is None else search, STATS=stats is not None,
        STREAM=stream, **pdl_launch(scores.device),
        num_warps=num_warps or (STREAM_WARPS if stream else _select_warps(block)),
    )


def streams_rows(num_chunks: int) -> bool:
    """Whether the select kernel streams its score rows (`STREAM_TILE` at a time) rather than
    holding each in registers: always above TOPK_MAX_CHUNKS (a row no longer fits), and where
    STREAM_ROWS says so."""
    if num_chunks > TOPK_MAX_CHUNKS:
        return True
    return bool(STREAM_ROWS)


def _select_warps(block: int) -> int:
    """Warps of a select program by row length (4 to 16). Fewer warps for long rows were faster on
    random-normal scores and on the select kernel alone but slower inside the decode step: at 128K
    batch 8, 4 warps (two programs an SM, one wave instead of two) made the top-k 54.4 us against
    42.0 (round 13; round 7: 107.8 against 73.4 with the bisection; NOTES.md)."""
    return max(4, min(16, block // 1024))


def select_index_list_triton(query: torch.Tensor, key: torch.Tensor, layout: GistLayout, plan: DecodePlan,
                             config: GistConfig, fused_topk: bool | None = None,
                             ends_mode: int | None = None,
                             keys8: Int8GistKeys | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selecting layers' key list without a host sync, in four launches: scores (which also
    zero the select kernel's arrival counters) -> `_topk_union_kernel` (per query head the set of
    its k best chunks by a threshold search in registers) -> `_union_kernel` (the GQA union's
    chunk sizes and their sums per expansion block; with ends_mode=ENDS_PREFIX the last head of
    each group writes the sizes and their prefix sum instead, and there is no union launch;
    default ENDS_MODE) -> expansion.

    Above TOPK_MAX_CHUNKS chunks the select kernel streams its rows (`streams_rows`). With
    `fused_topk=False` the older path runs: scores (zeroing the size table) -> torch.topk -> mark
    kernel -> torch.cumsum -> expansion. Top-p goes through
    `choose_union`. Both top-k paths pick the reference's set (ties to the lower chunk index);
    torch.topk breaks exact ties in an unspecified order. keys8: score this int8 copy of the
    gist keys (`gist_keys8`) instead of `key`'s."""
    B, Hq, D = query.shape
    Hkv = key.shape[1]
    C = layout.gist_index.shape[1]
    if plan.k is None:
        scores = _scores_launch(query, key, layout.gist_index, layout.num_chunks, keys8=keys8)
        return build_index_list_triton(plan, choose_union(scores, plan, Hkv, config, D))
    if fused_topk is None:
        fused_topk = C > 0
    if fused_topk:
        ends_mode = _ends_mode_or_default(ends_mode)
        return _expand_launch(plan, *select_sizes_triton(query, key, layout, plan, ends_mode, keys8), ends_mode)
    sizes = torch.empty(B, Hkv, C, dtype=torch.int32, device=query.device)
    scores = _scores_launch(query, key, layout.gist_index, layout.num_chunks, sizes, keys8=keys8)
    k_max = max(1, min(plan.k_max, C))
    vals, idx = torch.topk(scores, k_max, dim=-1, sorted=not plan.uniform_k)
    _mark_kernel[(B * Hq,)](
        vals, idx, plan.k, plan.chunk_ptr, sizes,
        *vals.stride(), plan.chunk_ptr.stride(0),
        Hq, Hq // Hkv, C, k_max,
        BLOCK_K=min(1024, max(16, next_pow2(k_max))), USE_RANK=not plan.uniform_k, **pdl_launch(sizes.device),
        num_warps=4,
    )
    return _expand_launch(plan, sizes)


def select_rows_triton(query: torch.Tensor, key: torch.Tensor, gist_index: torch.Tensor, num_chunks: torch.Tensor,
                       k: torch.Tensor, chunk_ptr: torch.Tensor | None = None, sizes: bool = False,
                       keys8: Int8GistKeys | None = None) -> torch.Tensor:
    """`gsa_rag.selection.ChunkSelector` (top-k per query head, union over each GQA group) for the
    R query rows of one sequence (a question's tail rows), in the decode path's two launches:
    each row is scored and picked as a decode step's query is, the rows standing in for the batch
    over the one shared cache (its batch stride 0). The sets are the reference's up to the fp32
    rounding of near-ties (the kernel sums its dot products in another order): exact ties go to
    the lower chunk index, never a missing chunk.

    Args:
        query: [1, Hq, R, D] (any strides); key: [1, Hkv, T, D], the layer's cache.
        gist_index: long [1, C]; num_chunks: long [1], chunks that exist; k: long [R], chunks per
            query head (contiguous).
        chunk_ptr: int32 [C + 1], 0..C (made here when None; a forward passes one for every layer).

        sizes: return the select kernel's int32 [R, Hkv, C] union instead (nonzero where chosen:
            `gsa_rag.kernels.recall_mask` reads it as it is, one launch less).
        keys8: score this int8 copy of the gist keys (`gist_keys8`) instead of `key`'s.

    Returns:
        bool [1, Hkv, R, C] (a view).
    """
    if query.shape[0] != 1:
        raise ValueError(f"select_rows_triton takes the rows of one sequence, got a batch of {query.shape[0]}")
    _, Hq, R, _ = query.shape
    Hkv, C = key.shape[1], gist_index.shape[1]
    if chunk_ptr is None:
        chunk_ptr = torch.arange(C + 1, dtype=torch.int32, device=query.device)
    counters = torch.empty(R * Hkv, dtype=torch.int32, device=query.device)
    if keys8 is not None:  # the rows stand in for the batch over the one copy
        keys8 = Int8GistKeys(keys8.values.expand(R, -1, -1, -1), keys8.scale.expand(R, -1, -1))
    scores = _scores_launch(query[0].transpose(0, 1), key.expand(R, -1, -1, -1), gist_index.expand(R, -1),
                            num_chunks.expand(R), counters=counters, keys8=keys8)
    picks = torch.empty(R, Hq, C, dtype=torch.int8, device=query.device)
    union = torch.empty(R, Hkv, C, dtype=torch.int32, device=query.device)
    # with chunk_ptr 0..C a chosen chunk's size is 1: sizes is the union itself
    # the union by each group's last select program: a launch of its own per layer made a question
    # over gist memory slower (10.79 against 10.71 ms replayed, benchmarks/results/memory_ttft/r17)
    topk_union_launch(scores, k, chunk_ptr, 0, picks, union, None, counters, Hkv, union_kernel=False)
    return union if sizes else (union != 0).transpose(0, 1)[None]


def select_sizes_triton(query: torch.Tensor, key: torch.Tensor, layout: GistLayout, plan: DecodePlan,
                        ends_mode: int | None = None,
                        keys8: Int8GistKeys | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two launches of the fused path (scores, select kernel): int32 [B, Hkv, C] size
    of each chunk in the union (0 where not chosen) and int32 [B, Hkv, ends_width(C, ends_mode)]
    its inclusive prefix sum along C (ENDS_PREFIX) or its sums per EXPAND_BLOCK_C chunks
    (ENDS_BLOCKS); default ENDS_MODE."""
    B, Hq, _ = query.shape
    Hkv = key.shape[1]
    C = layout.gist_index.shape[1]
    ends_mode = _ends_mode_or_default(ends_mode)
    sizes = torch.empty(B, Hkv, C, dtype=torch.int32, device=query.device)
    ends = torch.empty(B, Hkv, ends_width(C, ends_mode), dtype=torch.int32, device=query.device)
    counters = select_counters(B, Hq, query.device)
    picks = torch.empty(B, Hq, C, dtype=torch.int8, device=query.device)
    scores = _scores_launch(query, key, layout.gist_index, layout.num_chunks, counters=counters, keys8=keys8)
    topk_union_launch(scores, plan.k, plan.chunk_ptr, plan.chunk_ptr.stride(0), picks, sizes, ends, counters, Hkv,
                      ends_mode=ends_mode)
    return sizes, ends


def block_sums(sizes: torch.Tensor) -> torch.Tensor:
    """Reference of ENDS_BLOCKS: int32 [..., C] -> int32 [..., cdiv(C, EXPAND_BLOCK_C)], the sum
    of each block of EXPAND_BLOCK_C entries (the last one short)."""
    C = sizes.shape[-1]
    nbc = ends_width(C, ENDS_BLOCKS)
    padded = torch.nn.functional.pad(sizes, (0, nbc * EXPAND_BLOCK_C - C))
    return padded.view(*sizes.shape[:-1], nbc, EXPAND_BLOCK_C).sum(-1, dtype=torch.int32)


def topk_union_triton(scores: torch.Tensor, plan: DecodePlan, num_kv_heads: int,
                      early_exit: bool | None = None, ends_mode: int | None = None, search: int | None = None,
                      stats: torch.Tensor | None = None, stream: bool | None = None,
                      union_kernel: bool | None = None, window: bool | None = None) -> torch.Tensor:
    """The fused top-k + GQA union alone, as `choose_union`'s bool [B, Hkv, C] (for tests): the
    chunks whose size the select kernel wrote nonzero (every chunk has at least its gist), from
    the pick rows where `_topk_union_kernel` wrote them. Checks what the kernel wrote to place
    chunks by (ends_mode, default ENDS_MODE) against torch, and its counters. search: the
    threshold search (default SEARCH); stats, stream, union_kernel, window: `topk_union_launch`'s."""
    B, Hq, C = scores.shape
    ends_mode = _ends_mode_or_default(ends_mode)
    sizes = torch.full((B, num_kv_heads, C), -1, dtype=torch.int32, device=scores.device)
    ends = torch.full((B, num_kv_heads, ends_width(C, ends_mode)), -1, dtype=torch.int32, device=scores.device)
    counters = select_counters(B, Hq, scores.device).zero_()
    picks = torch.full((B, Hq, C), -1, dtype=torch.int8, device=scores.device)
    topk_union_launch(scores.contiguous(), plan.k, plan.chunk_ptr, plan.chunk_ptr.stride(0), picks, sizes, ends,
                      counters, num_kv_heads, early_exit=early_exit, ends_mode=ends_mode, search=search, stats=stats,
                      stream=stream, union_kernel=union_kernel, window=window)
    assert bool((sizes >= 0).all())
    want = torch.cumsum(sizes, -1, dtype=torch.int32) if ends_mode == ENDS_PREFIX else block_sums(sizes)
    assert torch.equal(ends, want), ends_mode
    rows = counters.view(B * Hq, COUNTER_WORDS)
    if bool((picks == -1).all()) and C > 0:  # the window select: every part of a row arrived, every finite score counted
        assert torch.equal(rows[:, 3].cpu(), torch.isfinite(scores).sum(-1).flatten().int().cpu())
        assert bool((rows[:, 0] == rows[0, 0]).all()) and int(rows[0, 0]) >= 1
        return sizes != 0, sizes
    # every head of a group arrived where the select kernel wrote the union, else none counted
    arrived = counters[:B * num_kv_heads]
    assert bool((arrived == Hq // num_kv_heads).all()) or bool((arrived == 0).all())
    assert not bool(counters[B * num_kv_heads:].any())
    return picks.view(B, num_kv_heads, Hq // num_kv_heads, C).any(2), sizes


def select_index_list(query: torch.Tensor, key: torch.Tensor, layout: GistLayout, plan: DecodePlan,
                      config: GistConfig, layer_idx: int, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The key list of one decode step in one layer.

    Args:
        query: [B, Hq, D] the step's query (RoPE applied); key: [B, Hkv, T, D] the layer's cache.
        layout, plan: the step's layout and plan; config: the k policy.
        use_triton: the Triton fast path (else the torch references).

    Returns:
        (int32 [B, H, CAP], int32 [B, H]); H is 1 in layers that do not select (one list for all heads).
    """
    if layer_idx < config.first_selecting_layer or not config.uses_gists or not plan.selects:
        return plan.forget, plan.forget_len
    Hkv = key.shape[1]
    keys8 = gist_keys_of_layer(layout, layer_idx, key) if config.score_dtype == "int8" else None
    if use_triton:
        return select_index_list_triton(query, key, layout, plan, config, keys8=keys8)
    if keys8 is not None:
        scores = int8_gist_scores(query[:, :, None], keys8, layout.gist_valid)[:, :, 0]
    else:
        scores = gist_scores_ref(query, key, layout.gist_index, layout.gist_valid)
    selected = choose_union(scores, plan, Hkv, config, query.shape[-1])
    return build_index_list_ref(plan, selected, key.shape[2])
