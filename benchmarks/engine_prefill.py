"""The engine's whole prefill forward, its gist-mask rows through FlexAttention or through SDPA,
against the unmodified model's dense causal prefill, on the GPU.

    python benchmarks/engine_prefill.py                                  # default model's shapes, 1K..32K
    python benchmarks/engine_prefill.py --arch llama3-8b --layers 8      # Llama-3-8B layers
    python benchmarks/engine_prefill.py --quick                          # 4K and 8K
    python benchmarks/engine_prefill.py --meta 4                         # H-GSA 32x layouts
    python benchmarks/engine_prefill.py --flex-tiles flex                # FlexAttention's own tiles

A random-weight model (speed does not depend on the weights; no download), bf16, batch
`--batch`, over a synthetic gist layout (chunk 8, sink 4, a 32-token question whose rows select
chunks in every selecting layer, adaptive k), each forward from an empty cache:

    hf         the model with attn_implementation="sdpa": dense causal attention (flash), the bar;
    gsa_sdpa   gsa_rag.generation.forward with attention.FLEX_PREFILL = False: the forgetting
               mask's rows through SDPA under the dense mask (a float bias, K/V repeated per query head);
    gsa_flex   the same with FLEX_PREFILL = True: those rows through FlexAttention
               (gsa_rag.kernels.prefill.masked_prefill; the default on CUDA from
               attention.FLEX_MIN_ROWS rows).

`*_ms` is the median of `--reps` timed forwards after one untimed (`*_first_ms`: the first at
that length, compiles included; FlexAttention compiles with dynamic shapes, twice, so a later
length's first forward shows whether it compiled again); a method that runs out of device memory
gets NaN and `*_oom`. `*_peak_mb` is the peak device memory
a forward allocated above what it held before. `err` = |logits flex - sdpa| / |logits sdpa| over
the last row. Writes `--out`/`--name`.json (and .png when matplotlib imports); results are never
overwritten.
"""

from __future__ import annotations

import os
import sys

# benchmarks/kernels.py shares its name with the `kernels` package that transformers imports:
# drop this folder from the import path so `import kernels` can never find a script here
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import time

import torch
from gsa_rag.kernels.bench import (
    ARCHS,
    context_tag,
    decode_case,
    environment,
    print_table,
    random_model,
    refuse_existing_results,
    rel_err,
    set_attention,
    write_results,
)

K = 1024
METHODS = ("hf", "gsa_sdpa", "gsa_flex")


def run_once(model, layout, config, method: str) -> tuple[float, float, torch.Tensor]:
    """One prefill from an empty cache -> (seconds, peak MB above the start, last row's logits)."""
    from transformers import DynamicCache

    from gsa_rag import attention
    from gsa_rag.generation import _cache_keyword, forward

    set_attention(model, "sdpa" if method == "hf" else "gsa")
    attention.FLEX_PREFILL = method == "gsa_flex"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    with torch.inference_mode():
        if method == "hf":
            out = model(input_ids=layout.input_ids, position_ids=layout.position_ids, use_cache=True,
                        logits_to_keep=1, **{_cache_keyword(model): DynamicCache()})
        else:
            out = forward(model, layout, layout.seq_len, DynamicCache(), config, logits_to_keep=1)[0]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return seconds, peak, out.logits[:, -1].float()


