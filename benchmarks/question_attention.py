"""The attention of a question's first forward over an assembled cache, one layer, on the GPU:
which way of running the engine's two masked SDPA calls (gsa_rag.attention._sdpa_rows) is fastest
at a question's shapes, side by side in one run.

    python benchmarks/question_attention.py                 # Llama-3-8B shapes, 20 passages' worth
    python benchmarks/question_attention.py --context 6500 --shared-rows 200

A question over gist memory runs its link tokens (rows that share one mask: `--shared-rows`) and
its question tokens (rows that unfold chunks per KV head: `--tail-rows`) against the whole
assembled cache (`--context` columns), most of it masked. benchmarks/memory_ttft.py --profile
showed these two SDPA calls at about 67 us each per layer on an H200 (cuDNN, 32 layers: a quarter
of the question's device time). Variants, each on the same inputs and masks:

  repeat        K/V repeated to the query heads, SDPA's own choice (the engine's CUDA path before
                round 12, and still its path for more than attention.FOLD_MAX_ROWS rows)
  repeat/eff    the same, SDPA's memory-efficient kernel forced
  folded        no repeat: each KV head's query heads folded into its rows ([B, Hkv, G*R, D]),
                the masks repeated over the group instead of K/V; SDPA's own choice
                (attention._sdpa_rows_folded, the engine's CUDA path for few rows)
  folded/eff    folded, the memory-efficient kernel forced
  kernel        the split-K Triton kernel (gsa_rag.kernels.masked_rows through
                attention._kernel_rows): the keys split over programs as well as the rows, each
                K/V tile loaded once per block of folded rows (the engine's path when
                attention.ROWS_KERNEL is on)

Two more variants were measured once and dropped (results/question_attention/, round 12):
scores as a bf16 matmul, float32 softmax and a second matmul took 0.9x (20 passages) and 0.46x
(50) the repeat path's time with twice its error; each (row, KV head)'s mask turned into a key
list for the sparse decode kernel (prefix sum + scatter, the cache expanded over the rows) took
1.11x and 0.61x, behind the folded path's 1.36x and 1.31x, and made the question slower end to
end (r12h_lists/).

Columns: microseconds per layer (CUDA-graph replay) and the error against a float64 reference.
Writes benchmarks/results/question_attention/question_attention_<context>keys.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial

import torch
from gsa_rag.kernels.bench import SHAPES, bench_us, environment, write_results

from gsa_rag.attention import LayerMask, _kernel_rows, _sdpa_rows, _sdpa_rows_folded


def random_masks(B, Hkv, rows_shared, rows_tail, T, seen: float, generator, device="cuda") -> LayerMask:
    """A LayerMask with random visible keys (about `seen` of them), every row seeing key 0."""
    shared = torch.rand(B, 1, rows_shared, T, generator=generator) < seen
    tail = torch.rand(B, Hkv, rows_tail, T, generator=generator) < seen
    shared[..., 0] = tail[..., 0] = True
    full = torch.cat([shared, torch.zeros(B, 1, rows_tail, T, dtype=torch.bool)], 2)
    return LayerMask(full.to(device), rows_shared, tail.to(device))


def reference(q, k, v, mask: LayerMask, scale):
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    m = mask.full()  # [B, Hkv, R, T]
    m = m.repeat_interleave(q.shape[1] // m.shape[1], 1)
    s = torch.matmul(q.double(), k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s.masked_fill(~m, float("-inf")), -1), v).transpose(1, 2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    p.add_argument("--context", type=int, default=2610, help="cache columns (20 passages of ~120 tokens at chunk 8: 2610)")
    p.add_argument("--shared-rows", type=int, default=80, help="link tokens (4 per passage)")
    p.add_argument("--tail-rows", type=int, default=20, help="question tokens")
    p.add_argument("--seen", type=float, default=0.3, help="fraction of keys a row sees")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the variants: the rows kernel's launch settings (rows per program, keys per "
                   "step, splits, warps), each part of the question (shared rows, tail rows) on its own")
    p.add_argument("--out", default="benchmarks/results/question_attention")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/question_attention.py needs CUDA")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    Hq, Hkv, D = SHAPES[args.shape]
    G, T, B = Hq // Hkv, args.context, 1
    R = args.shared_rows + args.tail_rows
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, R, D, generator=g).cuda().bfloat16()
    k = torch.randn(B, Hkv, T, D, generator=g).cuda().bfloat16()
    v = torch.randn(B, Hkv, T, D, generator=g).cuda().bfloat16()
    mask = random_masks(B, Hkv, args.shared_rows, args.tail_rows, T, args.seen, g)
    scale = 1 / math.sqrt(D)
    want = reference(q, k, v, mask, scale)

    if args.sweep:
        return sweep(args, q, k, v, mask, scale, want)

    def forced(backend, fn):
        def run(*a):
            with sdpa_kernel([backend]):
                return fn(*a)
        return run

    def repeat(run_rows):
        return lambda: run_rows(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), mask, scale, 0.0, False)

    variants = {
        "repeat": repeat(_sdpa_rows),
        "repeat/eff": repeat(forced(SDPBackend.EFFICIENT_ATTENTION, _sdpa_rows)),
        "folded": lambda: _sdpa_rows_folded(q, k, v, mask, scale, 0.0),
        "folded/eff": lambda: forced(SDPBackend.EFFICIENT_ATTENTION, _sdpa_rows_folded)(q, k, v, mask, scale, 0.0),
        "kernel": lambda: _kernel_rows(q, k, v, mask, scale),
    }
    rows = []
    print(f"# {torch.cuda.get_device_name()}, {args.shape}: {R} rows ({args.shared_rows} shared + {args.tail_rows} "
          f"tail) over {T} keys, {args.seen:.0%} seen, bf16")
    for name, fn in variants.items():
        try:
            out = fn()
            err = float((out.double() - want).norm() / want.norm())
            us = bench_us(fn, cuda_graph=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{name:12s} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        rows.append({"variant": name, "us": us, "rel_err": err})
        print(f"{name:12s} {us:8.1f} us   err {err:.1e}   x{rows[0]['us'] / us:.2f} vs repeat", flush=True)
    payload = {"env": environment(), "args": vars(args), "rows": rows}
    print(f"wrote {write_results(args.out, f'question_attention_{T}keys', payload)}")


def sweep(args, q, k, v, mask: LayerMask, scale, want) -> None:
    """--sweep: masked_rows_triton over its launch settings on the shared rows and on the tail rows;
    prints the five fastest of each part and the defaults' time."""
    import triton
    from gsa_rag.kernels.masked_rows import (
        default_block_m,
        default_splits,
        masked_rows_triton,
    )

    start = mask.start
    parts = {"shared": (q[:, :, :start], mask.shared[:, :, :start], want[:, :start]),
             "tail": (q[:, :, start:], mask.tail, want[:, start:])}
    Hkv, T = k.shape[1], k.shape[2]
    rows = []
    for part, (rows_q, part_mask, part_want) in parts.items():
        G, R = q.shape[1] // Hkv, rows_q.shape[2]
        timed = []
        for block_m in (16, 32, 64, 128):
            for block_n in (32, 64, 128):
                default = default_splits(Hkv * triton.cdiv(G * R, block_m), T, block_n, q.device)
                for splits in sorted({1, 2, 4, default, 2 * default}):
                    for warps in (4, 8):
                        fn = partial(masked_rows_triton, rows_q, k, v, part_mask, scale, num_splits=splits,
                                     block_m=block_m, block_n=block_n, num_warps=warps)
                        try:
                            err = float((fn().transpose(1, 2).double() - part_want).norm() / part_want.norm())
                            us = bench_us(fn, cuda_graph=True)
                        except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of shared memory)
                            print(f"{part} {block_m}x{block_n} S{splits} w{warps} failed: {type(e).__name__}: {str(e)[:120]}")
                            continue
                        row = {"part": part, "block_m": block_m, "block_n": block_n, "splits": splits, "warps": warps,
                               "default_splits": default, "us": us, "rel_err": err}
                        timed.append(row)
        defaults = [r for r in timed if r["block_m"] == default_block_m(G * R) and r["block_n"] == 64
                    and r["splits"] == r["default_splits"] and r["warps"] == 4]
        print(f"# {part}: {R} rows x {q.shape[1]} heads; defaults {defaults[0]['us']:.1f} us" if defaults else f"# {part}")
        for r in sorted(timed, key=lambda r: r["us"])[:5]:
            print(f"  {r['block_m']:4d} rows x {r['block_n']:4d} keys, {r['splits']:3d} splits, {r['warps']} warps: "
                  f"{r['us']:7.1f} us  err {r['rel_err']:.1e}")
        rows += timed
    payload = {"env": environment(), "args": vars(args), "rows": rows}
    print(f"wrote {write_results(args.out, f'rows_kernel_sweep_{T}keys', payload)}")


if __name__ == "__main__":
    main()
