"""Decode-step attention of one layer on the GPU: GSA (gist scoring + top-k + key list + sparse
split-K flash-decode) against dense SDPA (flash backend) and FlexAttention over the full KV.

    python benchmarks/kernels.py            # full sweep, < 4 minutes on an H200
    python benchmarks/kernels.py --quick    # 30-second smoke run

Shapes: Llama-3-8B (32 q / 8 kv heads, d=128) and SmolLM2-135M, the default model (9 q / 3 kv,
d=64); batch 1 and 8; context 4K..128K; chunk 8, adaptive k (about L/8 raw tokens per KV
head, the union of its query heads' picks); bf16.

Byte floor: a step cannot beat the bytes it must read once. Dense: all K and V. GSA: the gist
keys, the listed K/V rows, the index list and the fp32 scores (written, then read by top-k).
floor_us = bytes / measured copy bandwidth (read + written), so `ceiling` = dense bytes / GSA
bytes is the best speedup over a dense step at the copy bandwidth.

Columns: dense/flex/gsa in us (medians of CUDA-event timings; `graph` columns replay CUDA graphs,
without launch gaps); `x_dense` = dense / gsa (graph); `score%` = share of the step spent
before the attention kernel (scores + top-k + list); `bw` = achieved bandwidth of the sparse
attention kernel on the bytes it touches, and of the whole step; `%floor` = floor / gsa time.
Small sizes fit in the 60 MB L2: eager timings rotate among input copies of >= 256 MB in all.
Writes benchmarks/results/kernels/decode_step.json (and .png when matplotlib imports).
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
import torch.nn.functional as F
from gsa_rag.kernels.bench import (
    bench_us,
    copy_bandwidth,
    environment,
    print_table,
    synthetic_layout,
    write_results,
)

from gsa_rag.config import GistConfig

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}
K = 1024
DEVICE = "cuda"  # a CPU smoke test of this script sets "cpu" (with TRITON_INTERPRET=1)


def dense_fn(q4, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    try:
        run()
        return run, "flash"
    except RuntimeError:  # no flash kernel for this case: let SDPA choose (GQA via repetition)
        kk, vv = k.repeat_interleave(q4.shape[1] // k.shape[1], 1), v.repeat_interleave(q4.shape[1] // k.shape[1], 1)
        return (lambda: F.scaled_dot_product_attention(q4, kk, vv, scale=scale)), "default"


def bench_case(shape: str, B: int, L: int, chunk: int, flex, dtype, copy_bw: float) -> dict:
    from gsa_rag.kernels.gist_select import DecodePlan, select_index_list
    from gsa_rag.kernels.sparse_decode import sparse_decode_ref, sparse_decode_triton

    Hq, Hkv, D = SHAPES[shape]
    G = Hq // Hkv
    config = GistConfig(chunk_size=chunk, sink=4, k_policy="adaptive", adaptive_ratio=8.0)
    layout = synthetic_layout(B, L, chunk, sink=4, tail=32, device=DEVICE)
    T = layout.seq_len
    C = int(layout.num_chunks[0])
    esize = torch.finfo(dtype).bits // 8
    kv_bytes = B * Hkv * T * D * esize * 2
    copies = max(1, min(8, math.ceil((256 << 20) / kv_bytes)))
    sets = []
    for _ in range(copies):
        q = torch.randn(B, Hq, D, device=DEVICE, dtype=dtype)
        k = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=dtype)
        v = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=dtype)
        sets.append((q, k, v))
    scale = 1.0 / math.sqrt(D)
    plan_us = bench_us(lambda: DecodePlan.build(layout, config, G), warmup_ms=5, rep_ms=30)
    plan = DecodePlan.build(layout, config, G)
    lists = [select_index_list(q, k, layout, plan, config, 1, True) for q, k, _ in sets]
    out = torch.empty(B, Hq, D, device=DEVICE, dtype=dtype)
    turn = [0]

    def rotating(body):
        def run():
            i = turn[0] = (turn[0] + 1) % copies
            return body(i)
        return run

    def step(i):
        q, k, v = sets[i]
        index, lengths = select_index_list(q, k, layout, plan, config, 1, True)
        return sparse_decode_triton(q, k, v, index, lengths, scale, out=out)

    def select(i):
        q, k, _ = sets[i]
        return select_index_list(q, k, layout, plan, config, 1, True)

    def attend(i):
        q, k, v = sets[i]
        index, lengths = lists[i]
        return sparse_decode_triton(q, k, v, index, lengths, scale, out=out)

    # correctness on this case's data before timing (fp64 reference on the same inputs)
    q, k, v = sets[0]
    index, lengths = lists[0]
    got = step(0).double()
    ref = sparse_decode_ref(q.double(), k.double(), v.double(), index, lengths, scale)
    err = float((got - ref).norm() / ref.norm())

    dense_runs = []
    for q, k, v in sets:
        fn, backend = dense_fn(q[:, :, None], k, v, scale)
        dense_runs.append(fn)
    row = {"shape": shape, "batch": B, "context": L, "T": T, "chunks": C, "dense_backend": backend, "rel_err": err}
    row["dense_us"] = bench_us(rotating(lambda i: dense_runs[i]()))
    row["dense_graph_us"] = bench_us(dense_runs[0], cuda_graph=True)
    if flex is not None:
        try:
            row["flex_us"] = bench_us(rotating(lambda i: flex(sets[i][0][:, :, None], sets[i][1], sets[i][2],
                                                          scale=scale, enable_gqa=True)))
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  flex failed: {type(e).__name__}: {str(e)[:160]}")
            row["flex_us"] = float("nan")
    row["gsa_us"] = bench_us(rotating(step))
    row["gsa_graph_us"] = bench_us(lambda: step(0), cuda_graph=True)
    row["select_us"] = bench_us(rotating(select))
    row["select_graph_us"] = bench_us(lambda: select(0), cuda_graph=True)
    row["attend_us"] = bench_us(rotating(attend))
    row["plan_us"] = plan_us

    listed = float(lists[0][1].float().sum())  # key rows over (batch, kv head)
    row["keys_per_head"] = listed / (B * Hkv)
    row["budget"] = row["keys_per_head"] / T
    attend_bytes = listed * (2 * D * esize + 4)
    gsa_bytes = B * Hkv * C * D * esize + B * Hq * C * 4 * 2 + attend_bytes
    row["dense_bytes"], row["gsa_bytes"] = kv_bytes, gsa_bytes
    row["ceiling"] = kv_bytes / gsa_bytes
    row["floor_us"] = gsa_bytes / copy_bw * 1e6
    row["dense_floor_us"] = kv_bytes / copy_bw * 1e6
    best = min(row["gsa_us"], row["gsa_graph_us"]) if not math.isnan(row["gsa_graph_us"]) else row["gsa_us"]
    dense = min(row["dense_us"], row["dense_graph_us"]) if not math.isnan(row["dense_graph_us"]) else row["dense_us"]
    row["x_dense"] = dense / best
    row["x_flex"] = row.get("flex_us", float("nan")) / best
    sel = row["select_graph_us"] if not math.isnan(row["select_graph_us"]) else row["select_us"]
    row["score_share"] = 100 * sel / best
    row["attend_tbps"] = attend_bytes / (row["attend_us"] * 1e-6) / 1e12
    row["step_tbps"] = gsa_bytes / (best * 1e-6) / 1e12
    row["dense_tbps"] = kv_bytes / (dense * 1e-6) / 1e12
    row["pct_floor"] = 100 * row["floor_us"] / best
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 30-second smoke run (4K and 32K, batch 1)")
    p.add_argument("--contexts", default="4,8,16,32,64,128", help="context lengths in K tokens")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes the most time)")
    p.add_argument("--out", default="benchmarks/results/kernels")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs CUDA")
    contexts = [int(x) * K for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    if args.quick:
        contexts, batches = [4 * K, 32 * K], [1]
    dtype = getattr(torch, args.dtype)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=True)  # one compile per head shape, not per length
    bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bw / 1e12:.2f} TB/s")
    rows = []
    for shape in args.shapes.split(","):
        for B in batches:
            for L in contexts:
                row = bench_case(shape, B, L, args.chunk, flex, dtype, bw)
                rows.append(row)
                print(f"{shape} B={B} L={L // K}K: dense {row['dense_us']:.1f} us, gsa {row['gsa_us']:.1f} us "
                      f"(graph {row['gsa_graph_us']:.1f}), x{row['x_dense']:.2f}, err {row['rel_err']:.1e}", flush=True)
                if row["rel_err"] > 1e-2:
                    print("  ERROR: sparse decode disagrees with its reference", flush=True)
    print()
    print_table(rows, [
        ("shape", "shape", "s"), ("batch", "B", "d"), ("context", "ctx", "d"), ("keys_per_head", "keys/head", ".0f"),
        ("dense_us", "dense", ".1f"), ("dense_graph_us", "dense(g)", ".1f"), ("flex_us", "flex", ".1f"),
        ("gsa_us", "gsa", ".1f"), ("gsa_graph_us", "gsa(g)", ".1f"), ("attend_us", "attend", ".1f"),
        ("x_dense", "x_dense", ".2f"), ("x_flex", "x_flex", ".2f"), ("ceiling", "ceiling", ".2f"),
        ("score_share", "score%", ".0f"), ("attend_tbps", "bw_att", ".2f"), ("step_tbps", "bw_step", ".2f"),
        ("dense_tbps", "bw_dense", ".2f"), ("floor_us", "floor", ".1f"), ("pct_floor", "%floor", ".0f"),
        ("plan_us", "plan", ".0f"),
    ])
    print("\nplan = once per decode step for all layers; bw in TB/s; copy bandwidth "
          f"{bw / 1e12:.2f} TB/s; x_dense = best dense / best gsa; ceiling = dense bytes / gsa bytes")

    def plot(plt, path):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for shape in {r["shape"] for r in rows}:
            for B in {r["batch"] for r in rows}:
                sel = [r for r in rows if r["shape"] == shape and r["batch"] == B]
                ctx = [r["context"] // K for r in sel]
                axes[0].plot(ctx, [r["x_dense"] for r in sel], marker="o", label=f"{shape} B={B}")
                axes[0].plot(ctx, [r["ceiling"] for r in sel], ls=":", color=axes[0].lines[-1].get_color())
                axes[1].plot(ctx, [r["gsa_graph_us"] for r in sel], marker="o", label=f"gsa {shape} B={B}")
                axes[1].plot(ctx, [r["dense_us"] for r in sel], ls="--", label=f"dense {shape} B={B}")
        axes[0].set(xscale="log", xlabel="context (K tokens)", ylabel="speedup over dense (dotted: byte ceiling)")
        axes[1].set(xscale="log", yscale="log", xlabel="context (K tokens)", ylabel="us per layer step")
        for a in axes:
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    path = write_results(args.out, "decode_step_quick" if args.quick else "decode_step",
                         {"env": environment(), "copy_bw": bw, "rows": rows}, plot)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
