"""Cached passage KV placed into a question's buffers, keys re-rotated on the way, in one pass.

A question over gist memory starts from buffers that hold every cached column of its prompt
(`GistMemory._assemble`): each passage was encoded at position 0, so its keys are rotated by the
offset where the passage now starts (RoPE rotations compose), and its values are copied as
they are. In torch that is a concatenation of the passages' tensors, a float32 rotation in
several elementwise passes and two index copies: 2.5 ms of device time at 20 passages of
Llama-3-8B shapes on an H200, more than the bytes need (330 MB read, 330 MB written: 0.16 ms at
4 TB/s). Here one kernel reads each source column once, straight from its passage's tensor (a
table of base addresses, so nothing is concatenated first), rotates keys in float32 registers,
and writes keys and values to their columns. Layers without RoPE (`rope_layers`: SmolLM3's and
Llama 4's NoPE layers) get their keys copied as they are: they carry no position.

Shapes: L layers, H KV heads, D head dim (even), N source columns, E source tensors (parts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from gsa_rag.kernels.dispatch import to_device

from gsa_rag.cache import partial_rope_message, rotate_half
from gsa_rag.errors import UnsupportedModelError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

KERNEL = True  # False: the reference everywhere (benchmarks/memory_ttft.py --no-place-kernel, for A/B runs)


def place_rotated_ref(keys: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, owner: torch.Tensor,
                      k_parts: Sequence[torch.Tensor], v_parts: Sequence[torch.Tensor], cos: torch.Tensor,
                      sin: torch.Tensor, rows: Sequence[int] | None = None, block_elements: int = 1 << 24,
                      rope_layers: Sequence[bool] | None = None) -> None:
    """Reference: writes the parts' columns into the buffers, keys rotated by their part's row.

    Args:
        keys, values: [L, 1, H, T, D] buffers, written at `columns`.
        columns: long [N], the buffer column of each source column (parts concatenated in order).
        owner: long [N], the part each source column comes from.
        k_parts, v_parts: E tensors [L, H, n_e, D] (sum of n_e = N).
        cos, sin: float32 [R, D] rotations (gsa_rag.cache.KeyRotator.cos_sin or .table).
        rows: the row of cos / sin that rotates each part (E ints in [0, R)); default: part e
            takes row e (R == E).
        block_elements: float32 elements rotated at a time (64 MiB), so the temporaries stay
            small however long the prompt.
        rope_layers: L bools, whether each layer applies RoPE (default: all); the keys of a layer
            without it are copied unrotated.
    """
    if len(columns) == 0:
        return
    nope = _nope_layers(rope_layers, keys.shape[0])
    nope = None if nope is None else nope.to(keys.device)
    if rows is not None:
        owner = torch.as_tensor(rows, dtype=torch.long)[owner.cpu()]  # each column's rotation row
    index, owner = torch.stack([columns.cpu(), owner.cpu()]).to(keys.device)
    k = torch.cat(list(k_parts), 2)
    L, H, _, D = k.shape
    block = max(1, block_elements // (L * H * D))
    for first in range(0, len(index), block):
        cols = slice(first, first + block)
        part = k[:, :, cols].float()
        rotated = part * cos[owner[cols]] + rotate_half(part) * sin[owner[cols]]
        if nope is not None:
            rotated[nope] = part[nope]
        keys[:, 0].index_copy_(2, index[cols], rotated.to(keys.dtype))
    values[:, 0].index_copy_(2, index, torch.cat(list(v_parts), 2).to(values.dtype))


def _nope_layers(rope_layers: Sequence[bool] | None, L: int) -> torch.Tensor | None:
    """The layers without RoPE as a long tensor (None: every layer rotates)."""
    if rope_layers is None:
        return None
    if len(rope_layers) != L:
        raise ValueError(f"rope_layers names {len(rope_layers)} layers for buffers of {L}")
    nope = [i for i, uses in enumerate(rope_layers) if not uses]
    return torch.tensor(nope, dtype=torch.long) if nope else None


def place_rotated(keys, values, columns, owner, k_parts, v_parts, cos, sin, rows=None, rope_layers=None) -> None:
    """`place_rotated_triton` where the kernels run (dispatch.use_kernels) and take the head dim,
    else `place_rotated_ref`."""
    from gsa_rag.kernels.dispatch import head_dim_fits, use_kernels

    if cos.shape[-1] != keys.shape[-1]:
        raise UnsupportedModelError(partial_rope_message(cos.shape[-1], keys.shape[-1]))
    if sin.shape != cos.shape:
        raise ValueError(f"cos and sin must share one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    parts = len(k_parts)
    if rows is None and cos.shape[0] != parts:
        raise ValueError(f"cos and sin hold {cos.shape[0]} rows for {parts} parts: give each part its row (rows=)")
    if rows is not None and (len(rows) != parts or (parts and not 0 <= min(rows) <= max(rows) < cos.shape[0])):
        raise ValueError(f"rows must name one of the {cos.shape[0]} rotations for each of the {parts} parts")
    if KERNEL and triton is not None and use_kernels(keys.device) and head_dim_fits(keys.shape[-1]):
        place_rotated_triton(keys, values, columns, owner, k_parts, v_parts, cos, sin, rows=rows, rope_layers=rope_layers)
    else:
        place_rotated_ref(keys, values, columns, owner, k_parts, v_parts, cos, sin, rows=rows, rope_layers=rope_layers)


if triton is not None:

    @triton.jit
    def _place_kernel(keys, values, k_table, v_table, strides, rot_rows, rope_flags, meta, cos, sin, N, E, H,
                      dst_l, dst_h, dst_t, D: tl.constexpr, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr,
                      ALIGN: tl.constexpr):
        """Grid (cdiv(N, BLOCK_N), L * H). meta: int64 [3, N] rows owner, column in its part,
        buffer column. k_table / v_table: int64 [E] base addresses; strides: int64 [3, E]
        (layer, head, column) in elements; rot_rows: int64 [E], each part's row of cos / sin;
        rope_flags: int64 [L], 0 for a layer without RoPE (keys copied as they are);
        WIDTH: bytes per element; ALIGN: 16 when every part's rows start on 16 bytes, else 1 (the
        compiler cannot see that in an address read from a table, and without it each element is
        a load of its own)."""
        lh = tl.program_id(1)
        layer = (lh // H).to(tl.int64)
        head = (lh % H).to(tl.int64)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = n < N
        part = tl.load(meta + n, mask=live, other=0)
        local = tl.load(meta + N + n, mask=live, other=0)
        column = tl.load(meta + 2 * N + n, mask=live, other=0)
        src = (layer * tl.load(strides + part, mask=live, other=0)
               + head * tl.load(strides + E + part, mask=live, other=0)
               + local * tl.load(strides + 2 * E + part, mask=live, other=0)) * WIDTH
        elem = keys.dtype.element_ty
        k_row = tl.multiple_of(tl.load(k_table + part, mask=live, other=0) + src, ALIGN).to(tl.pointer_type(elem))
        v_row = tl.multiple_of(tl.load(v_table + part, mask=live, other=0) + src, ALIGN).to(tl.pointer_type(elem))
        # rotate_half pairs element d of the first half with d of the second: load the halves apart
        h = tl.arange(0, D // 2)
        two_d = live[:, None]
        x1 = tl.load(k_row[:, None] + h[None, :], mask=two_d, other=0.0).to(tl.float32)
        x2 = tl.load(k_row[:, None] + (h + D // 2)[None, :], mask=two_d, other=0.0).to(tl.float32)
        rot = tl.load(rot_rows + part, mask=live, other=0)[:, None] * D
        c1 = tl.load(cos + rot + h[None, :], mask=two_d, other=0.0)
        c2 = tl.load(cos + rot + (h + D // 2)[None, :], mask=two_d, other=0.0)
        s1 = tl.load(sin + rot + h[None, :], mask=two_d, other=0.0)
        s2 = tl.load(sin + rot + (h + D // 2)[None, :], mask=two_d, other=0.0)
        if tl.load(rope_flags + layer) != 0:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        else:  # NoPE: an exact copy
            y1 = x1
            y2 = x2
        dst = layer * dst_l + head * dst_h + column[:, None] * dst_t
        tl.store(keys + dst + h[None, :], y1.to(elem), mask=two_d)
        tl.store(keys + dst + (h + D // 2)[None, :], y2.to(elem), mask=two_d)
        d = tl.arange(0, D)
        tl.store(values + dst + d[None, :], tl.load(v_row[:, None] + d[None, :], mask=two_d, other=0.0), mask=two_d)


def _part_table(k_parts: list[torch.Tensor], v_parts: list[torch.Tensor], rows: list[int], dtype: torch.dtype):
    """Each part's row of the kernel's table (K and V addresses, layer, head and column strides,
    rotation row), and whether every part's rows start on 16 bytes (its K and V addresses and its
    layer, head and column strides in bytes all multiples of 16: the kernel then loads 16 bytes at
    a time). A part the kernel cannot read
    as it is (another dtype, rows not contiguous, K and V strides differing) is copied first, in
    place in the lists. One pass of a few attribute reads a part: a question over 50 passages
    places about 100 parts, and this runs on the host before its launch."""
    table, aligned = [], True
    for i, (k, v, row) in enumerate(zip(k_parts, v_parts, rows, strict=True)):
        stride = k.stride()
        if k.dtype != dtype or v.dtype != dtype or v.stride() != stride or stride[-1] != 1:
            k = k_parts[i] = k.to(dtype).contiguous()
            v = v_parts[i] = v.to(dtype).contiguous()
            stride = k.stride()
        k_address, v_address = k.data_ptr(), v.data_ptr()
        width = k.element_size()
        aligned = aligned and not (k_address % 16 or v_address % 16) and all(st * width % 16 == 0 for st in stride[:3])
        table.append((k_address, v_address, stride[0], stride[1], stride[2], row))
    return table, aligned


def place_rotated_triton(keys: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, owner: torch.Tensor,
                         k_parts: Sequence[torch.Tensor], v_parts: Sequence[torch.Tensor], cos: torch.Tensor,
                         sin: torch.Tensor, rows: Sequence[int] | None = None, local: torch.Tensor | None = None,
                         block_n: int = 32, rope_layers: Sequence[bool] | None = None) -> None:
    """`place_rotated_ref` as one kernel (same arguments; `local`, long [N]: each column's index in
    its part, computed from `owner` when not given). Parts that are not laid out as the kernel
    reads them (another dtype, rows not contiguous, K and V strides differing) are copied first."""
    L, _, H, _, D = keys.shape
    if not (keys.is_contiguous() and values.is_contiguous() and values.shape == keys.shape and values.dtype == keys.dtype):
        raise ValueError("keys and values must be contiguous [L, 1, H, T, D] buffers of one shape and dtype")
    if D < 2 or D & (D - 1):
        raise ValueError(f"head dim {D}: the kernel takes a power of two (place_rotated_ref takes any even one)")
    rows = list(range(len(k_parts))) if rows is None else list(rows)
    if (cos.dim() != 2 or cos.shape[1] != D or sin.shape != cos.shape or len(rows) != len(k_parts)
            or (rows and not 0 <= min(rows) <= max(rows) < cos.shape[0])):
        raise ValueError(f"cos and sin must be [rotations, head dim {D}] with a row for each of the {len(k_parts)} parts, "
                         f"got {tuple(cos.shape)}, {tuple(sin.shape)} and {len(rows)} rows")
    N = len(columns)
    if N == 0:
        return
    _nope_layers(rope_layers, L)  # checks its length
    flags = [1] * L if rope_layers is None else [int(bool(uses)) for uses in rope_layers]
    k_parts, v_parts = list(k_parts), list(v_parts)
    per_part, aligned = _part_table(k_parts, v_parts, rows, keys.dtype)
    if local is None:
        lengths = torch.tensor([k.shape[2] for k in k_parts])
        starts = torch.cumsum(lengths, 0) - lengths
        local = torch.arange(N) - starts[owner.cpu()]
    # the host-side tables in one transfer: 3 rows of N, then 1 + 1 + 3 + 1 per part, then L rope flags
    E = len(k_parts)
    tables = torch.empty(3 * N + 6 * E + L, dtype=torch.int64)
    tables[:N], tables[N:2 * N], tables[2 * N:3 * N] = owner.cpu(), local.cpu(), columns.cpu()
    tables[3 * N:3 * N + 6 * E] = torch.tensor(per_part, dtype=torch.int64).t().flatten()  # k, v addresses, strides, rows
    tables[3 * N + 6 * E:] = torch.tensor(flags, dtype=torch.int64)
    tables = to_device(tables, keys.device)  # queued behind the buffers' fill, not waited for
    meta, part_table, rope_flags = tables[:3 * N], tables[3 * N:3 * N + 6 * E].view(6, E), tables[3 * N + 6 * E:]
    grid = (triton.cdiv(N, block_n), L * H)
    _place_kernel[grid](keys, values, part_table[0], part_table[1], part_table[2:5], part_table[5], rope_flags, meta,
                        cos.float().contiguous(), sin.float().contiguous(), N, E, H, keys.stride(0), keys.stride(2),
                        keys.stride(3), D=D, WIDTH=keys.element_size(), BLOCK_N=block_n,
                        ALIGN=16 if aligned else 1)
