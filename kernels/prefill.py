"""Prefill under the forgetting (gist) mask: FlexAttention with a BlockMask, keys optionally
permuted so that the recall columns (sink, gists, link tokens) are contiguous.

Why permute: in natural order a raw query sees its own and the previous chunk (a band along
the diagonal) plus every earlier gist, one column in c+1. Every key block left of the
diagonal then holds some visible gist columns, so the BlockMask is as full as the causal one
and FlexAttention computes (and masks) nearly all of T^2/2. With the recall columns moved to
the front, a query block needs the recall blocks before it (about T/(c+1) columns) and the
one or two raw blocks around its position: about (T/(c+1)) * T/2 + 2 * block * T pairs.
Attention is invariant to the order of keys (with values moved alike), and the rule is
evaluated on the original column (`perm[kv]`), so the output is the same function.

Reference: the dense mask (`gsa_rag.masks.dense_gist_mask`) and SDPA.

Two entry points:
- `gist_prefill`: the whole layout prefilled (queries are columns 0..T-1), the rule evaluated
  in the mask_mod; query [B, Hq, T, D], key/value [B, Hkv, T, D] -> [B, Hq, T, D]
  (benchmarks/prefill.py times one layer of it).
- `masked_prefill_plan` / `masked_prefill`: any rows under a mask the caller holds, or makes a
  band of rows at a time (the engine's forgetting mask, `gsa_rag.attention`), so the output is
  that mask's attention by construction. Rows and keys are padded to whole blocks and FlexAttention is compiled with
  dynamic shapes: after the second length, prompts of any length share the compiled kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gsa_rag.kernels.dispatch import config_patch

from gsa_rag.layout import GistLayout
from gsa_rag.masks import dense_gist_mask, visible

_compiled_flex = {}


def _flex(dynamic: bool = False):
    """flex_attention compiled (eager FlexAttention is a slow reference path that builds every
    score), once per `dynamic`: fixed shapes for the layer benchmark, dynamic for the engine."""
    from torch.nn.attention.flex_attention import flex_attention

    if dynamic not in _compiled_flex:
        _compiled_flex[dynamic] = torch.compile(flex_attention, dynamic=dynamic)
    return _compiled_flex[dynamic]


def gist_prefill_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: GistLayout,
                     num_previous_chunks: int, scale: float | None = None) -> torch.Tensor:
    """Reference: the dense forgetting mask through SDPA (math), GQA by repetition."""
    mask = dense_gist_mask(layout, num_previous_chunks)[:, None]  # [B, 1, T, T]
    G = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def front_columns(layout: GistLayout) -> torch.Tensor:
    """bool [B, T]: the key columns to move to the front, those seen far from the diagonal: sink,
    links and top-level gists. A lower level's gist (H-GSA) is seen only inside its own section,
    near the diagonal; in front it would leave partial blocks in every row block, a number that
    grows with the square of the length (tests/test_prefill_flex.py)."""
    return layout.is_sink | layout.is_link | (layout.is_gist & (layout.level == layout.levels - 1))


def recall_first_order(layout: GistLayout) -> torch.Tensor:
    """long [B, T]: key columns with the front columns (`front_columns`) first, each group in
    column order."""
    return front_first(front_columns(layout))


def front_first(front: torch.Tensor) -> torch.Tensor:
    """long [B, T]: the columns where `front` (bool [B, T]) holds first, then the others, each
    group in column order."""
    T = front.shape[-1]
    cols = torch.arange(T, device=front.device)
    return torch.argsort((~front).long() * T + cols, dim=-1)


def gist_prefill_block_mask(layout: GistLayout, num_previous_chunks: int, perm: torch.Tensor | None = None,
                            block_size: int = 128):
    """BlockMask of the forgetting rule over keys in `perm` order (natural order when None)."""
    from torch.nn.attention.flex_attention import create_block_mask

    P = num_previous_chunks

    if perm is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return visible(layout, b, q_idx, kv_idx, P, layout.is_gist[b, kv_idx])
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            kv = perm[b, kv_idx]
            return visible(layout, b, q_idx, kv, P, layout.is_gist[b, kv])

    T = layout.seq_len
    return create_block_mask(mask_mod, B=layout.batch_size, H=None, Q_LEN=T, KV_LEN=T,
                             device=layout.input_ids.device, BLOCK_SIZE=block_size)


def gist_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: GistLayout,
                 num_previous_chunks: int, scale: float | None = None, permute: bool = True,
                 block_mask=None, perm: torch.Tensor | None = None, block_size: int = 128) -> torch.Tensor:
    """FlexAttention under the forgetting mask.

    Args:
        query: [B, Hq, T, D]; key, value: [B, Hkv, T, D] (fp32/bf16/fp16).
        layout: the sequence (all T columns are queries).
        permute: move the recall columns to the front (see the module docstring).
        block_mask, perm: a plan from `gist_prefill_block_mask` / `recall_first_order` to reuse
            across layers (built here when None).
        block_size: FlexAttention's block (128 on the GPU; small for CPU tests).

    Returns:
        [B, Hq, T, D] in query's dtype.
    """
    from torch.nn.attention.flex_attention import flex_attention

    if permute:
        perm = recall_first_order(layout) if perm is None else perm
        idx = perm[:, None, :, None].expand(key.shape[0], key.shape[1], -1, key.shape[3])
        key, value = torch.gather(key, 2, idx), torch.gather(value, 2, idx)
    else:
        perm = None
    if block_mask is None:
        block_mask = gist_prefill_block_mask(layout, num_previous_chunks, perm, block_size)
    fn = _flex() if query.is_cuda else flex_attention
    return fn(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])


# rows of the mask (over the batch) pooled into blocks at a time: bounds the band's transient memory
_POOL_ROWS = 4096
# MaskedPrefillPlan.block_of for blocks the mask leaves empty / fills / fills in part; a partial
# block's entry in the table is its own (>= PARTIAL)
EMPTY, FULL, PARTIAL = 0, 1, 2
# A mask whose every row (keys permuted) is at most RUNS runs of consecutive keys is kept as the
# runs' bounds: the kernel's mask_mod then compares a key with its row's bounds, which it loads
# once per row of a tile, instead of looking each pair up in the partial-block table (two
# dependent loads a pair). The forgetting mask has 2 runs a row (recall prefix, raw window),
# H-GSA 32x up to 5. On an H200 one 32K layer of the default model's shapes took 0.70 ms
# against the table's 1.81 (4.63 at 128 x 128 tiles); dense causal flash 2.59.
RUNS = 8
# FlexAttention's tiles (BLOCK_M, BLOCK_N) for the compiled kernel, by head dim; other head dims
# take FlexAttention's own. On the same H200 layer (head dim 64) 64 x 64 took 0.70 ms against
# 1.97 with its own (the runs) and 1.81 against 4.63 (the table); for Llama-3-8B's head dim 128
# its own were faster (a whole 8-layer 32K prefill 314.8 against 346.1 ms at 64 x 64;
# benchmarks/results/engine_prefill/)
FLEX_TILES = {64: (64, 64)}


@dataclass
class MaskedPrefillPlan:
    """What `masked_prefill` needs for one mask, built once and shared by every layer.

    The mask is kept only in the form the kernel's mask_mod reads, which it evaluates in the
    blocks the mask fills in part. Where every row is at most `RUNS` runs of consecutive keys
    (keys permuted), as the runs' bounds: row q sees key kv where starts[b, q, j] <= kv <
    ends[b, q, j] for some j. Otherwise as a table of the partial blocks: the pair's value is
    partial[block_of[b, q // block, kv // block], q % block, kv % block]. A whole [R, T] mask
    read by the kernel would also pass 2^31 elements (46K tokens), past which the compiled
    kernel's indices overflow.

    Attributes:
        block_mask: FlexAttention's BlockMask over the padded rows and the permuted, padded keys.
        block_of: int32 [B, row blocks, key blocks]: EMPTY, FULL, or for a block the mask fills
            in part PARTIAL (runs) or its entry in `partial` (>= PARTIAL, the table).
        runs: int32 [B, rows_padded, RUNS, 2], each row's runs (start, end), unused ones (0, 0);
            None where a row has more runs.
        partial: bool [2 + N, block, block] where `runs` is None (else None): an empty block, a
            full one, then the N partial blocks' pairs (keys in `perm` order, padding False), so
            that the mask_mod is right at every pair (eager FlexAttention evaluates it
            everywhere; the compiled kernel only in partial blocks).
        perm: long [B, keys_padded], the key column each position reads (padding reads column 0,
            which the mask hides); None keeps natural order.
        rows, keys: the unpadded sizes.
        block_size: the BlockMask's block.
    """

    block_mask: object
    block_of: torch.Tensor
    runs: torch.Tensor | None
    partial: torch.Tensor | None
    perm: torch.Tensor | None
    rows: int
    keys: int
    block_size: int

    def dense(self) -> torch.Tensor:
        """bool [B, rows_padded, keys_padded]: the mask as the compiled kernel sees it: its
        mask_mod in the partial blocks, every pair of a full block, none of an empty one
        (tests, debugging)."""
        B, nq, nk = self.block_of.shape
        bs = self.block_size
        device = self.block_of.device
        b = torch.arange(B, device=device)[:, None, None]
        q = torch.arange(nq * bs, device=device)[None, :, None]
        kv = torch.arange(nk * bs, device=device)[None, None, :]
        pairs = self.block_mask.mask_mod(b, None, q, kv)
        kind = self.block_of.repeat_interleave(bs, 1).repeat_interleave(bs, 2)
        return torch.where(kind == FULL, True, torch.where(kind == EMPTY, False, pairs))


def masked_prefill_plan(mask: torch.Tensor | Callable[[int, int], torch.Tensor], recall: torch.Tensor | None = None,
                        block_size: int = 128, size: tuple[int, int, int] | None = None) -> MaskedPrefillPlan:
    """The BlockMask of a dense mask, keys optionally moved recall-first.

    Args:
        mask: bool [B, R, T], which keys each query row sees (every row must see at least one key);
            or rows(lo, hi) -> bool [B, hi - lo, T], asked for a band of rows at a time, so that the
            whole mask is never held (then `size` gives (B, R, T)).
        recall: bool [B, T], key columns to move to the front (`front_columns`: sink, links, top-level gists), the columns
            seen far from the diagonal, so that the blocks they fill are few. None: natural order.
        block_size: FlexAttention's block (128 on the GPU).
    """
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(mask, torch.Tensor):
        size = mask.shape
        rows_of = lambda lo, hi: mask[:, lo:hi]
    else:
        rows_of = mask
    B, R, T = size
    bs = block_size
    nq, nk = -(-R // bs), -(-T // bs)
    perm = None
    if recall is not None:
        perm = torch.zeros(B, nk * bs, dtype=torch.long, device=recall.device)  # padding reads column 0 (masked)
        perm[:, :T] = front_first(recall)
    # bands of about _POOL_ROWS rows over the whole batch, whole row blocks each
    band = max(bs, _POOL_ROWS // (bs * B) * bs)
    bands = [(lo, min(R, lo + band)) for lo in range(0, R, band)]
    runs = _runs_of_mask(rows_of, bands, perm, B, nq * bs)
    if runs is not None:
        any_seen, full = _blocks_of_runs(runs, nk, bs)
        block_of = torch.where(full, FULL, torch.where(any_seen, PARTIAL, EMPTY)).to(torch.int32)
        # [B, rows * RUNS], and RUNS read as the module's constant: a dimension (or a captured
        # int) of 8 would share its size symbol with a batch of 8 in the compiled kernel (duck
        # sizing), which the loop would then fix at 8, and the next batch size would compile again
        starts, ends = (runs[..., i].reshape(B, -1).contiguous() for i in (0, 1))
        partial = None

        def mask_mod(b, h, q_idx, kv_idx):
            first = q_idx * RUNS
            seen = (kv_idx >= starts[b, first]) & (kv_idx < ends[b, first])
            for j in range(1, RUNS):
                seen = seen | ((kv_idx >= starts[b, first + j]) & (kv_idx < ends[b, first + j]))
            return seen
    else:  # asks again for the bands the runs had read (a mask of many runs a row is rare in the engine)
        any_seen, full, block_of, partial = _partial_blocks_of_mask(rows_of, bands, perm, B, nq, nk, bs)

        def mask_mod(b, h, q_idx, kv_idx):
            return partial[block_of[b, q_idx // bs, kv_idx // bs], q_idx % bs, kv_idx % bs]

    def lists(which: torch.Tensor):
        # per row block: how many key blocks, and which (first), as BlockMask.from_kv_blocks wants
        n = which.sum(-1, dtype=torch.int32)
        order = torch.argsort((~which).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return n[:, None], order[:, None]

    block_mask = BlockMask.from_kv_blocks(*lists(any_seen & ~full), *lists(full), BLOCK_SIZE=bs,
                                          mask_mod=mask_mod, seq_lengths=(nq * bs, nk * bs))
    return MaskedPrefillPlan(block_mask, block_of, runs, partial, perm, R, T, bs)


def _permuted(rows: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """A band's rows (bool [B, rows, T]) with the keys in `perm` order."""
    if perm is None:
        return rows
    return torch.gather(rows, 2, perm[:, None, : rows.shape[2]].expand(-1, rows.shape[1], -1))


def _runs_of_mask(rows_of, bands, perm, B: int, rows_padded: int) -> torch.Tensor | None:
    """int32 [B, rows_padded, RUNS, 2]: each row's runs of seen keys (keys permuted) as (start,
    end), unused ones (0, 0), padding rows none; None as soon as a row holds more than RUNS."""
    runs = None
    for lo, hi in bands:
        rows = _permuted(rows_of(lo, hi), perm)
        if runs is None:
            runs = torch.zeros(B, rows_padded, RUNS, 2, dtype=torch.int32, device=rows.device)
        edges = F.pad(rows, (1, 1))
        b, r, col = (edges[..., 1:] != edges[..., :-1]).nonzero(as_tuple=True)  # a run's start, then its end
        del rows, edges
        row = b * (hi - lo) + r
        per_row = torch.bincount(row, minlength=B * (hi - lo))
        if per_row.numel() and int(per_row.max()) > 2 * RUNS:
            return None
        # the edges come row by row, in column order: each one's rank within its row
        rank = torch.arange(row.numel(), device=row.device) - (torch.cumsum(per_row, 0) - per_row)[row]
        band = torch.zeros(B * (hi - lo), 2 * RUNS, dtype=torch.int32, device=row.device)
        band[row, rank] = col.to(torch.int32)
        runs[:, lo:hi] = band.view(B, hi - lo, RUNS, 2)
    return runs


def _blocks_of_runs(runs: torch.Tensor, nk: int, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, row blocks, nk] twice: the blocks some row sees a key of, and those every row of
    the row block sees whole. A row sees a block whole only within one run (runs are maximal, so
    two never meet), so a block is full where all `bs` rows have a run covering it; each row's
    runs add +1 where their touched (or covered) blocks begin and -1 past their end, summed along
    the keys."""
    B, Rp = runs.shape[:2]
    nq = Rp // bs
    start, end = runs[..., 0].long(), runs[..., 1].long()  # [B, Rp, RUNS]
    used = end > start
    row_block = (torch.arange(Rp, device=runs.device) // bs)[None, :, None].expand_as(start)
    base = (torch.arange(B, device=runs.device)[:, None, None] * nq + row_block) * (nk + 1)

    def count(first: torch.Tensor, past: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        diff = torch.zeros(B * nq * (nk + 1), dtype=torch.int32, device=runs.device)
        ones = where.to(torch.int32)
        diff.scatter_add_(0, (base + first).flatten(), ones.flatten())
        diff.scatter_add_(0, (base + past).flatten(), -ones.flatten())
        return diff.view(B, nq, nk + 1).cumsum(-1)[..., :nk]

    touched = count(start // bs, (end - 1) // bs + 1, used)
    first_whole, past_whole = -(-start // bs), end // bs
    covered = count(first_whole.clamp(max=nk), past_whole.clamp(max=nk), used & (past_whole > first_whole))
    return touched > 0, covered == bs


def _partial_blocks_of_mask(rows_of, bands, perm, B: int, nq: int, nk: int, bs: int):
    """For a mask with rows of many runs: (any_seen, full, block_of, partial) as
    MaskedPrefillPlan keeps them, pooled a band at a time."""
    any_seen = full = block_of = None
    count = 2
    for lo, hi in bands:
        rows = _permuted(rows_of(lo, hi), perm)
        device = rows.device
        if any_seen is None:
            any_seen = torch.zeros(B, nq, nk, dtype=torch.bool, device=device)
            full = torch.zeros_like(any_seen)
            block_of = torch.full((B, nq, nk), EMPTY, dtype=torch.int32, device=device)
            partial = [torch.zeros(1, bs, bs, dtype=torch.bool, device=device),
                       torch.ones(1, bs, bs, dtype=torch.bool, device=device)]
        q0, q1 = lo // bs, -(-hi // bs)
        band = torch.zeros(B, (q1 - q0) * bs, nk * bs, dtype=torch.bool, device=device)
        band[:, : rows.shape[1], : rows.shape[2]] = rows
        del rows
        blocks = band.view(B, q1 - q0, bs, nk, bs).transpose(2, 3)  # [B, row blocks, key blocks, bs, bs]
        seen, filled = blocks.any(-1).any(-1), blocks.all(-1).all(-1)
        any_seen[:, q0:q1], full[:, q0:q1] = seen, filled
        some = seen & ~filled
        ids = count + torch.cumsum(some.flatten(), 0).view_as(some).to(torch.int32) - 1
        block_of[:, q0:q1] = torch.where(some, ids, torch.where(filled, FULL, EMPTY))
        partial.append(blocks[some])  # in (batch, row block, key block) order, as the ids count
        count += partial[-1].shape[0]
    partial = torch.cat(partial)
    if partial.numel() >= 2**31:  # the compiled kernel indexes it with 32 bits
        raise ValueError(f"the mask has {partial.shape[0] - 2} partial blocks of {bs}x{bs}: too many for "
                         "FlexAttention's 32-bit indices; take SDPA (gsa_rag.attention.FLEX_PREFILL = False)")
    return any_seen, full, block_of, partial


def _tiles(head_dim: int, block_size: int) -> dict:
    """FlexAttention's kernel_options for `FLEX_TILES`: none where they would not divide the
    BlockMask's block (a small block in tests)."""
    tiles = FLEX_TILES.get(head_dim)
    if tiles is None or any(block_size % n for n in tiles):
        return {}
    return {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}


def masked_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: MaskedPrefillPlan,
                   scale: float | None = None, compiled: bool | None = None) -> torch.Tensor:
    """Attention of query rows under the plan's mask through FlexAttention.

    Args:
        query: [B, Hq, R, D]; key, value: [B, Hkv, T, D], in natural column order.
        plan: `masked_prefill_plan` of the [B, R, T] mask.
        compiled: compiled FlexAttention (dynamic shapes); default on CUDA. Eager elsewhere:
            a reference that evaluates the mask_mod on every pair and ignores the blocks.

    Returns:
        [B, Hq, R, D] in query's dtype.
    """
    from torch.nn.attention.flex_attention import flex_attention

    B, Hq, R, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    if (R, T) != (plan.rows, plan.keys):
        raise ValueError(f"the plan is for {plan.rows} rows over {plan.keys} keys, got {R} over {T}")
    Rp, Tp = (n * plan.block_size for n in plan.block_of.shape[1:])
    if plan.perm is None:  # F.pad copies: K/V always reach the kernel contiguous
        key, value = F.pad(key, (0, 0, 0, Tp - T)), F.pad(value, (0, 0, 0, Tp - T))
    else:
        idx = plan.perm[:, None, :, None].expand(B, Hkv, Tp, D)
        key, value = torch.gather(key, 2, idx), torch.gather(value, 2, idx)
    # always a fresh contiguous copy: a strided view (rows sliced off a longer forward) would be
    # another input layout to compile for
    padded = query.new_zeros(B, Hq, Rp, D)
    padded[:, :, :R] = query
    if compiled is None:
        compiled = query.is_cuda
    if not compiled:
        return flex_attention(padded, key, value, block_mask=plan.block_mask, scale=scale, enable_gqa=Hq != Hkv)[:, :, :R]
    # past its recompile limit torch.compile would run FlexAttention eagerly, silently: on CUDA that
    # computes every score (out of memory at long prefills); raising lets the caller fall back
    with config_patch(torch._dynamo.config, fail_on_recompile_limit_hit=True):
        out = _flex(dynamic=True)(padded, key, value, block_mask=plan.block_mask, scale=scale, enable_gqa=Hq != Hkv,
                                  kernel_options=_tiles(D, plan.block_size))
    return out[:, :, :R]
