"""Where the fused top-k + union kernel's time goes (issue #6: it is the largest item of a decode
step at batch 1), in one run on one GPU, CUDA-graph replay.

    python benchmarks/select_kernel.py [--scores normal|qk] [--out benchmarks/results/kernels/select]

One launch of `gsa_rag.kernels.gist_select._topk_union_kernel` over scores [B, 32, C] (Llama-3-8B's
32 query heads over 8 KV heads), k per head as the 128K / 32K decode steps of benchmarks/kernels.py
use, and the rows of H-GSA 32x (top level 3.7K units, level 0 64 candidates):
  bisect     the threshold search over all 32 bits of the score's key (rounds 3-5)
  early      the search stopping once exactly k scores are above the threshold (EARLY_EXIT); its
             union tail writes the sizes' prefix sum along C (ENDS_PREFIX)
  blocksum   the same, the tail writing one sum per 64 chunks instead (ENDS_BLOCKS)
  interp     the interpolation search (SEARCH_INTERP: a normal fit, then regula falsi on the
             counts' normal quantiles, safeguarded by the bisection), the union tail in the default
             mode (ENDS_MODE); same_sets_interp: it picks what the early bisection picks (every
             head's row, the sizes and what the tail wrote); early_red / interp_red: each search's
             block reductions per head, mean and (_max) the slowest head, from the kernel's STATS
  picks only the same without the GQA union (each group's last program: OR of the G pick rows,
             sizes, prefix sum), so union = total - picks only
  expand     the expansion launch that follows each (it places chunks by what the tail wrote:
             block sums make every expansion program scan its own block), and select + expand
             for both, the part of the decode step that the choice changes; same_lists: both give
             the same key lists
and the early search at 4, 8, 16, 32 warps;
  union_kernel  the interpolation search with the GQA union in a launch of its own (UNION_KERNEL:
             many programs, UNION_TILE chunks each) instead of each group's last program, block sums;
             same_sets_union_kernel: it writes what the tail writes
  stream_tT_wW  the interpolation search with the row streamed T scores at a time at every pass
             instead of held in registers (STREAM_ROWS; W warps a program, so that several programs
             share an SM); same_sets_stream: the default tile picks what the registers do;
  window     the window select (`gsa_rag.kernels.window_select`, WINDOW_SELECT: each row's k-th place
             among the candidates of a window placed from a sample, rows split over programs where
             they are few) and the union kernel reading the scores against its thresholds, block
             sums; window_pP: rows split into parts of P scores; same_sets_window: it writes what
             union_kernel writes; window_fit / window_row: the share of rows resolved from the
             normal fit's window / by the whole-row search.
Microseconds per launch (median), each set of inputs
replayed from one graph with its counters re-zeroed (a memset, timed alone as `zero`, and inside
every select column).

--scores normal (default): random-normal score rows, the chunks and k of each case (rounds 6-9).
--scores qk: the decode benchmark's rows instead, which disagreed with random normals on what is
fastest (round 7, benchmarks/results/kernels/NOTES.md): bf16 random query and key tensors as
benchmarks/kernels.py draws them, scored by the decode step's scores kernel over the gist keys of
its synthetic layout (chunk 8, sink 4, a 32-token tail and one appended token) at the case's
context, with its adaptive k (ratio 8): 14563 chunks, k 512 at 128K. The H-GSA rows (fixed top-4)
score a layout of exactly their chunks. Either way the chunk sizes and the expansion's lists come
from that layout's DecodePlan (the select kernel reads its per-row offsets, as in the decode step;
rounds 6-9 shared one row of 9 columns per chunk).
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from gsa_rag.kernels import gist_select, window_select
from gsa_rag.kernels.bench import (
    bench_us,
    environment,
    print_table,
    synthetic_layout,
    write_results,
)
from gsa_rag.kernels.gist_select import (
    ENDS_BLOCKS,
    ENDS_MODE,
    ENDS_PREFIX,
    SEARCH_BISECT,
    SEARCH_INTERP,
    DecodePlan,
    _expand_launch,
    _scores_launch,
    ends_width,
    select_counters,
    topk_union_launch,
)
from gsa_rag.kernels.sparse_decode import next_pow2

from gsa_rag.config import GistConfig

CASES = [  # (batch, chunks, k, context of the decode benchmark's step): 128K and 32K at chunk 8 with
    # adaptive k, H-GSA 32x's two levels (no single-level context: fixed top-4 over `chunks`)
    (1, 16384, 512, 131072), (8, 16384, 512, 131072), (1, 4096, 128, 32768), (8, 4096, 128, 32768),
    (1, 3704, 4, None), (1, 64, 4, None),
]
CHUNK, SINK, TAIL = 8, 4, 32  # benchmarks/kernels.py's synthetic layout


def case_layout(C: int, k: int, context: int | None, scores: str) -> tuple[int, GistConfig]:
    """The synthetic layout's context (tokens) and the config of one case: with --scores qk and a
    context, the decode benchmark's (its adaptive k decides); otherwise a layout of exactly C
    chunks of CHUNK tokens and their gists, and fixed top-k."""
    if scores == "qk" and context is not None:
        return context, GistConfig(chunk_size=CHUNK, sink=SINK, k_policy="adaptive", adaptive_ratio=8.0)
    return SINK + C * (CHUNK + 1), GistConfig(chunk_size=CHUNK, sink=SINK, k_policy="fixed", top_k=k)


def case_inputs(B: int, C: int, k: int, context: int | None, scores: str, Hq: int = 32, Hkv: int = 8,
                D: int = 128, device: str = "cuda") -> tuple[torch.Tensor, DecodePlan]:
    """float32 [B, Hq, C'] score rows and the plan of their layout (C' = C unless --scores qk takes
    the decode benchmark's context). qk: as benchmarks/kernels.py, bf16 q [B, Hq, D] and keys
    [B, Hkv, T + 1, D], then the layout grows by the query token; scored as the decode step does."""
    tokens, config = case_layout(C, k, context, scores)
    layout = synthetic_layout(B, tokens, CHUNK, sink=SINK, tail=TAIL, device=device)
    T = layout.seq_len + 1  # one appended (generated) token: the query
    layout = layout.append(torch.full((B, 1), 7, device=device))
    plan = DecodePlan.build(layout, config, Hq // Hkv)
    if scores == "qk":
        q = torch.randn(B, Hq, D, device=device, dtype=torch.bfloat16)
        key = torch.randn(B, Hkv, T, D, device=device, dtype=torch.bfloat16)
        return _scores_launch(q, key, layout.gist_index, layout.num_chunks), plan
    return torch.randn(B, Hq, layout.gist_index.shape[1], device=device), plan


def same_lists(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether two (index [B, H, CAP], lengths [B, H]) key lists are equal: the same lengths and the
    same entries, in order, up to each row's length (what lies past it is unwritten)."""
    (ia, la), (ib, lb) = a, b
    if not torch.equal(la, lb):
        return False
    width = int(la.max()) if la.numel() else 0
    live = torch.arange(width, device=la.device) < la[..., None]
    return bool(torch.equal(torch.where(live, ia[..., :width], 0), torch.where(live, ib[..., :width], 0)))


def reduction_summary(stats: torch.Tensor) -> tuple[float, int]:
    """The select kernel's STATS output int32 [..., 2] -> (mean, max) over heads of the threshold
    search's block reductions (its first column; the kernel waits for its slowest program)."""
    steps = stats[..., 0].flatten().float()
    return (float(steps.mean()), int(steps.max())) if steps.numel() else (0.0, 0)


def time_case(B: int, C: int, k: int, context: int | None = None, scores: str = "normal", Hq: int = 32,
              Hkv: int = 8, D: int = 128, device: str = "cuda") -> dict:
    score_rows, plan = case_inputs(B, C, k, context, scores, Hq, Hkv, D, device)
    C = score_rows.shape[-1]
    krow = plan.k
    ptr = plan.chunk_ptr
    picks = torch.empty(B, Hq, C, dtype=torch.int8, device=device)
    sizes = {mode: torch.empty(B, Hkv, C, dtype=torch.int32, device=device) for mode in (ENDS_PREFIX, ENDS_BLOCKS)}
    ends = {mode: torch.empty(B, Hkv, ends_width(C, mode), dtype=torch.int32, device=device)
            for mode in (ENDS_PREFIX, ENDS_BLOCKS)}
    lists = {mode: (torch.empty(B, Hkv, plan.capacity, dtype=torch.int32, device=device),
                    torch.empty(B, Hkv, dtype=torch.int32, device=device)) for mode in (ENDS_PREFIX, ENDS_BLOCKS)}
    counters = select_counters(B, Hq, device).zero_()

    def launch(ends_mode=ENDS_PREFIX, search=SEARCH_BISECT, **kw):  # the bisection columns unless told
        def run():
            counters.zero_()
            topk_union_launch(score_rows, krow, ptr, ptr.stride(0), picks, sizes[ends_mode], ends[ends_mode], counters,
                              Hkv, ends_mode=ends_mode, search=search, **kw)
        return run

    def expand(ends_mode):
        return lambda: _expand_launch(plan, sizes[ends_mode], ends[ends_mode], ends_mode, out=lists[ends_mode])

    row = {"batch": B, "chunks": C, "k": int(krow.max()), "scores": scores,
           "zero": bench_us(counters.zero_, cuda_graph=True)}
    row["bisect"] = bench_us(launch(early_exit=False), cuda_graph=True)
    want = sizes[ENDS_PREFIX].clone()
    row["early"] = bench_us(launch(early_exit=True), cuda_graph=True)
    row["same_sets"] = bool(torch.equal(sizes[ENDS_PREFIX], want))
    row["blocksum"] = bench_us(launch(ENDS_BLOCKS, early_exit=True), cuda_graph=True)
    # the interpolation search, the default union tail; its sets against a fresh early bisection's
    launch(ENDS_MODE, early_exit=True, search=SEARCH_BISECT)()
    want = (picks.clone(), sizes[ENDS_MODE].clone(), ends[ENDS_MODE].clone())
    row["interp"] = bench_us(launch(ENDS_MODE, search=SEARCH_INTERP), cuda_graph=True)
    row["same_sets_interp"] = all(torch.equal(a, b) for a, b in zip((picks, sizes[ENDS_MODE], ends[ENDS_MODE]), want))
    stats = torch.empty(B, Hq, 2, dtype=torch.int32, device=device)
    for name, search in (("early", SEARCH_BISECT), ("interp", SEARCH_INTERP)):
        launch(ENDS_MODE, early_exit=True, search=search, stats=stats)()
        row[f"{name}_red"], row[f"{name}_red_max"] = reduction_summary(stats)
    row["expand_prefix"] = bench_us(expand(ENDS_PREFIX), cuda_graph=True)
    row["expand_blocks"] = bench_us(expand(ENDS_BLOCKS), cuda_graph=True)
    row["early_step"] = row["early"] + row["expand_prefix"]
    row["blocksum_step"] = row["blocksum"] + row["expand_blocks"]
    row["interp_step"] = row["interp"] + row["expand_blocks" if ENDS_MODE == ENDS_BLOCKS else "expand_prefix"]
    for mode in (ENDS_PREFIX, ENDS_BLOCKS):  # the lists from a fresh run of each (the sets: same_sets)
        launch(mode, early_exit=True)()
        expand(mode)()
    row["same_lists"] = same_lists(lists[ENDS_PREFIX], lists[ENDS_BLOCKS])
    row["bisect_picks_only"] = bench_us(launch(early_exit=False, union=False), cuda_graph=True)
    row["early_picks_only"] = bench_us(launch(early_exit=True, union=False), cuda_graph=True)
    row["interp_picks_only"] = bench_us(launch(search=SEARCH_INTERP, union=False), cuda_graph=True)
    for warps in (4, 8, 16, 32):
        row[f"early_w{warps}"] = bench_us(launch(early_exit=True, num_warps=warps), cuda_graph=True)
    launch(ENDS_BLOCKS, search=SEARCH_INTERP, union_kernel=False)()
    want = (picks.clone(), sizes[ENDS_BLOCKS].clone(), ends[ENDS_BLOCKS].clone())
    row["union_kernel"] = bench_us(launch(ENDS_BLOCKS, search=SEARCH_INTERP, union_kernel=True), cuda_graph=True)
    row["same_sets_union_kernel"] = all(torch.equal(a, b) for a, b in zip((picks, sizes[ENDS_BLOCKS], ends[ENDS_BLOCKS]),
                                                                          want))
    launch(ENDS_MODE, search=SEARCH_INTERP)()
    want = (picks.clone(), sizes[ENDS_MODE].clone(), ends[ENDS_MODE].clone())
    for tile, warps in STREAM_SETTINGS:
        with stream_tile(tile):
            row[f"stream_t{tile}_w{warps}"] = bench_us(launch(ENDS_MODE, search=SEARCH_INTERP, stream=True,
                                                              num_warps=warps), cuda_graph=True)
    launch(ENDS_MODE, search=SEARCH_INTERP, stream=True)()
    row["same_sets_stream"] = all(torch.equal(a, b) for a, b in zip((picks, sizes[ENDS_MODE], ends[ENDS_MODE]), want))
    time_window(row, launch, sizes[ENDS_BLOCKS], ends[ENDS_BLOCKS], score_rows, krow, counters)
    return row


WINDOW_PARTS = [1024, 2048, 4096, 8192, 16384]


def time_window(row: dict, launch, sizes: torch.Tensor, ends: torch.Tensor, score_rows: torch.Tensor,
                krow: torch.Tensor, counters: torch.Tensor) -> None:
    """The window columns of `time_case` (after union_kernel's: its sets are the reference)."""
    launch(ENDS_BLOCKS, search=SEARCH_INTERP, union_kernel=True)()
    want = (sizes.clone(), ends.clone())
    row["window"] = bench_us(launch(ENDS_BLOCKS, window=True), cuda_graph=True)
    row["same_sets_window"] = all(torch.equal(a, b) for a, b in zip((sizes, ends), want))
    for part in WINDOW_PARTS:
        if part <= next_pow2(score_rows.shape[-1]):
            with window_parts(part):
                row[f"window_p{part}"] = bench_us(launch(ENDS_BLOCKS, window=True), cuda_graph=True)
    B, Hq, _ = score_rows.shape
    paths = torch.empty(B * Hq, dtype=torch.int32, device=score_rows.device)
    out = torch.empty(B * Hq, device=score_rows.device)
    counters.zero_()
    window_select.window_select_launch(score_rows, krow, counters, out, paths.clone(), paths=paths)
    row["window_fit"] = float((paths == window_select.PATH_FIT).float().mean())
    row["window_row"] = float((paths == window_select.PATH_ROW).float().mean())


def window_parts(part: int):
    return mock.patch.multiple(window_select, WINDOW_PART_MIN=part, WINDOW_PART_MAX=part)


STREAM_SETTINGS = [(1024, 4), (1024, 8), (2048, 8), (2048, 16), (4096, 16)]  # (tile, warps)


def stream_tile(tile: int):
    return mock.patch.object(gist_select, "STREAM_TILE", tile)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", choices=["normal", "qk"], default="normal",
                        help="random-normal score rows, or the decode benchmark's q . k of bf16 tensors")
    parser.add_argument("--out", default="benchmarks/results/kernels/select")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("select_kernel.py times a CUDA kernel: run it on a machine with a GPU")
    torch.manual_seed(0)
    rows = []
    for B, C, k, context in CASES:
        rows.append(time_case(B, C, k, context, args.scores))
        print({key: round(v, 2) if isinstance(v, float) else v for key, v in rows[-1].items()}, flush=True)
    print()
    print_table(rows, [("batch", "B", "d"), ("chunks", "C", "d"), ("k", "k", "d"), ("bisect", "bisect us", ".1f"),
                       ("early", "early us", ".1f"), ("blocksum", "blocksum us", ".1f"),
                       ("interp", "interp us", ".1f"),
                       ("expand_prefix", "expand", ".1f"), ("expand_blocks", "expand(bs)", ".1f"),
                       ("early_step", "early+expand", ".1f"), ("blocksum_step", "blocksum+expand", ".1f"),
                       ("interp_step", "interp+expand", ".1f"),
                       ("bisect_picks_only", "bisect picks-only", ".1f"),
                       ("early_picks_only", "early picks-only", ".1f"),
                       ("interp_picks_only", "interp picks-only", ".1f"),
                       ("early_red", "early red", ".1f"), ("early_red_max", "max", "d"),
                       ("interp_red", "interp red", ".1f"), ("interp_red_max", "max", "d"), ("early_w4", "w4", ".1f"),
                       ("early_w8", "w8", ".1f"), ("early_w16", "w16", ".1f"), ("early_w32", "w32", ".1f"),
                       ("union_kernel", "union kernel", ".1f"), ("window", "window", ".1f"),
                       *[(f"window_p{p}", f"window p{p}", ".1f") for p in WINDOW_PARTS],
                       ("window_fit", "fit", ".2f"), ("window_row", "row", ".2f"),
                       *[(f"stream_t{t}_w{w}", f"stream {t}/{w}", ".1f") for t, w in STREAM_SETTINGS],
                       ("zero", "zero us", ".1f"), ("same_sets", "same", ""), ("same_lists", "same_lists", ""),
                       ("same_sets_interp", "same_interp", ""), ("same_sets_stream", "same_stream", ""),
                       ("same_sets_union_kernel", "same_union_kernel", ""), ("same_sets_window", "same_window", "")])
    name = "select_kernel" if args.scores == "normal" else f"select_kernel_{args.scores}"
    path = write_results(args.out, name, {"environment": environment(), "scores": args.scores, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
