"""Split-K attention of a few query rows over a whole cache under a dense mask.

The first forward of a question over gist memory runs tens of rows (link and question tokens)
against the whole assembled cache, each (row, KV head) seeing its own subset of the keys
(`gsa_rag.attention.LayerMask`). SDPA runs such a call as one program per (head, block of query
rows) that walks every key, so a few rows use a few of the GPU's SMs (151 us a layer at 20
passages on an H200, `benchmarks/question_attention.py`, round 12). Here the keys are split as
well, as in flash-decode:

- grid (B * Hkv * row blocks, splits). The G query heads of a KV head are folded into its rows
  (folded row f = g * R + r is query head h * G + g, row r), so each K/V tile is loaded once per
  block of BLOCK_M folded rows and serves every query head that shares it (GQA);
- each program keeps an online softmax (running max m, sum l, unnormalised acc) over its split
  of the keys, reading the mask tile of its rows as it goes; sparse_decode's combine kernel
  merges the splits;
- the mask may come in two parts, as `gsa_rag.attention.LayerMask` keeps it: rows r < start
  read `mask` (often one row for every head), rows r >= start read `tail_mask` at row r - start.
  Each folded row picks its part, so one launch (and one combine) covers a question's shared and
  tail rows, and a block of rows may straddle `start`.

A row with no visible key at all gets NaN, as SDPA's math path gives (the engine never makes
one: every row sees itself).

Shapes: B batch, Hq query heads, Hkv KV heads (G = Hq // Hkv), R rows, T keys, D head dim (a
power of two >= 16), S splits.
"""

from __future__ import annotations

import math

import torch
from gsa_rag.kernels.dispatch import interpreting
from gsa_rag.kernels.sparse_decode import combine_splits, num_sms

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

LOG2E = 1.4426950408889634


def joined_mask(mask: torch.Tensor, tail_mask: torch.Tensor | None, rows: int) -> torch.Tensor:
    """`masked_rows_ref`'s two-part mask whole: bool [B, 1 or Hkv, rows, T], the first `start` rows
    of `mask` (start = rows - tail_mask's rows) followed by `tail_mask`'s."""
    if tail_mask is None:
        return mask
    start = rows - tail_mask.shape[2]
    heads = max(mask.shape[1], tail_mask.shape[1])
    return torch.cat([mask[:, :, :start].expand(-1, heads, -1, -1), tail_mask.expand(-1, heads, -1, -1)], 2)


