"""End-to-end decode speed of the GSA engine's loop vs Hugging Face full attention, on the GPU.

    python benchmarks/decode_latency.py            # 8K..32K, < 4 minutes on an H200
    python benchmarks/decode_latency.py --quick    # 30-second smoke run

A random-weight model of the default model's architecture (SmolLM2-135M: 30 layers, 9 q / 3 kv
heads, d=64), or `--arch llama3-8b` (Llama-3-8B layers, `--layers` of them), bf16; no download.
Decode speed does not depend on the weights, so the cache is filled by one plain causal prefill
over a synthetic gist layout (chunk 8, sink 4, a 32-token question), then each method decodes
`--steps` tokens from the same cache (cropped back between methods):

    hf        the model with attn_implementation="sdpa": full attention over the whole cache;
    gsa_ref   gsa_rag.generation.forward with GSA_RAG_KERNELS=0 (dense selective mask + SDPA);
    gsa       the same with the kernels (key lists + sparse flash-decode).

Adaptive k (about L/8 raw tokens per KV head); with `--meta 4` an H-GSA layout (chunk 8, a
meta-gist every 4 gists: 32x) selected coarse to fine, `--top-k` units per head at every level.
tokens/s = batch * steps / wall time (synchronised).
The KV cache of these three is HF's DynamicCache, which concatenates every layer's K/V at every
step (a copy of the whole cache): that cost is in each of them and bounds the speedup of any
sparse attention. With `--cache both` (the default) two more columns decode from the same prefill
held in the engine's own cache, gsa_rag.decode_cache.DecodeCache (a step writes its one column):

    hf_dc     hf over a DecodeCache (full attention without the copy: the fair dense baseline);
    gsa_dc    gsa over a DecodeCache (what GistEngine runs).

`--cache dynamic` runs the first three only (the output of earlier rounds). With `--graphs` (the
default) two more decode from their own copy of the prefill in a pinned DecodeCache, each step a
replay of one CUDA graph (gsa_rag.graph_decode; the capture and the first, eager step untimed):

    hf_graph    full attention (the model's SDPA, a mask of the written columns: what HF's static
                cache runs) replayed;
    dense_graph full attention through the engine's own flash-decode kernel, every written column
                in its list: the strictest dense baseline (the kernel runs at >= 90% of the copy
                bandwidth at batch 8, benchmarks/kernels.py);
    gsa_graph   the engine's graph decode (what GistEngine runs on CUDA by default).

Writes `--out`/`--name`.json and a bar chart of every column's tokens/s beside it (.png, when
matplotlib imports; `--replot FILE.json` redraws one from a result file); the default name holds
every setting (result_name), e.g.
decode_latency_smollm2-135m_L30_ctx8k+16k+32k_b1_s32_w32_both.json, and an existing file is
never overwritten: the run is refused before it starts.
"""

from __future__ import annotations

import os
import sys

# benchmarks/kernels.py shares its name with the `kernels` package that transformers imports:
# drop this folder from the import path so `import kernels` can never find a script here
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import json
import time
from pathlib import Path