def bench_context(model, L: int, args) -> dict:
    config, layout = decode_case(args.batch, L, 8, meta_chunks=args.meta, device="cuda")
    row = {"context": L, "T": layout.seq_len, "batch": args.batch}
    logits = {}
    for method in METHODS:
        try:
            first, _, logits[method] = run_once(model, layout, config, method)
            times, peaks = [], []
            for _ in range(args.reps):
                seconds, peak, _ = run_once(model, layout, config, method)
                times.append(seconds)
                peaks.append(peak)
        except torch.OutOfMemoryError:  # SDPA's dense bias at long contexts: the row says so
            torch.cuda.empty_cache()
            row[f"{method}_oom"] = True
            first, times, peaks = float("nan"), [float("nan")], [float("nan")]
        row[f"{method}_first_ms"] = 1e3 * first
        row[f"{method}_ms"] = 1e3 * sorted(times)[len(times) // 2]
        row[f"{method}_peak_mb"] = max(peaks)
    row["err"] = (rel_err(logits["gsa_flex"], logits["gsa_sdpa"])
                  if "gsa_flex" in logits and "gsa_sdpa" in logits else float("nan"))
    row["x_sdpa"] = row["gsa_sdpa_ms"] / row["gsa_flex_ms"]  # > 1: flex is faster
    row["x_hf"] = row["gsa_flex_ms"] / row["hf_ms"]  # < 1: faster than dense causal
    print(f"L={L // K}K: hf {row['hf_ms']:.1f} ms, gsa_sdpa {row['gsa_sdpa_ms']:.1f}, gsa_flex {row['gsa_flex_ms']:.1f} "
          f"(x{row['x_sdpa']:.2f} sdpa, {row['x_hf']:.2f} of hf), first {row['gsa_flex_first_ms']:.0f} ms, "
          f"peak {row['gsa_sdpa_peak_mb']:.0f} -> {row['gsa_flex_peak_mb']:.0f} MB, err {row['err']:.1e}", flush=True)
    return row


def result_name(arch: str, layers: int, contexts: list[int], batch: int, min_rows: int, tiles: str | None,
                meta: list[int]) -> str:
    """Every setting that changes the rows, so two runs that differ in one never share a file."""
    rows = f"_min{min_rows}" if min_rows else ""
    tiles = f"_tiles{tiles.replace(',', 'x')}" if tiles else ""
    levels = f"_meta{'-'.join(map(str, meta))}" if meta else ""
    return f"engine_prefill_{arch}_l{layers}_b{batch}_ctx{context_tag(contexts)}{levels}{rows}{tiles}"


def tiles_arg(text: str) -> str:
    """--flex-tiles: 'flex' or BLOCK_M,BLOCK_N (powers of two from 16)."""
    sizes = text.split(",")
    if text != "flex" and (len(sizes) != 2 or not all(x.isdigit() and int(x) >= 16 and int(x) & (int(x) - 1) == 0
                                                      for x in sizes)):
        raise argparse.ArgumentTypeError(f"expected 'flex' or two powers of two from 16 as BLOCK_M,BLOCK_N "
                                         f"(e.g. 64,64), got {text!r}")
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4K and 8K only")
    p.add_argument("--arch", default="smollm2-135m", choices=list(ARCHS))
    p.add_argument("--layers", type=int, default=None, help="override the layer count (llama3-8b: 8 keeps it fast)")
    p.add_argument("--contexts", default="1,2,4,8,16,32", help="K tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--meta", type=int, nargs="*", default=[],
                   help="H-GSA: chunks a gist of each level above the first sums (4 -> 32x); none: flat GSA")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--min-rows", type=int, default=0,
                   help="attention.FLEX_MIN_ROWS for gsa_flex (default 0: FlexAttention at every length, to show "
                        "where it starts to pay; the engine's default is attention.FLEX_MIN_ROWS)")
    p.add_argument("--flex-tiles", default=None, type=tiles_arg,
                   help="FlexAttention's tiles for gsa_flex as BLOCK_M,BLOCK_N, or 'flex' for its own "
                        "(default: kernels.prefill.FLEX_TILES for the head dim)")
    p.add_argument("--out", default="benchmarks/results/engine_prefill", help="folder of the result files")
    p.add_argument("--name", default=None, help="result file name without .json (default: every setting)")
    args = p.parse_args(argv)
    contexts = [4 * K, 8 * K] if args.quick else [int(float(x) * K) for x in args.contexts.split(",")]
    layers = args.layers or ARCHS[args.arch]["num_hidden_layers"]
    name = args.name or result_name(args.arch, layers, contexts, args.batch, args.min_rows, args.flex_tiles, args.meta)
    refuse_existing_results(p, args.out, name)  # before the measurements, not after them
    if not torch.cuda.is_available():
        sys.exit("benchmarks/engine_prefill.py needs CUDA")
    from gsa_rag.kernels import prefill

    from gsa_rag import attention

    spec = ARCHS[args.arch]
    head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    if args.flex_tiles == "flex":
        prefill.FLEX_TILES.pop(head_dim, None)
    elif args.flex_tiles:
        prefill.FLEX_TILES[head_dim] = tuple(int(x) for x in args.flex_tiles.split(","))
    default_min_rows = attention.FLEX_MIN_ROWS
    attention.FLEX_MIN_ROWS = args.min_rows
    model = random_model(args.arch, args.layers, "cuda")
    rows = [bench_context(model, L, args) for L in contexts]
    print()
    print_table(rows, [
        ("context", "ctx", "d"), ("hf_ms", "hf", ".1f"), ("gsa_sdpa_ms", "gsa_sdpa", ".1f"), ("gsa_flex_ms", "gsa_flex", ".1f"),
        ("x_sdpa", "sdpa/flex", ".2f"), ("x_hf", "flex/hf", ".2f"), ("gsa_flex_first_ms", "flex_first", ".0f"),
        ("gsa_sdpa_peak_mb", "sdpa_MB", ".0f"), ("gsa_flex_peak_mb", "flex_MB", ".0f"), ("hf_peak_mb", "hf_MB", ".0f"),
        ("err", "err", ".1e"),
    ])
    print(f"\nms per prefill forward ({layers} layers, batch {args.batch}); sdpa/flex > 1: FlexAttention is faster; "
          f"flex/hf < 1: faster than the unmodified model's dense causal prefill")

    def plot(plt, path):
        fig, ax = plt.subplots(figsize=(6, 4))
        ctx = [r["context"] // K for r in rows]
        for method, label in (("hf", "dense causal (HF, flash)"), ("gsa_sdpa", "engine, SDPA under the mask"),
                              ("gsa_flex", "engine, FlexAttention")):
            ax.plot(ctx, [r[f"{method}_ms"] for r in rows], marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="context (K tokens)", ylabel="ms per prefill")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    payload = {"env": environment(), "arch": args.arch, "layers": layers, "batch": args.batch,
               "meta_chunks": args.meta, "min_rows": args.min_rows, "flex_tiles": prefill.FLEX_TILES.get(head_dim),
               "engine_flex_min_rows": default_min_rows, "rows": rows}
    print(f"wrote {write_results(args.out, name, payload, plot)}")


if __name__ == "__main__":
    main()
