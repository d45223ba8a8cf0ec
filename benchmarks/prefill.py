"""Prefill of one attention layer under the gist (forgetting) mask vs dense causal attention.

    python benchmarks/prefill.py            # 4K..32K, < 4 minutes on an H200
    python benchmarks/prefill.py --quick    # 30-second smoke run

Methods (bf16, Llama-3-8B shapes 32 q / 8 kv heads, d=128 by default, batch 1):
    causal     dense causal SDPA (flash backend), the bar to meet;
    flex       FlexAttention, BlockMask of the gist rule, keys in natural order;
    flex_perm  the same with the recall columns (sink, gists, links) moved to the front
               (gsa_rag.kernels.prefill), the K/V gather included; flex_perm_core without it;
    masked     SDPA with the dense bool mask (the engine's CPU/reference prefill), up to --masked-up-to.
The BlockMask (and the permutation) are built once per prefill and shared by every layer:
`mask_ms` reports that cost once. `density` = fraction of (q, kv) blocks FlexAttention computes.
Writes `--out`/`--name`.json (and .png when matplotlib imports); the default name holds every
setting (result_name), e.g. prefill_h32-8-128_c8_ctx4k+8k+16k+32k_masked16k, and an existing
file is never overwritten: the run is refused before it starts.
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
import time

import torch
import torch.nn.functional as F
from gsa_rag.kernels.bench import (
    bench_us,
    context_tag,
    environment,
    print_table,
    refuse_existing_results,
    synthetic_layout,
    write_results,
)

K = 1024


def bench_context(L: int, args, Hq: int, Hkv: int, D: int, dtype, scale: float) -> dict:
    from gsa_rag.kernels.prefill import (
        _flex,
        gist_prefill,
        gist_prefill_block_mask,
        gist_prefill_ref,
        recall_first_order,
    )
    from torch.nn.attention import SDPBackend, sdpa_kernel

    layout = synthetic_layout(1, L, args.chunk, sink=4, tail=32)
    T = layout.seq_len
    q = torch.randn(1, Hq, T, D, device="cuda", dtype=dtype)
    k = torch.randn(1, Hkv, T, D, device="cuda", dtype=dtype)
    v = torch.randn(1, Hkv, T, D, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    t = time.perf_counter()
    perm = recall_first_order(layout)
    bm_perm = gist_prefill_block_mask(layout, 1, perm)
    torch.cuda.synchronize()
    mask_ms = (time.perf_counter() - t) * 1e3
    bm = gist_prefill_block_mask(layout, 1, None)
    row = {"context": L, "T": T, "mask_ms": mask_ms,
           "density": 1 - bm.sparsity() / 100, "density_perm": 1 - bm_perm.sparsity() / 100}

    def causal():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    idx = perm[:, None, :, None].expand(1, Hkv, T, D)
    kp, vp = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
    flex = _flex()
    # correctness first: permuted == natural order (same rule, keys reordered), at every size
    a = gist_prefill(q, k, v, layout, 1, scale, permute=False, block_mask=bm).float()
    b = gist_prefill(q, k, v, layout, 1, scale, permute=True, block_mask=bm_perm, perm=perm).float()
    row["rel_err_perm"] = float((a - b).norm() / a.norm())
    if L <= 4 * K:  # and natural order == the dense-mask reference (T^2 mask: small sizes only)
        ref = gist_prefill_ref(q.float(), k.float(), v.float(), layout, 1, scale)
        row["rel_err_ref"] = float((a - ref).norm() / ref.norm())
    row["causal_ms"] = bench_us(causal) / 1e3
    row["flex_ms"] = bench_us(lambda: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True)) / 1e3
    row["flex_perm_core_ms"] = bench_us(lambda: flex(q, kp, vp, block_mask=bm_perm, scale=scale, enable_gqa=True)) / 1e3
    row["flex_perm_ms"] = bench_us(
        lambda: gist_prefill(q, k, v, layout, 1, scale, permute=True, block_mask=bm_perm, perm=perm)) / 1e3
    if L <= args.masked_up_to * K:
        try:
            from gsa_rag.masks import dense_gist_mask

            mask = dense_gist_mask(layout, 1)[:, None]
            kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
            row["masked_ms"] = bench_us(lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)) / 1e3
        except torch.OutOfMemoryError:
            row["masked_ms"] = float("nan")
    row["x_flex"] = row["flex_ms"] / row["causal_ms"]
    row["x_perm"] = row["flex_perm_ms"] / row["causal_ms"]
    print(f"L={L // K}K: causal {row['causal_ms']:.2f} ms, flex {row['flex_ms']:.2f}, flex_perm {row['flex_perm_ms']:.2f} "
          f"(density {row['density']:.2f} -> {row['density_perm']:.2f}), err {row['rel_err_perm']:.1e}", flush=True)
    return row


def result_name(heads: tuple[int, int, int], chunk: int, contexts: list[int], masked_up_to: int) -> str:
    """The default result name: every setting that changes the rows (bf16 is fixed), so two runs
    that differ in any of them never share a file (the name was "prefill" whatever the shapes)."""
    ctx = context_tag(contexts)
    return f"prefill_h{'-'.join(map(str, heads))}_c{chunk}_ctx{ctx}_masked{masked_up_to}k"



def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="30-second smoke run (4K and 8K)")
    p.add_argument("--contexts", default="4,8,16,32", help="K tokens")
    p.add_argument("--heads", default="32,8,128", help="Hq,Hkv,D")
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--masked-up-to", type=int, default=16, help="K tokens; the dense bool mask is T^2 bytes")
    p.add_argument("--out", default="benchmarks/results/kernels", help="folder of the result files")
    p.add_argument("--name", default=None, help="result file name without .json (default: result_name's, every setting)")
    args = p.parse_args(argv)
    Hq, Hkv, D = (int(x) for x in args.heads.split(","))
    contexts = [int(x) * K for x in args.contexts.split(",")]
    if args.quick:
        contexts = [4 * K, 8 * K]
    name = args.name or result_name((Hq, Hkv, D), args.chunk, contexts, args.masked_up_to)
    refuse_existing_results(p, args.out, name)  # before the measurements, not after them
    if not torch.cuda.is_available():
        sys.exit("benchmarks/prefill.py needs CUDA")

    dtype = torch.bfloat16
    scale = 1.0 / math.sqrt(D)
    rows = []
    for L in contexts:
        rows.append(bench_context(L, args, Hq, Hkv, D, dtype, scale))
    print()
    print_table(rows, [
        ("context", "ctx", "d"), ("causal_ms", "causal", ".2f"), ("flex_ms", "flex", ".2f"),
        ("flex_perm_core_ms", "perm_core", ".2f"), ("flex_perm_ms", "flex_perm", ".2f"), ("masked_ms", "masked", ".2f"),
        ("x_flex", "flex/causal", ".2f"), ("x_perm", "perm/causal", ".2f"), ("density", "dens", ".3f"),
        ("density_perm", "dens_perm", ".3f"), ("mask_ms", "mask_ms", ".0f"), ("rel_err_perm", "err", ".1e"),
    ])
    print("\ntimes in ms per layer; ratios < 1 mean the gist prefill is faster than dense causal; "
          "mask_ms (block mask + permutation) is paid once per prefill, not per layer")

    def plot(plt, path):
        fig, ax = plt.subplots(figsize=(6, 4))
        ctx = [r["context"] // K for r in rows]
        for key, label in (("causal_ms", "dense causal (flash)"), ("flex_ms", "gist flex"), ("flex_perm_ms", "gist flex, permuted")):
            ax.plot(ctx, [r[key] for r in rows], marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="context (K tokens)", ylabel="ms per layer")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    path = write_results(args.out, name,
                         {"env": environment(), "heads": [Hq, Hkv, D], "chunk": args.chunk, "rows": rows}, plot)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
