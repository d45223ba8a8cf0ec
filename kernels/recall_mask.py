"""A question's tail-row mask for one layer in one launch: base | (gate & chosen chunk).

Per layer, the tail rows of a forward see `base` (what they see without recall) plus, where
`gate` allows it, every column of a closed chunk that their KV head chose
(`gsa_rag.attention.GistState.layer_mask`). In torch that is five small launches per layer
(the chosen flags from the select kernel's sizes, a gather of them by each column's chunk, the
closed-column AND, the gate AND and the base OR), each a few microseconds of mostly fixed
latency on a GPU; here it is one, reading the select kernel's sizes as they are.

Shapes: Hkv KV heads, R tail rows, T columns, C chunks. One sequence (batch 1), as the select
kernel path that feeds it.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def tail_mask_ref(sizes: torch.Tensor, base: torch.Tensor, gate: torch.Tensor, chunk_of: torch.Tensor) -> torch.Tensor:
    """Reference.

    Args:
        sizes: int [R, Hkv, C], nonzero where the KV head's rows chose the chunk (the select
            kernel's union sizes; `gsa_rag.kernels.gist_select.select_rows_triton(sizes=True)`).
        base, gate: bool [1, 1, R, T]; gate already false on columns no chunk unfolds (open
            chunks, sink, links: `masks.UnfoldRecall.closed`).
        chunk_of: int [T], each column's chunk (any value in [0, C) where gate is false).

    Returns:
        bool [1, Hkv, R, T].
    """
    chosen = (sizes != 0).transpose(0, 1)  # [Hkv, R, C]
    unfolded = torch.gather(chosen, 2, chunk_of.long().expand(*chosen.shape[:2], -1))
    return (base | (gate & unfolded[None]))


def tail_mask_triton(sizes: torch.Tensor, base: torch.Tensor, gate: torch.Tensor, chunk_of: torch.Tensor,
                     block: int = 1024) -> torch.Tensor:
    """`tail_mask_ref` in one launch (same arguments; base and gate any strides with unit column
    stride, chunk_of contiguous int32)."""
    R, Hkv, _ = sizes.shape
    T = base.shape[-1]
    if base.shape != (1, 1, R, T) or gate.shape != base.shape or chunk_of.shape != (T,):
        raise ValueError(f"base and gate must be [1, 1, {R}, T] and chunk_of [T], got {tuple(base.shape)}, "
                         f"{tuple(gate.shape)} and {tuple(chunk_of.shape)}")
    if base.stride(-1) != 1 or gate.stride(-1) != 1 or chunk_of.dtype != torch.int32 or not chunk_of.is_contiguous():
        raise ValueError("base and gate need unit column strides and chunk_of must be contiguous int32")
    out = torch.empty(1, Hkv, R, T, dtype=torch.bool, device=base.device)
    if R == 0 or T == 0:
        return out
    _tail_mask_kernel[(Hkv * R, triton.cdiv(T, block))](
        sizes, base.view(torch.uint8), gate.view(torch.uint8), chunk_of, out.view(torch.uint8),
        *sizes.stride(), base.stride(2), gate.stride(2), R, T, BLOCK=block, num_warps=4,
    )
    return out


if triton is not None:

    @triton.jit
    def _tail_mask_kernel(SIZES, BASE, GATE, CHUNK, OUT, s_sr, s_sh, s_sc, s_br, s_gr, R, T, BLOCK: tl.constexpr):
        # grid (Hkv * R, cdiv(T, BLOCK)): BLOCK columns of one (KV head, row)
        pid = tl.program_id(0)
        h = pid // R
        r = pid % R
        t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = t < T
        gate = tl.load(GATE + r * s_gr + t, mask=ok, other=0) != 0
        c = tl.load(CHUNK + t, mask=ok, other=0)
        # only gated columns read their chunk's flag (the rest need not name a chunk)
        chosen = tl.load(SIZES + r * s_sr + h * s_sh + c * s_sc, mask=ok & gate, other=0) != 0
        seen = (tl.load(BASE + r * s_br + t, mask=ok, other=0) != 0) | (gate & chosen)
        tl.store(OUT + pid.to(tl.int64) * T + t, seen.to(tl.uint8), mask=ok)
