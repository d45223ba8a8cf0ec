# kernels/sparse_decode.py of 0907a3e without the early return: the code variants.py patched (round 25)
"""Sparse split-K flash-decode: one decode step's attention over a per-(batch, KV head) key list.

Reads the KV cache where the engine keeps it (the HF DynamicCache layer tensors [B, Hkv, T, D],
any strides) through an int32 index list (see gist_select.py); nothing is gathered into a
compact copy first. Each program owns one (batch, KV head) and one contiguous split of the
list: it loads each listed K/V row once and uses it for all G query heads of that KV head
(GQA), keeping an online softmax (running max m, running sum l, unnormalised acc). A second
small kernel combines the splits (no atomics, so results are deterministic).

Grid: (B * Hkv, splits), the split length chosen from the list width so that the programs fill
every SM about twice at batch 1 (`default_split_len`); each step gathers BLOCK_N = 64 whole
K and V rows through one 2-D pointer block (rows are contiguous: 16-byte loads) and does a
[G_PAD, D] x [D, BLOCK_N] tl.dot with the G query heads padded to 16 rows.

Shapes: B batch, Hq query heads, Hkv KV heads (G = Hq // Hkv), T cache length, D head dim
(64 or 128; any power of two >= 16 works), CAP list width, S splits.
"""

from __future__ import annotations

import math

import torch
from gsa_rag.kernels.dispatch import interpreting
from gsa_rag.kernels.pdl import pdl_launch

try:
    import triton
    import triton.language as tl
    from gsa_rag.kernels.pdl import wait_for_previous
except ImportError:  # pragma: no cover
    triton = None

LOG2E = 1.4426950408889634