def masked_rows_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                    scale: float | None = None, tail_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: scores, the mask, softmax and the weighted sum, in float32.

    Args:
        query: [B, Hq, R, D]; key, value: [B, Hkv, T, D].
        mask: bool [B, 1 or Hkv, R, T], True where a row sees a key (one row per KV head, or one
            for every head).
        scale: softmax scale (default 1/sqrt(D)).
        tail_mask: optional bool [B, 1 or Hkv, R - start, T], the mask of the last R - start
            rows; `mask` then serves only rows 0..start (any later rows it has are ignored).

    Returns:
        [B, Hq, R, D] in query's dtype.
    """
    mask = joined_mask(mask, tail_mask, query.shape[2])
    G = query.shape[1] // key.shape[1]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    k = key.float().repeat_interleave(G, 1)
    v = value.float().repeat_interleave(G, 1)
    m = mask.repeat_interleave(G, 1) if mask.shape[1] > 1 else mask
    s = torch.matmul(query.float(), k.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~m, float("-inf")), -1)
    return torch.matmul(p, v).to(query.dtype)


if triton is not None:

    @triton.jit
    def _rows_split_kernel(
        Q, K, V, MASK, TAIL, M, L, ACC, OUT,
        qk_scale,
        s_qb, s_qh, s_qr, s_qd,
        s_kb, s_kh, s_kt, s_kd,
        s_vb, s_vh, s_vt, s_vd,
        s_mb, s_mh, s_mr, s_mt,  # s_mt: the column stride of both masks
        s_tb, s_th, s_tr,
        s_pb, s_ph, s_pr, s_ps,
        s_ab, s_ah, s_ar, s_as, s_ad,
        s_ob, s_oh, s_or, s_od,
        Hkv, G, R, T, tail_start, split_len, row_blocks,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_F32: tl.constexpr,
        PRECISION: tl.constexpr, SINGLE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        rb = pid % row_blocks
        bh = pid // row_blocks
        b = bh // Hkv
        h = bh % Hkv
        f = rb * BLOCK_M + tl.arange(0, BLOCK_M)  # folded rows: query head h * G + f // R, row f % R
        f_ok = f < G * R
        g = f // R
        r = f % R
        d = tl.arange(0, D)
        q = tl.load(Q + b * s_qb + (h * G + g)[:, None] * s_qh + r[:, None] * s_qr + d[None, :] * s_qd,
                    mask=f_ok[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
        v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
        r64 = r.to(tl.int64)
        shared_row = MASK + b.to(tl.int64) * s_mb + h.to(tl.int64) * s_mh + r64 * s_mr
        # a shared row's tail pointer (a negative row) and a tail row's shared one (maybe past the
        # shared mask's rows) are formed but never loaded
        tail_row = TAIL + b.to(tl.int64) * s_tb + h.to(tl.int64) * s_th + (r64 - tail_start) * s_tr
        m_base = tl.where(r < tail_start, shared_row, tail_row)[:, None]
        start = split * split_len
        end = tl.minimum(start + split_len, T)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            k = tl.load(k_base + n[:, None] * s_kt + d[None, :] * s_kd, mask=n_ok[:, None], other=0.0)
            v = tl.load(v_base + n[:, None] * s_vt + d[None, :] * s_vd, mask=n_ok[:, None], other=0.0)
            seen = tl.load(m_base + n[None, :] * s_mt, mask=f_ok[:, None] & n_ok[None, :], other=0) != 0
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen nothing yet keeps m = -inf: subtract 0 there, not -inf (NaN)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        head = h * G + g
        if SINGLE:  # one split holds every key: normalised here, no combine (a row that saw nothing: 0 / 0)
            tl.store(OUT + b * s_ob + head[:, None] * s_oh + r[:, None] * s_or + d[None, :] * s_od,
                     (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=f_ok[:, None])
        else:
            # per (query head, row), as sparse_decode.combine_splits reads them; an empty split
            # stores m = -inf, l = 0, acc = 0: the combine weighs it 0
            part = b * s_pb + head * s_ph + r * s_pr + split * s_ps
            tl.store(M + part, m_i, mask=f_ok)
            tl.store(L + part, l_i, mask=f_ok)
            tl.store(ACC + b * s_ab + head[:, None] * s_ah + r[:, None] * s_ar + split * s_as + d[None, :] * s_ad,
                     acc, mask=f_ok[:, None])


def default_block_m(folded_rows: int) -> int:
    """Folded rows per program: 16 to 64 (tl.dot wants M >= 16)."""
    return min(64, max(16, triton.next_power_of_2(folded_rows)))


def default_splits(batch_kv_row_blocks: int, keys: int, block_n: int, device: torch.device) -> int:
    """Splits of the keys, each reading at least one key block. Up to one program per SM: as many
    as keep every program in one wave of two per SM, since a second, partial wave costs a whole
    split's time (on an H200 a 50-passage question's 104 shared-row programs took 148 us in 2
    splits, 182 in 3, 152 in 4: the 6,500-key sweep's log in results/question_attention/README.md).
    Past one program per SM, about two per SM in all (160 programs: 55 us in 2 splits, 73 in 1;
    `rows_kernel_sweep_2610keys.json`)."""
    slots = 2 * num_sms(device)
    if batch_kv_row_blocks <= num_sms(device):
        want = slots // batch_kv_row_blocks
    else:
        want = triton.cdiv(slots, batch_kv_row_blocks)
    return max(1, min(want, triton.cdiv(keys, block_n)))


def masked_rows_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                       scale: float | None = None, num_splits: int | None = None, out: torch.Tensor | None = None,
                       block_m: int | None = None, block_n: int = 64, num_warps: int = 4,
                       tail_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fast path of `masked_rows_ref` (same arguments; any strides).

    Args:
        num_splits: S, splits of the keys (default `default_splits`); with one split the kernel
            normalises its rows itself and no combine runs.
        out: optional [B, Hq, R, D] destination (any strides, e.g. a [B, R, Hq, D] tensor's
            transpose(1, 2)).
        block_m: folded rows per program (default `default_block_m`); block_n: keys per step;
            num_warps: warps per program.
        tail_mask: optional bool [B, 1 or Hkv, R - start, T], the mask of the last R - start rows;
            `mask` then needs only rows 0..start, any later rows it has being ignored (a
            LayerMask's `shared` and `tail` go in as they are, in one launch).

    Returns:
        [B, Hq, R, D] in query's dtype (`out` when given).
    """
    B, Hq, R, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    G = Hq // Hkv
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError("query, key and value must share one dtype")
    start = R if tail_mask is None else R - tail_mask.shape[2]  # the first row of the tail
    if tail_mask is not None and (tail_mask.dtype != torch.bool or tail_mask.shape[1] not in (1, Hkv)
                                  or start < 0 or tail_mask.shape[3] != T):
        raise ValueError(f"tail_mask must be bool [B, 1 or {Hkv}, <= {R}, {T}], "
                         f"got {tail_mask.dtype} {tuple(tail_mask.shape)}")
    if (mask.dtype != torch.bool or mask.shape[1] not in (1, Hkv) or mask.shape[3] != T
            or (mask.shape[2] != R if tail_mask is None else mask.shape[2] < start)):
        rows = R if tail_mask is None else f">= {start}"
        raise ValueError(f"mask must be bool [B, 1 or {Hkv}, {rows}, {T}], got {mask.dtype} {tuple(mask.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if out is None:
        out = torch.empty(B, Hq, R, D, dtype=query.dtype, device=query.device)
    if R == 0:
        return out
    folded = G * R
    block_m = block_m or default_block_m(folded)
    row_blocks = triton.cdiv(folded, block_m)
    S = num_splits or default_splits(B * Hkv * row_blocks, T, block_n, query.device)
    split_len = triton.cdiv(triton.cdiv(T, S), block_n) * block_n
    S = triton.cdiv(T, split_len)
    if S == 1:  # the kernel writes `out`; the partials' pointers are never read
        m = l = acc = out
        part_strides, acc_strides = (0,) * 4, (0,) * 5
    else:
        m = torch.empty(B, Hq, R, S, dtype=torch.float32, device=query.device)
        l = torch.empty_like(m)
        acc = torch.empty(B, Hq, R, S, D, dtype=torch.float32, device=query.device)
        part_strides, acc_strides = m.stride(), acc.stride()
    seen = mask.view(torch.uint8)  # Triton reads bytes; the kernel compares them with 0
    tail = seen if tail_mask is None else tail_mask.view(torch.uint8)  # one mask: no row reads a tail
    if tail.stride(3) != seen.stride(3):
        # the kernel takes one column stride for both parts: a stride per row would cost the inner
        # loop's mask addresses a multiply and lose the compiler's stride-1 specialisation
        seen, tail = seen.contiguous(), tail.contiguous()
    s_mb, s_mh, s_mr, s_mt = seen.stride()
    s_tb, s_th, s_tr = tail.stride()[:3]
    if seen.shape[1] == 1:
        s_mh = 0  # one mask row for every head
    if tail.shape[1] == 1:
        s_th = 0
    _rows_split_kernel[(B * Hkv * row_blocks, S)](
        query, key, value, seen, tail, m, l, acc, out,
        scale * LOG2E,
        *query.stride(), *key.stride(), *value.stride(), s_mb, s_mh, s_mr, s_mt, s_tb, s_th, s_tr,
        *part_strides, *acc_strides, *out.stride(),
        Hkv, G, R, T, start, split_len, row_blocks,
        BLOCK_M=block_m, BLOCK_N=block_n, D=D, num_warps=num_warps, num_stages=2 if query.is_cuda else 1,
        # Triton's interpreter computes bf16 tl.dot wrongly: upcast there only
        DOT_F32=query.dtype == torch.bfloat16 and interpreting(),
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        SINGLE=S == 1,
    )
    if S > 1:
        combine_splits(m, l, acc, out)
    return out