import torch
from gsa_rag.kernels.bench import (
    ARCHS,
    context_tag,
    crop_cache,
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
DEVICE = "cuda"  # a CPU smoke test of this script sets "cpu" (with TRITON_INTERPRET=1)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def decode_cache_from(cache, reserve: int):
    """A DecodeCache holding the columns of a filled DynamicCache, with `reserve` spare columns."""
    from gsa_rag.decode_cache import DecodeCache

    grown = DecodeCache(reserve=reserve)
    for layer_idx, layer in enumerate(cache.layers):
        grown.update(layer.keys, layer.values, layer_idx)
    return grown


def decode(model, layout, cache, prefill_len, config, steps, mode):
    """Decodes `steps` tokens after cropping `cache` to `prefill_len`; returns (seconds, first logits)."""
    from gsa_rag.generation import _cache_keyword, forward

    crop_cache(cache, prefill_len)
    token = torch.full((layout.batch_size, 1), 7, dtype=torch.long, device=DEVICE)
    first = None
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        layout = layout.append(token)
        if mode == "hf":
            out = model(input_ids=token, position_ids=layout.position_ids[:, -1:], use_cache=True,
                        **{_cache_keyword(model): cache})
        else:
            out, _ = forward(model, layout, 1, cache, config)
        if first is None:
            first = out.logits[:, -1].float()
        token = out.logits[:, -1:].argmax(-1)
    sync()
    return time.perf_counter() - t, first


def dense_list_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Full attention of one decode row through `sparse_decode_triton`, the list every column the
    [B, 1, 1, W] mask of the pinned step allows (a prefix: its count is the list's length)."""
    from gsa_rag.kernels.sparse_decode import sparse_decode_triton

    B, Hq, _, D = query.shape
    W = key.shape[2]
    index = torch.arange(W, dtype=torch.int32, device=query.device).repeat(B, 1, 1)
    lengths = attention_mask[:, 0, 0].sum(-1, dtype=torch.int32)[:, None]
    out = torch.empty(B, 1, Hq, D, dtype=query.dtype, device=query.device)
    sparse_decode_triton(query[:, :, 0], key, value, index, lengths, scaling, out=out[:, 0])
    return out, None


def graph_decode(model, layout, cache, config, steps, full_attention):
    """`steps` replayed steps after an eager, capturing first one, from a copy of `cache`
    (DecodeCache, pinned); returns (seconds of the replays, the first step's logits, seconds of the
    first step: decoder made, eager step, capture)."""
    from gsa_rag.graph_decode import GraphDecoder

    crop_cache(cache, layout.seq_len)  # the eager columns left their steps in it
    grown = decode_cache_from(cache, reserve=steps + 1)
    sync()
    t = time.perf_counter()
    decoder = GraphDecoder(model, layout, grown, config, steps + 1, full_attention=full_attention)
    try:
        token = torch.full((layout.batch_size,), 7, dtype=torch.long, device=DEVICE)
        logits = decoder.step(token)
        first = logits.float().clone()
        sync()
        first_seconds = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            logits = decoder.step(logits.argmax(-1))
        sync()
        return time.perf_counter() - t, first, first_seconds
    finally:
        decoder.close()



# the columns a chart shows, in this order: HF's full attention, then the dense kernel, then GSA
PLOTTED = [("hf", "HF, DynamicCache"), ("hf_dc", "HF, DecodeCache"), ("hf_graph", "HF, replayed"),
           ("dense_graph", "dense, our kernel, replayed"), ("gsa", "GSA, DynamicCache"),
           ("gsa_dc", "GSA, DecodeCache"), ("gsa_graph", "GSA, replayed (the engine)")]


def draw(plt, path, rows: list[dict]) -> None:
    """Grouped bars, log scale: each column's tokens/s, one group per (context, batch) row."""
    columns = [(key, label) for key, label in PLOTTED if any(f"{key}_tok_s" in r for r in rows)]
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) + 2), 5.0))
    for i, (key, label) in enumerate(columns):
        ax.bar([j + i * width for j in range(len(rows))], [r.get(f"{key}_tok_s", 0.0) for r in rows], width,
               label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))],
                  [f"{r['context'] // K}K, batch {r['batch']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (log)")
    ax.set_title(f"decode, {rows[0]['arch']} ({rows[0]['layers']} layers), random weights")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))  # below: bars reach the top
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(result: Path) -> Path:
    """Draws the chart of an existing result file beside it; an existing chart is kept."""
    png = result.with_suffix(".png")
    if png.exists():
        sys.exit(f"{png} exists: results are never overwritten")
    rows = json.loads(result.read_text())["rows"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    draw(plt, png, rows)
    plt.close("all")
    return png


def result_name(arch: str, layers: int, contexts: list[int], batch: int, steps: int, warmup: int, cache: str,
                score_dtype: str = "cache", graphs: bool = False, meta: tuple[int, ...] = (), top_k: int = 4) -> str:
    """The default result name: every setting that changes the rows, so two runs that differ in
    any of them never share a file (the name held only the architecture: a re-run with another
    warm-up or context list replaced the earlier run's rows)."""
    ctx = context_tag(contexts)
    scores = "" if score_dtype == "cache" else f"_scores-{score_dtype}"
    hier = f"_meta{'+'.join(map(str, meta))}_top{top_k}" if meta else ""
    return (f"decode_latency_{arch}_L{layers}_ctx{ctx}_b{batch}_s{steps}_w{warmup}_{cache}{scores}{hier}"
            f"{'_graphs' if graphs else ''}")



def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="30-second smoke run (8K, 8 steps)")
    p.add_argument("--arch", default="smollm2-135m", choices=list(ARCHS))
    p.add_argument("--layers", type=int, default=None, help="override the layer count (llama3-8b: 8 keeps it fast)")
    p.add_argument("--contexts", nargs="+", default=["8,16,32"], help="tokens (>= 1024) or K tokens, e.g. 8,16,32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per method before timing, at least --steps: the timed run repeats the "
                        "warmed-up steps from the same cache, so Triton's compiles (a variant per new integer "
                        "specialisation) stay out of the timing")
    p.add_argument("--cache", default="both", choices=["both", "dynamic"],
                   help="both: also hf_dc / gsa_dc over the engine's DecodeCache; dynamic: DynamicCache only")
    p.add_argument("--score-dtype", default="cache", choices=["cache", "int8"],
                   help="GistConfig.score_dtype of the gsa columns: int8 scores an int8 copy of the gist keys")
    p.add_argument("--meta", type=int, nargs="*", default=[],
                   help="H-GSA: gists per meta-gist at each level above the chunks (GistConfig.meta_chunks), e.g. 4")
    p.add_argument("--top-k", type=int, default=4, help="with --meta: units each query head keeps at every level")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="also hf_graph / gsa_graph: every step a CUDA graph replay (--no-graphs: eager only)")
    p.add_argument("--out", default="benchmarks/results/kernels", help="folder of the result file")
    p.add_argument("--name", default=None, help="result file name without .json (default: result_name's, every setting)")
    p.add_argument("--replot", type=Path, default=None, metavar="FILE.json",
                   help="measure nothing: draw the chart of this result file beside it")
    args = p.parse_args(argv)
    if args.replot is not None:
        print(f"wrote {replot(args.replot)}")
        return
    contexts = [int(x) if int(x) >= K else int(x) * K for v in args.contexts for x in v.split(",") if x]
    steps = args.steps
    if args.quick:
        contexts, steps = [8 * K], 8
    layers = args.layers or ARCHS[args.arch]["num_hidden_layers"]  # random_model's rule
    name = args.name or result_name(args.arch, layers, contexts, args.batch, steps, max(args.warmup, steps), args.cache,
                                    args.score_dtype, args.graphs, tuple(args.meta), args.top_k)
    refuse_existing_results(p, args.out, name)  # before the measurements, not after them
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/decode_latency.py needs CUDA")
    from transformers import DynamicCache

    from gsa_rag.generation import _cache_keyword

    model = random_model(args.arch, args.layers, DEVICE)
    from transformers import AttentionInterface

    AttentionInterface.register("dense_list", dense_list_attention)
    rows = []
    for L in contexts:
        config, layout = decode_case(args.batch, L, 8, tuple(args.meta), args.top_k, args.score_dtype, device=DEVICE)
        T = layout.seq_len
        cache = DynamicCache()
        set_attention(model, "sdpa")
        with torch.inference_mode():
            model(input_ids=layout.input_ids, position_ids=layout.position_ids, use_cache=True, logits_to_keep=1,
                  **{_cache_keyword(model): cache})
            row = {"arch": args.arch, "layers": model.config.num_hidden_layers, "context": L, "T": T,
                   "batch": args.batch, "steps": steps, "warmup": max(args.warmup, steps),
                   "score_dtype": args.score_dtype, "meta": list(args.meta), "top_k": args.top_k if args.meta else None}
            firsts = {}
            runs = [("hf", cache), ("gsa_ref", cache), ("gsa", cache)]
            if args.cache == "both":  # the same prefill, copied once into the engine's cache
                grown = decode_cache_from(cache, reserve=max(steps, args.warmup))
                runs += [("hf_dc", grown), ("gsa_dc", grown)]
            for mode, kv in runs:
                method = mode.removesuffix("_dc")
                set_attention(model, "sdpa" if method == "hf" else "gsa")
                os.environ["GSA_RAG_KERNELS"] = "0" if method == "gsa_ref" else "1"
                # warm-up over the very steps timed next (Triton compiles, cuBLAS handles): an 8K row timed after
                # fewer warm-up steps than timed steps ran slower than the 32K row (compiles in the timing)
                decode(model, layout, kv, T, config, max(args.warmup, steps), method)
                seconds, firsts[mode] = decode(model, layout, kv, T, config, steps, method)
                row[f"{mode}_tok_s"] = args.batch * steps / seconds
                row[f"{mode}_ms_per_step"] = 1e3 * seconds / steps
            if args.graphs:  # after the eager columns: each copies the prefill into a pinned DecodeCache
                for mode, attention in (("hf_graph", "sdpa"), ("dense_graph", "dense_list"), ("gsa_graph", "gsa")):
                    set_attention(model, attention)
                    os.environ["GSA_RAG_KERNELS"] = "1"
                    seconds, firsts[mode], first = graph_decode(model, layout, cache, config, steps, mode != "gsa_graph")
                    row[f"{mode}_tok_s"] = args.batch * steps / seconds
                    row[f"{mode}_ms_per_step"] = 1e3 * seconds / steps
                    row[f"{mode}_first_ms"] = 1e3 * first  # what a generation pays once for its graph
            row["logits_rel_err"] = rel_err(firsts["gsa"], firsts["gsa_ref"])
        row["x_hf"] = row["gsa_tok_s"] / row["hf_tok_s"]
        row["x_ref"] = row["gsa_tok_s"] / row["gsa_ref_tok_s"]
        line = (f"L={L // K}K: hf {row['hf_tok_s']:.1f} tok/s, gsa_ref {row['gsa_ref_tok_s']:.1f}, gsa {row['gsa_tok_s']:.1f} "
                f"(x{row['x_hf']:.2f} hf), logits err {row['logits_rel_err']:.1e}")
        if args.cache == "both":
            row["x_hf_dc"] = row["gsa_dc_tok_s"] / row["hf_dc_tok_s"]  # both without the per-step copy
            row["x_dc_hf"] = row["gsa_dc_tok_s"] / row["hf_tok_s"]  # the engine vs stock HF (DynamicCache)
            row["x_dc"] = row["gsa_dc_tok_s"] / row["gsa_tok_s"]  # what the cache alone gains
            row["dc_logits_rel_err"] = rel_err(firsts["gsa_dc"], firsts["gsa"])  # same kernels: ~0
            line += (f"; DecodeCache: hf {row['hf_dc_tok_s']:.1f}, gsa {row['gsa_dc_tok_s']:.1f} "
                     f"(x{row['x_hf_dc']:.2f} hf_dc, x{row['x_dc_hf']:.2f} hf, x{row['x_dc']:.2f} gsa)")
        if args.graphs:
            row["x_graph"] = row["gsa_graph_tok_s"] / row["hf_graph_tok_s"]  # both replayed
            row["x_graph_dense"] = row["gsa_graph_tok_s"] / row["dense_graph_tok_s"]  # and the same attention kernel
            row["dense_graph_logits_rel_err"] = rel_err(firsts["dense_graph"], firsts["hf"])
            row["x_graph_hf"] = row["gsa_graph_tok_s"] / row["hf_tok_s"]  # the engine on CUDA vs stock HF
            # against the fastest of HF's full attention columns (stock, over the DecodeCache, replayed)
            row["x_graph_best_hf"] = row["gsa_graph_tok_s"] / max(row.get(k, 0.0) for k in ("hf_tok_s", "hf_dc_tok_s", "hf_graph_tok_s"))
            row["graph_logits_rel_err"] = rel_err(firsts["gsa_graph"], firsts["gsa"])
            row["hf_graph_logits_rel_err"] = rel_err(firsts["hf_graph"], firsts["hf"])
            line += (f"; graphs: hf {row['hf_graph_tok_s']:.1f}, dense {row['dense_graph_tok_s']:.1f}, "
                     f"gsa {row['gsa_graph_tok_s']:.1f} (x{row['x_graph']:.2f} hf_graph, "
                     f"x{row['x_graph_dense']:.2f} dense_graph, x{row['x_graph_hf']:.2f} hf, "
                     f"x{row['x_graph_best_hf']:.2f} the fastest hf)")
        rows.append(row)
        print(line, flush=True)
        write_results(args.out, name, {"env": environment(), "rows": rows})  # incremental
    os.environ.pop("GSA_RAG_KERNELS", None)
    print()
    print_table(rows, [
        ("arch", "arch", "s"), ("layers", "layers", "d"), ("context", "ctx", "d"), ("batch", "B", "d"),
        ("hf_tok_s", "hf tok/s", ".1f"), ("gsa_ref_tok_s", "gsa_ref", ".1f"), ("gsa_tok_s", "gsa", ".1f"),
        ("hf_ms_per_step", "hf ms", ".2f"), ("gsa_ms_per_step", "gsa ms", ".2f"),
        ("x_hf", "gsa/hf", ".2f"), ("x_ref", "gsa/ref", ".2f"), ("logits_rel_err", "err", ".1e"),
    ] + ([
        ("hf_dc_tok_s", "hf_dc", ".1f"), ("gsa_dc_tok_s", "gsa_dc", ".1f"), ("gsa_dc_ms_per_step", "gsa_dc ms", ".2f"),
        ("x_hf_dc", "gsa_dc/hf_dc", ".2f"), ("x_dc_hf", "gsa_dc/hf", ".2f"), ("x_dc", "gsa_dc/gsa", ".2f"),
        ("dc_logits_rel_err", "dc err", ".1e"),
    ] if args.cache == "both" else []) + ([
        ("hf_graph_tok_s", "hf_graph", ".1f"), ("dense_graph_tok_s", "dense_graph", ".1f"),
        ("gsa_graph_tok_s", "gsa_graph", ".1f"), ("gsa_graph_ms_per_step", "gsa_graph ms", ".2f"),
        ("x_graph", "gsa_graph/hf_graph", ".2f"), ("x_graph_dense", "gsa_graph/dense_graph", ".2f"),
        ("x_graph_hf", "gsa_graph/hf", ".2f"), ("x_graph_best_hf", "gsa_graph/best hf", ".2f"),
        ("gsa_graph_first_ms", "gsa_graph 1st ms", ".1f"), ("graph_logits_rel_err", "graph err", ".1e"),
    ] if args.graphs else []))
    print("\nx = tokens/s ratio (> 1: GSA faster); err = first decode step's logits, kernels vs reference path")
    if args.cache == "both":
        print("_dc = over gsa_rag's DecodeCache (no per-step KV copy); dc err = gsa_dc vs gsa logits")
    if args.graphs:
        print("_graph = every step a CUDA graph replay (gsa_rag.graph_decode); graph err = gsa_graph vs gsa logits;")
        print("dense_graph = full attention through the engine's flash-decode kernel (every written column listed)")
    path = write_results(args.out, name, {"env": environment(), "rows": rows}, lambda plt, png: draw(plt, png, rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
