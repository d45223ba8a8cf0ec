"""Where the fused top-k + union kernel's time goes (issue #6: it is the largest item of a decode
step at batch 1), in one run on one GPU, CUDA-graph replay.

    python benchmarks/select_kernel.py [--out benchmarks/results/kernels/select]

One launch of `gsa_rag.kernels.gist_select._topk_union_kernel` over random scores [B, 32, C]
(Llama-3-8B's 32 query heads over 8 KV heads), k per head as the 128K / 32K decode steps of
benchmarks/kernels.py use, and the rows of H-GSA 32x (top level 3.7K units, level 0 64 candidates):
  bisect     the threshold search over all 32 bits of the score's key (rounds 3-5)
  early      the search stopping once exactly k scores are above the threshold (EARLY_EXIT)
  picks only the same without the GQA union (each group's last program: OR of the G pick rows,
             sizes, prefix sum), so union = total - picks only
and the early search at 4, 8, 16, 32 warps. Microseconds per launch (median), each set of inputs
replayed from one graph with its counters re-zeroed (a memset, timed alone as `zero`).
"""

from __future__ import annotations

import argparse

import torch
from gsa_rag.kernels.bench import bench_us, environment, print_table, write_results
from gsa_rag.kernels.gist_select import topk_union_launch

CASES = [  # (batch, chunks, k): 128K and 32K at chunk 8 with adaptive k, H-GSA 32x's two levels
    (1, 16384, 512), (8, 16384, 512), (1, 4096, 128), (8, 4096, 128), (1, 3704, 4), (1, 64, 4),
]


def time_case(B: int, C: int, k: int, Hq: int = 32, Hkv: int = 8) -> dict:
    scores = torch.randn(B, Hq, C, device="cuda")
    krow = torch.full((B,), k, device="cuda", dtype=torch.long)
    ptr = torch.arange(C + 1, device="cuda", dtype=torch.int32)[None].expand(B, -1).contiguous() * 9
    picks = torch.empty(B, Hq, C, dtype=torch.int8, device="cuda")
    sizes = torch.empty(B, Hkv, C, dtype=torch.int32, device="cuda")
    ends = torch.empty_like(sizes)
    counters = torch.zeros(B * Hkv, dtype=torch.int32, device="cuda")

    def launch(**kw):
        def run():
            counters.zero_()
            topk_union_launch(scores, krow, ptr, 0, picks, sizes, ends, counters, Hkv, **kw)
        return run

    row = {"batch": B, "chunks": C, "k": k, "zero": bench_us(counters.zero_, cuda_graph=True)}
    row["bisect"] = bench_us(launch(early_exit=False), cuda_graph=True)
    want = sizes.clone()
    row["early"] = bench_us(launch(early_exit=True), cuda_graph=True)
    row["same_sets"] = bool(torch.equal(sizes, want))
    row["bisect_picks_only"] = bench_us(launch(early_exit=False, union=False), cuda_graph=True)
    row["early_picks_only"] = bench_us(launch(early_exit=True, union=False), cuda_graph=True)
    for warps in (4, 8, 16, 32):
        row[f"early_w{warps}"] = bench_us(launch(early_exit=True, num_warps=warps), cuda_graph=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/kernels/select")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("select_kernel.py times a CUDA kernel: run it on a machine with a GPU")
    torch.manual_seed(0)
    rows = []
    for B, C, k in CASES:
        rows.append(time_case(B, C, k))
        print({key: round(v, 2) if isinstance(v, float) else v for key, v in rows[-1].items()}, flush=True)
    print()
    print_table(rows, [("batch", "B", "d"), ("chunks", "C", "d"), ("k", "k", "d"), ("bisect", "bisect us", ".1f"),
                       ("early", "early us", ".1f"), ("bisect_picks_only", "bisect picks-only", ".1f"),
                       ("early_picks_only", "early picks-only", ".1f"), ("early_w4", "w4", ".1f"),
                       ("early_w8", "w8", ".1f"), ("early_w16", "w16", ".1f"), ("early_w32", "w32", ".1f"),
                       ("zero", "zero us", ".1f"), ("same_sets", "same", "")])
    path = write_results(args.out, "select_kernel", {"environment": environment(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
