"""The decode attention kernel (`gsa_rag.kernels.sparse_decode`) over its launch settings, to see
whether any beats the defaults at batch 1, where it runs at about 60% of its byte floor (issue #6).

    python benchmarks/attend_sweep.py [--out benchmarks/results/kernels/h200_round16/attend_sweep.json]

Llama-3-8B shapes (32 query / 8 KV heads, d 128), bf16, CUDA-graph replay. Each case's key lists
are drawn as adaptive k would build them (chunk 8, ratio 8: each of a KV head's four query heads
picks L / 256 + 1 random chunks of 9 columns; the union, the 4 sink and the last 64 columns), at
128K batch 1, 32K batch 1 and 128K batch 8. Every setting's output is checked against the
reference first. Swept (each narrowed by its option): key block (32, 64), warps (4, 8), pipeline
stages (1-4), splits (0.5x to 3x the default's), and the loop forms (`--styles`):
  prefetch  the kernel as the engine runs it: the next block's indices loaded one step ahead
  inloop    a variant kept here for the comparison: each block's indices loaded in the step that
            uses them, in a `tl.range` loop left to Triton's pipeliner
  regs      a variant kept here for the comparison (round 22): no pipeliner; the next block's K/V
            loaded into registers while this one is scored, its indices two steps ahead
Microseconds per call (split launch + combine, median); the floor is the listed K/V bytes at
4.3 TB/s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gsa_rag.kernels import sparse_decode as sd

try:
    import triton
    import triton.language as tl
    import triton.testing
except ImportError:  # pragma: no cover
    triton = None

CASES = ((131072, 1), (32768, 1), (131072, 8))
COPY_BW = 4.3e12

if triton is not None:

    @triton.jit
    def _variant_kernel(Q, K, V, IDX, LEN, M, L, ACC, qk_scale,
                        s_qb, s_qh, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd, s_ib, s_ih, s_in,
                        s_lb, s_lh, s_mb, s_mh, s_ms, s_ab, s_ah, s_as, s_ad, Hkv, G, split_len,
                        G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
                        PRECISION: tl.constexpr, STAGES: tl.constexpr, REGS: tl.constexpr):
        # sparse_decode._split_kernel with another loop. REGS False (inloop): each block's indices
        # loaded in the step that uses them, in a `tl.range` loop left to Triton's pipeliner. REGS
        # True (regs, launched with num_stages=1: no pipeliner): the next block's K/V loaded into
        # registers while this block is scored, and its indices the step before (ncu, round 22,
        # showed the engine's kernel at batch 1 loading each step's indices right before the
        # gathers they feed, where the pipeliner places them)
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // Hkv
        h = pid % Hkv
        n = tl.load(LEN + b * s_lb + h * s_lh)
        start = split * split_len
        end = tl.minimum(start + split_len, n)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        head = h * G + g
        g_ok = g < G
        q = tl.load(Q + b * s_qb + head[:, None] * s_qh + d[None, :] * s_qd, mask=g_ok[:, None], other=0.0)
        k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
        v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
        idx_base = IDX + b.to(tl.int64) * s_ib + h * s_ih
        m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, D], dtype=tl.float32)
        if REGS:
            offs = start + tl.arange(0, BLOCK_N)
            cols = tl.load(idx_base + offs * s_in, mask=offs < end, other=0).to(tl.int64)
            cols1 = tl.load(idx_base + (offs + BLOCK_N) * s_in, mask=offs + BLOCK_N < end, other=0).to(tl.int64)
            k = tl.load(k_base + cols[:, None] * s_kt + d[None, :] * s_kd, mask=(offs < end)[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * s_vt + d[None, :] * s_vd, mask=(offs < end)[:, None], other=0.0)
            for n0 in range(start, end, BLOCK_N):
                offs = n0 + tl.arange(0, BLOCK_N)
                nxt = (offs + BLOCK_N < end)[:, None]
                k_next = tl.load(k_base + cols1[:, None] * s_kt + d[None, :] * s_kd, mask=nxt, other=0.0)
                v_next = tl.load(v_base + cols1[:, None] * s_vt + d[None, :] * s_vd, mask=nxt, other=0.0)
                far = offs + 2 * BLOCK_N
                cols2 = tl.load(idx_base + far * s_in, mask=far < end, other=0).to(tl.int64)
                m_i, l_i, acc = sd.online_softmax_step(q, k, v, offs < end, m_i, l_i, acc, qk_scale, PRECISION)
                k = k_next
                v = v_next
                cols1 = cols2
        else:
            for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
                offs = n0 + tl.arange(0, BLOCK_N)
                live = offs < end
                cols = tl.load(idx_base + offs * s_in, mask=live, other=0).to(tl.int64)
                k = tl.load(k_base + cols[:, None] * s_kt + d[None, :] * s_kd, mask=live[:, None], other=0.0)
                v = tl.load(v_base + cols[:, None] * s_vt + d[None, :] * s_vd, mask=live[:, None], other=0.0)
                m_i, l_i, acc = sd.online_softmax_step(q, k, v, live, m_i, l_i, acc, qk_scale, PRECISION)
        tl.store(M + b * s_mb + head * s_mh + split * s_ms, m_i, mask=g_ok)
        tl.store(L + b * s_mb + head * s_mh + split * s_ms, l_i, mask=g_ok)
        tl.store(ACC + b * s_ab + head[:, None] * s_ah + split * s_as + d[None, :] * s_ad, acc, mask=g_ok[:, None])


def attend(style, q, k, v, index, lengths, out, splits, block_n, warps, stages):
    """One decode attention call (split launch + combine) under explicit launch settings."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    cap = index.shape[-1]
    split_len = triton.cdiv(triton.cdiv(cap, splits), block_n) * block_n
    S = triton.cdiv(cap, split_len)
    m = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, Hq, S, D, dtype=torch.float32, device=q.device)
    args = (q, k, v, index, lengths, m, l, acc, D ** -0.5 * sd.LOG2E, *q.stride(), *k.stride(), *v.stride(),
            *index.stride(), *lengths.stride(), *m.stride(), *acc.stride(), Hkv, Hq // Hkv, split_len)
    meta = {"G_PAD": max(16, triton.next_power_of_2(Hq // Hkv)), "D": D, "BLOCK_N": block_n, "DOT_F32": False,
                "PRECISION": "tf32", "num_warps": warps, "num_stages": stages}
    if style == "prefetch":
        sd._split_kernel[(B * Hkv, S)](*args, **meta)
    else:
        _variant_kernel[(B * Hkv, S)](*args, **meta, STAGES=stages, REGS=style == "regs")
    sd.combine_splits(m[:, :, None], l[:, :, None], acc[:, :, None], out[:, :, None])
    return out


def key_lists(B: int, Hkv: int, L: int, gen: torch.Generator, chunk: int = 8, group: int = 4):
    """int32 index [B, Hkv, cap] and lengths [B, Hkv]: each KV head's sorted columns."""
    chunks = L // (chunk + 1)
    per_head = L // (8 * group * 8) + 1
    rows = []
    for _ in range(B * Hkv):
        picked = torch.unique(torch.randint(0, chunks, (group * per_head,), generator=gen))
        cols = (picked[:, None] * (chunk + 1) + torch.arange(chunk + 1)).flatten()
        rows.append(torch.unique(torch.cat([torch.arange(4), cols, torch.arange(L - 64, L)])))
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    index = torch.zeros(B * Hkv, int(lengths.max()), dtype=torch.int32)
    for i, r in enumerate(rows):
        index[i, : len(r)] = r
    return index.view(B, Hkv, -1), lengths.view(B, Hkv)


def graph_us(fn, rep_ms: int) -> float:
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def sweep_case(L: int, B: int, gen: torch.Generator, rows: list, grid: argparse.Namespace) -> None:
    Hq, Hkv, D = 32, 8, 128
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    index, lengths = (t.cuda() for t in key_lists(B, Hkv, L, gen))
    ref = sd.sparse_decode_ref(q.float(), k.float(), v.float(), index, lengths).float()
    out = torch.empty(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    floor = int(lengths.sum()) * D * 2 * 2 / COPY_BW * 1e6
    S0 = sd.default_splits(index.shape[-1], B * Hkv, sd.default_block_n(D), q.device)
    default = graph_us(lambda: sd.sparse_decode_triton(q, k, v, index, lengths, out=out), 200)
    print(f"## L={L} B={B} width={index.shape[-1]} mean length={lengths.float().mean():.0f} floor={floor:.1f} us; "
          f"default ({S0} splits x 64, 4 warps, 3 stages): {default:.1f} us", flush=True)
    best = (default, "default")
    for style in grid.styles:
        for block_n in grid.block_n:
            for warps in grid.warps:
                for stages in (1,) if style == "regs" else grid.stages:  # regs: no pipeliner
                    line = []
                    for mult in grid.splits:
                        S = max(1, int(S0 * mult))
                        setting = (style, q, k, v, index, lengths, out, S, block_n, warps, stages)
                        got = attend(*setting[:6], out.fill_(float("nan")), *setting[7:]).float()
                        err = float((got - ref).norm() / ref.norm())
                        if not err < 1e-2:
                            line.append(f"S{S}:err {err:.2g}")
                            continue
                        us = graph_us(lambda setting=setting: attend(*setting), 100)
                        line.append(f"S{S}:{us:.1f}")
                        rows.append({"L": L, "B": B, "style": style, "block_n": block_n, "warps": warps, "stages": stages, "S": S,
                                         "us": us, "rel_err": err, "floor_us": floor, "default_us": default})
                        if us < best[0]:
                            best = (us, f"{style} block {block_n}, {warps} warps, {stages} stages, {S} splits")
                    print(f"{style:8s} bn{block_n} w{warps} st{stages}: " + " ".join(line), flush=True)
    print(f"## best L={L} B={B}: {best[0]:.1f} us ({best[1]}); default {default:.1f}, floor {floor:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the rows as JSON (never overwrites)")
    parser.add_argument("--styles", nargs="+", default=["prefetch", "inloop"], choices=["prefetch", "inloop", "regs"])
    parser.add_argument("--block-n", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument("--splits", nargs="+", type=float, default=[0.5, 1, 1.5, 2, 3],
                        help="multiples of the default split count")
    args = parser.parse_args()
    if triton is None or not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU and Triton")
    if args.out and Path(args.out).exists():
        parser.error(f"--out {args.out} exists: results are never overwritten; name another file")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    rows: list = []
    for L, B in CASES:
        sweep_case(L, B, gen, rows, args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "x") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
