"""One layer's decode step through the kernels, for a profiler: scores, select, union, expansion
and split-K attention (`gsa_rag.kernels`), run `--reps` times between cudaProfilerStart and
cudaProfilerStop after a warm-up that compiles every kernel.

    ncu --clock-control none --profile-from-start off \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        --section Occupancy --section LaunchStats --section SchedulerStats \\
        python benchmarks/profile_step.py --batch 8 --score-dtype int8 > ncu_b8.txt

(`--clock-control none` leaves the clocks as they are. ncu flushes the caches before each kernel,
so a small kernel reads from DRAM what the step would read from L2.) The inputs are
`benchmarks/kernels.py`'s: random bf16 q / k / v over `decode_case`'s synthetic layout (chunk 8,
adaptive k; `--meta` for H-GSA with top-4 a level). The reports of round 22 are in
benchmarks/results/kernels/h200_round22/ncu/.
"""

from __future__ import annotations

import os
import sys

# benchmarks/kernels.py shares its name with the `kernels` package that transformers imports:
# drop this folder from the import path so `import kernels` can never find a script here
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import math

import torch
from gsa_rag.kernels.bench import SHAPES, decode_case

K = 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=128, help="tokens, in K (1024)")
    p.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    p.add_argument("--score-dtype", default="cache", choices=["cache", "int8"])
    p.add_argument("--meta", type=int, nargs="*", default=[], help="H-GSA meta chunks, e.g. 4 (32x at chunk 8)")
    p.add_argument("--reps", type=int, default=1, help="steps between cudaProfilerStart and Stop")
    args = p.parse_args(argv)
    if args.batch < 1 or args.context < 1 or args.reps < 1:
        p.error("--batch, --context and --reps must be at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the kernels it profiles are Triton's)")
    from gsa_rag.kernels.gist_select import DecodePlan, select_index_list
    from gsa_rag.kernels.hier_select import HierPlan, select_hier_index_list
    from gsa_rag.kernels.sparse_decode import sparse_decode_triton

    Hq, Hkv, D = SHAPES[args.shape]
    B = args.batch
    config, layout = decode_case(B, args.context * K, 8, tuple(args.meta), 4, args.score_dtype, device="cuda")
    layout = layout.append(torch.full((B, 1), 7, device="cuda"))  # the step's token
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, layout.seq_len, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    plan = (HierPlan if args.meta else DecodePlan).build(layout, config, Hq // Hkv)
    out = torch.empty(B, Hq, D, device="cuda", dtype=torch.bfloat16)

    def step():  # the engine's selecting layer (1); int8: the copy made at the first step is kept
        if args.meta:
            index, lengths = select_hier_index_list(q, k, layout, plan, config, 1)
        else:
            index, lengths = select_index_list(q, k, layout, plan, config, 1, True)
        return sparse_decode_triton(q, k, v, index, lengths, 1 / math.sqrt(D), out=out)

    for _ in range(3):  # compiles every kernel, and makes the int8 copy, outside the profiled range
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(args.reps):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled {args.reps} step(s): {args.shape}, batch {B}, {args.context}K, {args.score_dtype} scoring"
          + (f", H-GSA meta {args.meta}" if args.meta else ""))


if __name__ == "__main__":
    main()