def sparse_decode_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, index: torch.Tensor,
                      lengths: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference: gather the listed rows, softmax, weighted sum (fp32).

    Args:
        query: [B, Hq, D]; key, value: [B, Hkv, T, D] (same dtype).
        index: int32/long [B, H, CAP] with H in (1, Hkv): the key columns each KV head attends;
            entries at or past `lengths` are ignored.
        lengths: int [B, H], >= 1.
        scale: softmax scale (default 1/sqrt(D)).

    Returns:
        [B, Hq, D] in query's dtype.
    """
    B, Hq, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    index = index.long().expand(B, Hkv, -1)
    live = torch.arange(index.shape[-1], device=index.device) < lengths.expand(B, Hkv)[..., None]
    idx = torch.where(live, index, 0)[..., None].expand(-1, -1, -1, D)
    k = torch.gather(key.float(), 2, idx).repeat_interleave(G, 1)  # [B, Hq, CAP, D]
    v = torch.gather(value.float(), 2, idx).repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhnd->bhn", query.float(), k) * scale
    s = s.masked_fill(~live.repeat_interleave(G, 1), float("-inf"))
    p = torch.softmax(s, -1)
    return torch.einsum("bhn,bhnd->bhd", p, v).to(query.dtype)


if triton is not None:

    @triton.jit
    def row_splits(LEN, s_lb, s_lh, Hkv, NR, programs, BLOCK_N: tl.constexpr, MAX_BLOCKS: tl.constexpr,
                   NR_PAD: tl.constexpr):
        # every (batch, KV head) row's length n and splits, alike in every program that asks:
        # splits of `step` entries (whole blocks, 1..MAX_BLOCKS) sized so that the NR rows take
        # about `programs` of them in all, so a row's programs follow its length, not the list's
        # width; a row takes at least one (its combine always has a partial), the padding to
        # NR_PAD none. `ends`: the running total of splits. `split_plan` is the same on the host.
        rows = tl.arange(0, NR_PAD)
        live = rows < NR
        n = tl.load(LEN + (rows // Hkv) * s_lb + (rows % Hkv) * s_lh, mask=live, other=0)
        blocks = tl.cdiv(tl.cdiv(tl.sum(n, 0), programs), BLOCK_N)
        step = tl.minimum(tl.maximum(blocks, 1), MAX_BLOCKS) * BLOCK_N
        splits = tl.where(live, tl.maximum(tl.cdiv(n, step), 1), 0)
        return rows, n, splits, tl.cumsum(splits, 0), step

    @triton.jit
    def online_softmax_step(q, k, v, live, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
        # one block of keys into the running max m_i, sum l_i and unnormalised acc of the G_PAD
        # query rows (log2 units: qk_scale holds log2(e)); dead keys (live False) weigh 0
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G_PAD, BLOCK_N]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _split_kernel(
        Q, K, V, IDX, LEN, M, L, ACC,
        qk_scale,
        s_qb, s_qh, s_qd,
        s_kb, s_kh, s_kt, s_kd,
        s_vb, s_vh, s_vt, s_vd,
        s_ib, s_ih, s_in,
        s_lb, s_lh,
        s_mb, s_mh, s_ms,
        s_ab, s_ah, s_as, s_ad,
        Hkv, G, split_len, NR,
        G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
        PRECISION: tl.constexpr,
        PDL: tl.constexpr = False,
        BALANCED: tl.constexpr = False, NR_PAD: tl.constexpr = 1, MAX_BLOCKS: tl.constexpr = 16,
    ):
        # BALANCED: a 1-D grid; program p takes the p-th split of `row_splits` (split_len is then
        # the number of programs to aim for) and stores its partials at slot p ([P, G] and
        # [P, G, D]); otherwise grid (B * Hkv, S), split `split` of every row alike, partials
        # at [B, Hq, S] and [B, Hq, S, D]
        wait_for_previous(PDL)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        g_ok = g < G
        if BALANCED:
            p = tl.program_id(0)
            rows, n_all, splits, ends, step = row_splits(LEN, s_lb, s_lh, Hkv, NR, split_len, BLOCK_N, MAX_BLOCKS, NR_PAD)
            # the row whose splits hold p; the grid's slack (p past every split) takes the last
            # row, where its start lies past the row's end: an empty loop, a slot nobody reads
            row = tl.minimum(tl.sum((ends <= p).to(tl.int32), 0), NR - 1)
            this = rows == row
            n = tl.sum(tl.where(this, n_all, 0), 0)
            start = (p - tl.sum(tl.where(this, ends - splits, 0), 0)) * step
            end = tl.minimum(start + step, n)
            b = row // Hkv
            h = row % Hkv
            head = h * G + g
            slot_b = p
            slot_h = g
            split = 0
        else:
            pid = tl.program_id(0)
            split = tl.program_id(1)
            b = pid // Hkv
            h = pid % Hkv
            n = tl.load(LEN + b * s_lb + h * s_lh)
            start = split * split_len
            end = tl.minimum(start + split_len, n)
            head = h * G + g
            slot_b = b
            slot_h = head
        q = tl.load(Q + b * s_qb + head[:, None] * s_qh + d[None, :] * s_qd, mask=g_ok[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
        v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
        idx_base = IDX + b.to(tl.int64) * s_ib + h * s_ih
        m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, D], dtype=tl.float32)
        # every block this loop visits holds at least one live entry, so m_i turns finite at the
        # first one and exp2(m_i - m_new) never sees -inf - -inf
        # the next block's indices are loaded one step ahead, so the K/V gathers of a step wait
        # on one memory round trip, not two (index, then rows)
        offs = start + tl.arange(0, BLOCK_N)
        cols = tl.load(idx_base + offs * s_in, mask=offs < end, other=0).to(tl.int64)
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            live = offs < end
            nxt = offs + BLOCK_N
            cols_next = tl.load(idx_base + nxt * s_in, mask=nxt < end, other=0).to(tl.int64)
            k = tl.load(k_base + cols[:, None] * s_kt + d[None, :] * s_kd, mask=live[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * s_vt + d[None, :] * s_vd, mask=live[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            m_i, l_i, acc = online_softmax_step(q, k, v, live, m_i, l_i, acc, qk_scale, PRECISION)
            cols = cols_next
        # an empty split (start >= n) stores m = -inf, l = 0, acc = 0: the combine weighs it 0
        tl.store(M + slot_b * s_mb + slot_h * s_mh + split * s_ms, m_i, mask=g_ok)
        tl.store(L + slot_b * s_mb + slot_h * s_mh + split * s_ms, l_i, mask=g_ok)
        tl.store(ACC + slot_b * s_ab + slot_h[:, None] * s_ah + split * s_as + d[None, :] * s_ad, acc, mask=g_ok[:, None])

    @triton.jit
    def _combine_kernel(
        M, L, ACC, O,
        s_mb, s_mh, s_mr, s_ms,
        s_ab, s_ah, s_ar, s_as, s_ad,
        s_ob, s_oh, s_or, s_od,
        Hq, R, S,
        S_PAD: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # grid (B * Hq, cdiv(R, BLOCK_R)): BLOCK_R rows of one (batch, query head), each row's
        # global max over all S splits, then the weighted partial sums BLOCK_S splits at a time
        # (bounded registers). One row a program (a decode step) or many (a question's rows:
        # one program a row left 3,200 tiny programs at 100 rows x 32 heads; the engine sends
        # masked_rows at most attention.FOLD_MAX_ROWS rows, far below the grid's 65,535 row blocks)
        wait_for_previous(PDL)
        pid = tl.program_id(0)
        b = pid // Hq
        hq = pid % Hq
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < R
        d = tl.arange(0, D)
        s_all = tl.arange(0, S_PAD)
        m_base = M + b * s_mb + hq * s_mh + r * s_mr
        l_base = L + b * s_mb + hq * s_mh + r * s_mr
        a_base = ACC + b * s_ab + hq * s_ah + r * s_ar
        m_all = tl.max(tl.load(m_base[:, None] + s_all[None, :] * s_ms, mask=r_ok[:, None] & (s_all < S)[None, :],
                               other=float("-inf")), 1)
        # finite where any split saw a key (a decode step's split 0 always does: lengths >= 1); a
        # row of masked_rows that sees no key at all gets NaN (exp2(-inf - -inf))
        acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
        den = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = r_ok[:, None] & (s < S)[None, :]
            m = tl.load(m_base[:, None] + s[None, :] * s_ms, mask=ok, other=float("-inf"))
            l = tl.load(l_base[:, None] + s[None, :] * s_ms, mask=ok, other=0.0)
            a = tl.load(a_base[:, None, None] + s[None, :, None] * s_as + d[None, None, :] * s_ad,
                        mask=ok[:, :, None], other=0.0)
            w = tl.exp2(m - m_all[:, None])  # empty splits: exp2(-inf) = 0
            acc += tl.sum(a * w[:, :, None], 1)
            den += l * w
        out = acc / tl.sum(den, 1)[:, None]
        tl.store(O + b * s_ob + hq * s_oh + r[:, None] * s_or + d[None, :] * s_od, out.to(O.dtype.element_ty),
                 mask=r_ok[:, None])


    @triton.jit
    def _combine_balanced_kernel(
        M, L, ACC, O, LEN,
        s_lb, s_lh, s_mp, s_mg, s_ap, s_ag, s_ad, s_ob, s_oh, s_od,
        Hq, Hkv, G, NR, programs,
        D: tl.constexpr, BLOCK_N: tl.constexpr, MAX_BLOCKS: tl.constexpr, NR_PAD: tl.constexpr,
        BLOCK_S: tl.constexpr, PDL: tl.constexpr = False,
    ):
        # grid B * Hq: a query head's partials are slots first .. first + count - 1 of the
        # balanced split kernel's [P, G] / [P, G, D] (its row's splits under `row_splits`);
        # summed BLOCK_S at a time, as `_combine_kernel` sums a decode row
        wait_for_previous(PDL)
        pid = tl.program_id(0)
        b = pid // Hq
        hq = pid % Hq
        g = hq % G
        rows, _, splits, ends, _ = row_splits(LEN, s_lb, s_lh, Hkv, NR, programs, BLOCK_N, MAX_BLOCKS, NR_PAD)
        this = rows == b * Hkv + hq // G
        count = tl.sum(tl.where(this, splits, 0), 0)
        first = tl.sum(tl.where(this, ends - splits, 0), 0)
        d = tl.arange(0, D)
        m_all = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
        for s0 in range(0, count, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            m_all = tl.maximum(m_all, tl.load(M + (first + s) * s_mp + g * s_mg, mask=s < count, other=float("-inf")))
        m_max = tl.max(m_all, 0)
        acc = tl.zeros([D], dtype=tl.float32)
        den = tl.zeros([BLOCK_S], dtype=tl.float32)
        for s0 in range(0, count, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < count
            slot = first + s
            m = tl.load(M + slot * s_mp + g * s_mg, mask=ok, other=float("-inf"))
            l = tl.load(L + slot * s_mp + g * s_mg, mask=ok, other=0.0)
            a = tl.load(ACC + slot[:, None] * s_ap + g * s_ag + d[None, :] * s_ad, mask=ok[:, None], other=0.0)
            w = tl.exp2(m - m_max)
            acc += tl.sum(a * w[:, None], 0)
            den += l * w
        out = acc / tl.sum(den, 0)
        tl.store(O + b * s_ob + hq * s_oh + d * s_od, out.to(O.dtype.element_ty))


def combine_splits(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Combines split-K partials (online-softmax max m, sum l, unnormalised acc) into `out`.

    Args:
        m, l: float32 [B, Hq, R, S]; acc: float32 [B, Hq, R, S, D] (R query rows per head: 1 for a
            decode step, a question's rows in masked_rows).
        out: [B, Hq, R, D], any strides.

    Returns:
        out.
    """
    B, Hq, R, S = m.shape
    if m.numel() == 0:
        return out
    S_PAD = max(2, 1 << (S - 1).bit_length())
    # a decode row (R = 1) sums its splits 16 at a time whatever S: then a list with empty trailing
    # splits (a CUDA graph's, sparse_decode_triton's split_width) sums in the same order, bit for bit
    block_s = 16 if R == 1 else min(16, S_PAD)
    # about 64 (row, split) pairs a program: at D = 128 a [64, 128] float32 tile is 64 registers a thread
    block_r = min(triton.next_power_of_2(R), max(1, 64 // block_s))
    grid = (B * Hq, triton.cdiv(R, block_r))
    # launched early, the combine's programs would pile onto the SMs that the attention's last,
    # part-full wave leaves free: PDL only where each can have an SM of its own (NOTES.md round 23)
    fits = grid[0] * grid[1] <= num_sms(out.device)
    _combine_kernel[grid](
        m, l, acc, out, *m.stride(), *acc.stride(), *out.stride(), Hq, R, S,
        S_PAD=S_PAD, D=out.shape[-1], BLOCK_S=block_s, BLOCK_R=block_r, **pdl_launch(out.device, allow=fits),
        num_warps=4,
    )
    return out


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1): Triton tile sizes."""
    return 1 << max(0, int(x) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter's grids stay small)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def default_split_len(capacity: int, batch_kv_heads: int, block_n: int, device: torch.device) -> int:
    """Entries of the list per program: enough programs (B * Hkv * splits) to fill every SM
    about twice over, each reading 1..16 blocks (64..1024 keys at block 64). The H200 sweep of
    `benchmarks/kernels.py --attend-sweep` (kernels/h200_round4) put the best settings near two
    programs per SM: at 128K batch 1, 29 splits of 64-key blocks took 27.7 us against 32.5 for the
    58 of four per SM; at 32K batch 8, 4 splits 44.7 against 50.5 for 9; elsewhere within noise."""
    want_splits = triton.cdiv(2 * num_sms(device), batch_kv_heads)
    per = triton.cdiv(triton.cdiv(capacity, want_splits), block_n) * block_n
    return max(block_n, min(per, 16 * block_n))


def default_splits(capacity: int, batch_kv_heads: int, block_n: int, device: torch.device) -> int:
    """Number of splits of the list width under `default_split_len`."""
    return triton.cdiv(capacity, default_split_len(capacity, batch_kv_heads, block_n, device))


def default_block_n(head_dim: int) -> int:
    """Keys per inner step: 64 rows of K and of V per step (16 KB each at d=128, bf16)."""
    return 64


# the decode attention's splits follow the lengths of the lists rather than their width
# (`split_plan`); off, every row is cut into the same splits of its width (`default_split_len`)
BALANCED_SPLITS = True
MAX_SPLIT_BLOCKS = 16  # key blocks a split reads at most (default_split_len's 16 * block_n)


def split_plan(lengths: torch.Tensor, block_n: int, programs: int) -> tuple[int, torch.Tensor]:
    """The balanced splits (the kernels' `row_splits`), on the host: (entries a split, splits of
    each row). About `programs` splits of whole `block_n` blocks over all rows together, at most
    MAX_SPLIT_BLOCKS blocks each, at least one a row.

    Args:
        lengths: int [B, Hkv], the list lengths (any device; synced).
    """
    n = lengths.reshape(-1).long().cpu()
    blocks = -(-(-(-int(n.sum()) // programs)) // block_n)
    step = min(max(blocks, 1), MAX_SPLIT_BLOCKS) * block_n
    return step, torch.clamp((n + step - 1) // step, min=1)


def default_programs(device: torch.device) -> int:
    """Splits to aim for over all rows: two programs an SM (default_split_len's rule)."""
    return 2 * num_sms(device)


def _partials(programs: int, rows: int, D: int, device: torch.device):
    """The split kernel's online-softmax partials: m, l float32 [programs, rows] and acc
    [programs, rows, D] (a seam for tests, which poison them)."""
    m = torch.empty(programs, rows, dtype=torch.float32, device=device)
    return m, torch.empty_like(m), torch.empty(programs, rows, D, dtype=torch.float32, device=device)


def sparse_decode_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, index: torch.Tensor,
                         lengths: torch.Tensor, scale: float | None = None, num_splits: int | None = None,
                         out: torch.Tensor | None = None, block_n: int | None = None,
                         split_width: int | None = None, programs: int | None = None) -> torch.Tensor:
    """Fast path of `sparse_decode_ref` (same arguments).

    By default (BALANCED_SPLITS) the lists are cut into splits by their lengths, read on the
    device (`split_plan`): about `programs` splits over all rows, a row's share following its
    length. Lists shorter than their width (a GQA group whose heads pick the same chunks) then
    take fewer programs' time, and a split does not depend on the width at all: an eager step and
    a CUDA graph's step over a wider list (gsa_rag.graph_decode) split alike and round alike.

    Args:
        num_splits: S, cut every row's width into S splits instead (the layout before
            BALANCED_SPLITS; also taken with BALANCED_SPLITS off, as `default_splits`).
        split_width: with the width-cut splits and no num_splits, size each split as
            `default_split_len` does for a list this wide (default: index's width). A decode
            step's lists grow by a column a step, and a CUDA graph's are wider than any step
            fills: sized for the generation's first step's width (`DecodePlan.grown`), every
            step's splits hold the same entries, eager or replayed. Balanced splits ignore it.
        programs: balanced splits to aim for (default: `default_programs`).
        out: optional [B, Hq, D] destination (any strides, e.g. a [B, 1, Hq, D] tensor's view).
        block_n: list entries per inner step (default: `default_block_n`).

    Returns:
        [B, Hq, D] in query's dtype (`out` when given).
    """
    B, Hq, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    if key.dtype != query.dtype or value.dtype != query.dtype:  # fp32 works too (ieee dots), slower
        raise TypeError("query, key and value must share one dtype")
    if index.dtype != torch.int32 or lengths.dtype != torch.int32:
        raise TypeError("index and lengths must be int32")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cap = index.shape[-1]
    block_n = block_n or default_block_n(D)
    index = index.expand(B, Hkv, cap) if index.shape[1] == 1 else index
    lengths = lengths.expand(B, Hkv) if lengths.shape[1] == 1 else lengths
    if out is None:
        out = torch.empty(B, Hq, D, dtype=query.dtype, device=query.device)
    rows = B * Hkv
    balanced = BALANCED_SPLITS and not num_splits
    if balanced:
        programs = programs or default_programs(query.device)
        # at most programs + rows splits (one partial split a row), or the split cap's count
        grid = (max(programs, triton.cdiv(rows * cap, MAX_SPLIT_BLOCKS * block_n)) + rows,)
        m, l, acc = _partials(grid[0], G, D, query.device)
        strides = (*m.stride(), 0, *acc.stride()[:2], 0, acc.stride(2))
        split_arg = programs
    else:
        if num_splits:
            split_arg = triton.cdiv(triton.cdiv(cap, num_splits), block_n) * block_n
        else:
            split_arg = default_split_len(split_width or cap, rows, block_n, query.device)
        S = triton.cdiv(cap, split_arg)
        grid = (rows, S)
        m = torch.empty(B, Hq, S, dtype=torch.float32, device=query.device)
        l = torch.empty_like(m)
        acc = torch.empty(B, Hq, S, D, dtype=torch.float32, device=query.device)
        strides = (*m.stride(), *acc.stride())
    nr_pad = next_pow2(max(2, rows))
    G_PAD = max(16, 1 << (G - 1).bit_length())  # tl.dot wants M >= 16; padded rows are masked
    _split_kernel[grid](
        query, key, value, index, lengths, m, l, acc,
        scale * LOG2E,
        *query.stride(), *key.stride(), *value.stride(), *index.stride(), *lengths.stride(),
        *strides,
        Hkv, G, split_arg, rows,
        G_PAD=G_PAD, D=D, BLOCK_N=block_n, **pdl_launch(query.device),
        num_warps=4, num_stages=3 if query.is_cuda else 1,
        # Triton's interpreter (3.6 to 3.9 at least) computes bf16 tl.dot wrongly: upcast there only
        DOT_F32=query.dtype == torch.bfloat16 and interpreting(),
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # fp32 models: no tf32 rounding
        BALANCED=balanced, NR_PAD=nr_pad, MAX_BLOCKS=MAX_SPLIT_BLOCKS,
    )
    if not balanced:
        combine_splits(m[:, :, None], l[:, :, None], acc[:, :, None], out[:, :, None])
        return out
    # as combine_splits: launched early, its programs would crowd the SMs the attention leaves free
    _combine_balanced_kernel[(B * Hq,)](
        m, l, acc, out, lengths, *lengths.stride(), *m.stride(), *acc.stride(), *out.stride(),
        Hq, Hkv, G, rows, programs,
        D=D, BLOCK_N=block_n, MAX_BLOCKS=MAX_SPLIT_BLOCKS, NR_PAD=nr_pad, BLOCK_S=16,
        **pdl_launch(query.device, allow=B * Hq <= num_sms(query.device)), num_warps=4,
    )
    return out
