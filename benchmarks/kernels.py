"""Decode-step attention of one layer on the GPU: GSA (gist scoring + top-k + key list + sparse
split-K flash-decode) against dense SDPA (flash backend) and FlexAttention over the full KV.

    python benchmarks/kernels.py --no-flex  # 4K, 32K, 128K x both shapes x batch 1, 8: ~2-3 minutes
    python benchmarks/kernels.py --quick    # 30-second smoke run
    python benchmarks/kernels.py --no-flex --meta 4 --contexts 32,128 --name decode_step_hgsa32
                                            # H-GSA 32x (chunk 8, meta 4, top-4 per level)
    python benchmarks/kernels.py --no-flex --contexts 128 --batches 1 --ab gist_select.WINDOW_SELECT=True,False --rounds 2
                                            # a kernel switch's two settings, alternating, in one run
    python benchmarks/kernels.py --no-flex --contexts 128 --group-overlap 0.9
                                            # a GQA group's query heads alike: shorter lists (`fill`)

Shapes: Llama-3-8B (32 q / 8 kv heads, d=128) and SmolLM2-135M, the default model (9 q / 3 kv,
d=64); batch 1 and 8; context 4K..128K; chunk 8, adaptive k (about L/8 raw tokens per KV
head, the union of its query heads' picks); bf16. With `--meta` the layout is hierarchical
(H-GSA, `GistConfig.meta_chunks`; fixed top-k per level, `--top-k`) and the step selects coarse to
fine (kernels/hier_select.py): `scores` then times the top level's scoring alone (the part that
grows with the context), `topk` its top-k + union kernel, `expand` the rest of the selection (the
unfold kernels and the levels below), old_sel is left empty and `sel_u64` is the selection with the
unfold walk in 64-slot steps (before round 12); `scored` is the gist keys the step read per KV head
over all levels (the byte model counts those).

Byte floor: a step cannot beat the bytes it must read once. Dense: all K and V. GSA: the gist
keys, the listed K/V rows, the index list and the fp32 scores (written, then read by top-k).
floor_us = bytes / measured copy bandwidth (read + written), so `ceiling` = dense bytes / GSA
bytes is the best speedup over a dense step at the copy bandwidth.

Columns: dense/flex/gsa in us (medians of CUDA-event timings; `graph` columns replay CUDA graphs,
without launch gaps); `x_dense` = dense / gsa, each side's best of eager and graph replay;
`score%` = share of the step spent before the attention kernel (scores + top-k + list); `bw` =
achieved bandwidth of the sparse attention kernel on the bytes it touches, and of the whole step;
`%floor` = floor / gsa time.
Small sizes fit in the 60 MB L2: eager timings rotate among input copies of >= 256 MB in all.
Writes `--out`/`--name`.json (and .png when matplotlib imports); the default name holds every
setting (result_name), e.g. decode_step_llama3-8b+smollm2-135m_b1+8_ctx4k+32k+128k_c8_bf16_noflex,
and an existing file is never overwritten: the run is refused before it starts. The plot compares
like with like: GSA and dense both CUDA-graph replayed (eager both where a graph is missing).
"""

from __future__ import annotations

import os
import sys

# benchmarks/kernels.py shares its name with the `kernels` package that transformers imports:
# drop this folder from the import path so `import kernels` can never find a script here
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import contextlib
import dataclasses
import math
from unittest import mock

import torch
import torch.nn.functional as F
from gsa_rag.kernels.bench import (
    SHAPES,
    bench_us,
    context_tag,
    copy_bandwidth,
    decode_case,
    environment,
    host_us,
    input_copies,
    print_table,
    refuse_existing_results,
    write_results,
)

DTYPE_TAGS = {"bfloat16": "bf16", "float16": "fp16"}
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


def group_queries(B: int, Hq: int, Hkv: int, D: int, overlap: float, dtype) -> torch.Tensor:
    """Random decode queries [B, Hq, D] whose GQA groups' heads share `overlap` of a direction:
    overlap * shared + sqrt(1 - overlap^2) * own, each part standard normal, so every head stays
    standard normal and two heads of a group correlate by overlap^2 (0: independent, 1: equal)."""
    own = torch.randn(B, Hkv, Hq // Hkv, D, device=DEVICE, dtype=torch.float32)
    shared = torch.randn(B, Hkv, 1, D, device=DEVICE, dtype=torch.float32)
    return (overlap * shared + math.sqrt(1 - overlap ** 2) * own).reshape(B, Hq, D).to(dtype)


def _best(row: dict, name: str) -> float:
    """A side's best time: eager or graph replay (NaN where the graph could not be captured)."""
    graph = row[f"{name}_graph_us"]
    return row[f"{name}_us"] if math.isnan(graph) else min(row[f"{name}_us"], graph)


def bench_case(shape: str, B: int, L: int, chunk: int, flex, dtype, copy_bw: float,
               meta: tuple[int, ...] = (), top_k: int = 4, sweep: bool = False, score_dtype: str = "cache",
               group_overlap: float = 0.0) -> dict:
    from gsa_rag.kernels.gist_keys8 import quantize_gist_keys
    from gsa_rag.kernels.gist_select import (
        DecodePlan,
        _scores_launch,
        select_index_list,
        select_counters,
        select_index_list_triton,
        select_sizes_triton,
    )
    from gsa_rag.kernels.hier_select import (
        HierPlan,
        _union_flags,
        select_hier_index_list,
        select_hier_index_list_triton,
    )
    from gsa_rag.kernels.pdl import plain_launches
    from gsa_rag.kernels.sparse_decode import (
        default_block_n,
        default_split_len,
        sparse_decode_ref,
        sparse_decode_triton,
    )

    Hq, Hkv, D = SHAPES[shape]
    G = Hq // Hkv
    config, layout = decode_case(B, L, chunk, meta, top_k, score_dtype, device=DEVICE)
    T = layout.seq_len + 1  # one appended (generated) token: the query
    C = int(layout.num_chunks[0])
    esize = torch.finfo(dtype).bits // 8
    kv_bytes = B * Hkv * T * D * esize * 2
    copies = input_copies(kv_bytes)  # eager and graph timings alike rotate among them
    sets = []
    for _ in range(copies):
        q = group_queries(B, Hq, Hkv, D, group_overlap, dtype)
        k = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=dtype)
        v = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=dtype)
        sets.append((q, k, v))
    scale = 1.0 / math.sqrt(D)
    # plan: cold (whole sequence, once per generation) and per step (a layout grown by append
    # reuses the cached plan of its lineage; one appended token per step)
    layout = layout.append(torch.full((B, 1), 7, device=DEVICE))

    def build_plan(lay):
        return HierPlan.build(lay, config, G) if meta else DecodePlan.build(lay, config, G)

    def cold_plan():
        flat = DecodePlan.build_full(layout, config, G)
        return HierPlan._build(layout, config, G, flat) if meta else flat

    cold_us = host_us(cold_plan, reps=5, warmup=1)
    build_plan(layout)
    grown = [layout]

    def next_plan():
        grown[0] = grown[0].append(torch.full((B, 1), 7, device=DEVICE))
        return build_plan(grown[0])

    def fresh_lineage():  # append + plan per step, the lineage restarted every 200 steps
        if grown[0].seq_len - layout.seq_len >= 200:
            grown[0] = layout
        return next_plan()

    plan_us = host_us(fresh_lineage)  # with the append of the step's token, as in the engine
    append_us = host_us(lambda: layout.append(torch.full((B, 1), 7, device=DEVICE)))
    grown.clear()
    T = layout.seq_len
    plan = build_plan(layout)
    # score_dtype int8: each input set's int8 gist keys, made here as the engine makes them once per
    # layer and generation (gist_keys8.gist_keys_of_layer), so the timed step only reads them
    keys8 = {id(k): quantize_gist_keys(k, layout.gist_index, layout.gist_valid)
             for _, k, _ in sets} if score_dtype == "int8" else {}

    def select_list(q, k, scored=None):
        if meta:
            return select_hier_index_list(q, k, layout, plan, config, 1, scored=scored)
        if keys8:
            return select_index_list_triton(q, k, layout, plan, config, keys8=keys8[id(k)])
        return select_index_list(q, k, layout, plan, config, 1, True)

    lists = [select_list(q, k) for q, k, _ in sets]
    out = torch.empty(B, Hq, D, device=DEVICE, dtype=dtype)
    turn = [0]

    def rotating(body):
        def run():
            i = turn[0] = (turn[0] + 1) % copies
            return body(i)
        return run

    def graph_us(body):  # one graph replays the body on every input set: us per set
        return bench_us(lambda: [body(i) for i in range(copies)], cuda_graph=True) / copies

    def step(i):
        q, k, v = sets[i]
        index, lengths = select_list(q, k)
        return sparse_decode_triton(q, k, v, index, lengths, scale, out=out)

    def select(i):
        q, k, _ = sets[i]
        return select_list(q, k)

    def scores(i):  # H-GSA: the top level's scores (the part that grows with the context)
        q, k, _ = sets[i]
        if meta:
            return _scores_launch(q, k, plan.unit_index[-1], plan.num_units[-1])
        return _scores_launch(q, k, layout.gist_index, layout.num_chunks, keys8=keys8.get(id(k)))

    counters = select_counters(B, Hq, DEVICE)

    def scores_topk(i):  # scores + the select kernel (threshold top-k, union, sizes, block sums)
        q, k, _ = sets[i]
        if meta:  # H-GSA: the top level's scores and union flags
            top = layout.levels - 1
            scores = _scores_launch(q, k, plan.unit_index[top], plan.num_units[top], counters=counters)
            return _union_flags(scores, plan, counters, Hkv, config, D, top)
        return select_sizes_triton(q, k, layout, plan, keys8=keys8.get(id(k)))

    def select_torch_topk(i):  # the previous path: scores, torch.topk, mark, cumsum, expand
        q, k, _ = sets[i]
        return select_index_list_triton(q, k, layout, plan, config, fused_topk=False, keys8=keys8.get(id(k)))

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
    backend = "?"
    for q, k, v in sets:
        fn, backend = dense_fn(q[:, :, None], k, v, scale)
        dense_runs.append(fn)
    block_n = default_block_n(D)
    split_len = default_split_len(plan.capacity, B * Hkv, block_n, torch.device(DEVICE))
    splits = -(-plan.capacity // split_len)
    row = {"shape": shape, "batch": B, "context": L, "T": T, "chunks": C, "dense_backend": backend, "rel_err": err,
           "score_dtype": score_dtype, "group_overlap": group_overlap,
           "meta": list(meta), "top_k": top_k if meta else None,
           "copies": copies, "capacity": plan.capacity, "split_len": split_len, "programs": B * Hkv * splits}
    row["dense_us"] = bench_us(rotating(lambda i: dense_runs[i]()))
    row["dense_graph_us"] = graph_us(lambda i: dense_runs[i]())
    if flex is not None:
        try:
            row["flex_us"] = bench_us(rotating(lambda i: flex(sets[i][0][:, :, None], sets[i][1], sets[i][2],
                                                          scale=scale, enable_gqa=True)))
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  flex failed: {type(e).__name__}: {str(e)[:160]}")
            row["flex_us"] = float("nan")
    row["gsa_us"] = bench_us(rotating(step))
    row["gsa_graph_us"] = graph_us(step)
    with plain_launches():  # the same step without programmatic dependent launch
        row["gsa_plain_graph_us"] = graph_us(step)
    row["select_graph_us"] = graph_us(select)
    row["scores_graph_us"] = graph_us(scores)
    nan = float("nan")  # the single-level breakdown has no H-GSA counterpart
    row["scores_topk_graph_us"] = graph_us(scores_topk)
    row["attend_us"] = bench_us(rotating(attend))
    row["attend_graph_us"] = graph_us(attend)
    if sweep:  # the attention kernel over other split lengths and key blocks: {"splits x block_n": us}
        row["attend_sweep"] = {}
        for bn in (32, 64, 128):
            for s in sorted({max(1, splits // 2), splits, 2 * splits, 4 * splits}):
                def attend_with(i, s=s, bn=bn):
                    q, k, v = sets[i]
                    return sparse_decode_triton(q, k, v, *lists[i], scale, num_splits=s, out=out, block_n=bn)
                row["attend_sweep"][f"{s}x{bn}"] = graph_us(attend_with)
        best = min(row["attend_sweep"], key=row["attend_sweep"].get)
        print(f"  attend sweep (splits x block_n: us): default {splits}x{block_n} {row['attend_graph_us']:.1f}; "
              + ", ".join(f"{k} {v:.1f}" for k, v in row["attend_sweep"].items()) + f"; best {best}", flush=True)
    row["select_torch_topk_graph_us"] = nan if meta else graph_us(select_torch_topk)

    def select_unfold64(i):  # H-GSA: the unfold walk in the 64-slot steps it took before round 12
        q, k, _ = sets[i]
        return select_hier_index_list_triton(q, k, layout, plan, config, block=64)

    row["select_unfold64_graph_us"] = graph_us(select_unfold64) if meta else nan
    row["topk_graph_us"] = row["scores_topk_graph_us"] - row["scores_graph_us"]  # select kernel
    row["expand_graph_us"] = row["select_graph_us"] - row["scores_topk_graph_us"]  # expansion
    row["plan_us"] = plan_us
    row["plan_cold_us"] = cold_us
    row["append_us"] = append_us
    if meta:
        row["fused_topk_same_lengths"] = True
        scored = torch.zeros(B * Hkv, dtype=torch.int32, device=DEVICE)
        select_list(sets[0][0], sets[0][1], scored)
        row["keys_scored"] = float(scored.float().mean())  # gist keys per (batch, KV head), all levels
        C = row["keys_scored"]  # the byte model below: the gist keys actually read
    else:
        fused_list = lists[0]
        q0, k0 = sets[0][0], sets[0][1]
        old_list = select_index_list_triton(q0, k0, layout, plan, config, fused_topk=False, keys8=keys8.get(id(k0)))
        row["fused_topk_same_lengths"] = bool(torch.equal(fused_list[1], old_list[1]))
        row["keys_scored"] = C
        if keys8:  # what the int8 copy changes on these (random normal) keys
            cache_config = dataclasses.replace(config, score_dtype="cache")
            row["int8_list_overlap"] = list_overlap(fused_list, select_index_list(q0, k0, layout, plan, cache_config, 1, True), T)

    listed = float(lists[0][1].float().sum())  # key rows over (batch, kv head)
    row["keys_per_head"] = listed / (B * Hkv)
    row["fill"] = row["keys_per_head"] / plan.capacity  # of the list width the attention is sized for
    row["budget"] = row["keys_per_head"] / T
    attend_bytes = listed * (2 * D * esize + 4)
    if keys8:  # the int8 copy (contiguous: no gist columns read) and its fp32 channel scales
        scores_bytes = B * Hkv * C * D + B * Hkv * D * 4 + B * Hq * C * 4
    else:
        scores_bytes = B * Hkv * C * D * esize + B * Hq * C * 4 + B * C * 8
    topk_bytes = B * Hq * C * 4
    topk_bytes += B * Hq * C + B * Hkv * C * 4  # int8 picks; sizes written (block sums: C / 64 more)
    expand_bytes = listed * 4 * 2 + B * Hkv * C * 4 * 2
    gsa_bytes = scores_bytes + topk_bytes + expand_bytes + attend_bytes
    row.update(dense_bytes=kv_bytes, gsa_bytes=gsa_bytes, attend_bytes=attend_bytes, scores_bytes=scores_bytes)
    row["ceiling"] = kv_bytes / gsa_bytes
    row["floor_us"] = gsa_bytes / copy_bw * 1e6
    row["dense_floor_us"] = kv_bytes / copy_bw * 1e6
    for name, nbytes in (("attend", attend_bytes), ("scores", scores_bytes), ("topk", topk_bytes),
                         ("expand", expand_bytes), ("dense", kv_bytes)):
        t = row[f"{name}_graph_us"]
        row[f"{name}_floor_us"] = nbytes / copy_bw * 1e6
        row[f"{name}_pct_floor"] = 100 * row[f"{name}_floor_us"] / t if t and t > 0 else float("nan")
        row[f"{name}_tbps"] = nbytes / (t * 1e-6) / 1e12 if t and t > 0 else float("nan")
    best = _best(row, "gsa")
    row["x_dense"] = _best(row, "dense") / best
    row["x_flex"] = row.get("flex_us", float("nan")) / best
    sel = row["select_graph_us"] if not math.isnan(row["select_graph_us"]) else float("nan")
    row["score_share"] = 100 * sel / best
    row["step_tbps"] = gsa_bytes / (best * 1e-6) / 1e12
    row["pct_floor"] = 100 * row["floor_us"] / best
    sets.clear(), lists.clear(), dense_runs.clear()  # free the inputs before the next case
    return row


def list_overlap(lists, reference, seq_len: int) -> float:
    """The share of `reference`'s listed keys that `lists` lists too, over every (batch, KV head):
    two (int32 [B, H, CAP], int32 [B, H]) key lists of one step."""
    def as_mask(index, lengths):
        live = torch.arange(index.shape[-1], device=index.device) < lengths[..., None]
        mask = torch.zeros(*index.shape[:2], seq_len + 1, dtype=torch.bool, device=index.device)
        return mask.scatter_(2, torch.where(live, index.long(), seq_len), True)[..., :seq_len]

    got, want = as_mask(*lists), as_mask(*reference)
    return int((got & want).sum()) / int(want.sum())


COLUMNS = [
    ("ab", "ab", "s"), ("shape", "shape", "s"), ("batch", "B", "d"), ("context", "ctx", "d"),
    ("keys_per_head", "keys/head", ".0f"), ("fill", "fill", ".2f"),
    ("keys_scored", "scored", ".0f"),
    ("programs", "progs", "d"), ("dense_us", "dense", ".1f"), ("dense_graph_us", "dense(g)", ".1f"),
    ("flex_us", "flex", ".1f"), ("gsa_us", "gsa", ".1f"), ("gsa_graph_us", "gsa(g)", ".1f"),
    ("gsa_plain_graph_us", "plain(g)", ".1f"),
    ("x_dense", "x_dense", ".2f"), ("ceiling", "ceiling", ".2f"), ("pct_floor", "%floor", ".0f"),
    ("score_share", "score%", ".0f"),
    ("scores_graph_us", "scores(g)", ".1f"), ("scores_pct_floor", "%fl", ".0f"),
    ("topk_graph_us", "topk(g)", ".1f"), ("expand_graph_us", "expand(g)", ".1f"),
    ("attend_graph_us", "attend(g)", ".1f"), ("attend_floor_us", "att_floor", ".1f"),
    ("attend_pct_floor", "%fl", ".0f"), ("attend_tbps", "att_TB/s", ".2f"),
    ("dense_tbps", "dense_TB/s", ".2f"), ("select_torch_topk_graph_us", "old_sel(g)", ".1f"),
    ("select_graph_us", "select(g)", ".1f"), ("select_unfold64_graph_us", "sel_u64(g)", ".1f"),
    ("plan_us", "append+plan", ".0f"), ("plan_cold_us", "plan_cold", ".0f"), ("append_us", "append", ".0f"),
    ("rel_err", "err", ".1e"), ("int8_list_overlap", "int8_overlap", ".4f"),
]



def result_name(shapes: list[str], batches: list[int], contexts: list[int], chunk: int, dtype: str, flex: bool,
                meta: list[int], top_k: int, sweep: bool, score_dtype: str = "cache", group_overlap: float = 0.0,
                ab: str | None = None) -> str:
    """The default result name: every setting that changes the rows, so two runs that differ in
    any of them never share a file (it was "decode_step" whatever the settings)."""
    parts = ["decode_step", "+".join(sorted(set(shapes))), "b" + "+".join(map(str, sorted(set(batches)))),
             "ctx" + context_tag(contexts), f"c{chunk}", DTYPE_TAGS[dtype]]
    if not flex:
        parts.append("noflex")
    if meta:  # top-k is fixed per level only under H-GSA (single level: adaptive k)
        parts += ["meta" + "+".join(map(str, meta)), f"top{top_k}"]
    if sweep:
        parts.append("sweep")
    if score_dtype != "cache":
        parts.append("scores-" + score_dtype)
    if group_overlap:
        parts.append(f"overlap{group_overlap:g}")
    if ab:
        parts.append("ab-" + ab.split("=")[0])
    return "_".join(parts)



def plot_series(rows: list[dict]) -> list[dict]:
    """One series per (shape, batch), contexts ascending: GSA and dense times in the same timing
    mode, graph replay where every row has both graph times, else eager (a series mixing the two
    set a replayed GSA step against an eager dense one), and dense / GSA in that mode."""
    def finite(x) -> bool:
        return x is not None and not math.isnan(x)

    series = []
    for shape, B in sorted({(r["shape"], r["batch"]) for r in rows}):
        sel = sorted((r for r in rows if r["shape"] == shape and r["batch"] == B), key=lambda r: r["context"])
        graph = all(finite(r["gsa_graph_us"]) and finite(r["dense_graph_us"]) for r in sel)
        suffix = "_graph_us" if graph else "_us"
        gsa = [r["gsa" + suffix] for r in sel]
        dense = [r["dense" + suffix] for r in sel]
        series.append({"label": f"{shape} B={B} ({'graph' if graph else 'eager'})",
                       "context_k": [r["context"] / K for r in sel], "gsa_us": gsa, "dense_us": dense,
                       "speedup": [d / g for d, g in zip(dense, gsa)], "ceiling": [r["ceiling"] for r in sel]})
    return series


def draw(plt, path, rows: list[dict]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in plot_series(rows):
        ctx = s["context_k"]
        axes[0].plot(ctx, s["speedup"], marker="o", label=s["label"])
        axes[0].plot(ctx, s["ceiling"], ls=":", color=axes[0].lines[-1].get_color())
        axes[1].plot(ctx, s["gsa_us"], marker="o", label=f"gsa {s['label']}")
        axes[1].plot(ctx, s["dense_us"], ls="--", color=axes[1].lines[-1].get_color(), label=f"dense {s['label']}")
    axes[0].set(xscale="log", xlabel="context (K tokens)",
                ylabel="dense / gsa time, same timing mode (dotted: byte ceiling)")
    axes[1].set(xscale="log", yscale="log", xlabel="context (K tokens)",
                ylabel="us per layer step (legend: graph replay or eager, both sides)")
    for a in axes:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ab_variants(spec: str) -> list[tuple]:
    """`module.ATTR=V1,V2` -> one (module, attribute, value, label) per value: a switch of a
    gsa_rag.kernels module (an attribute it reads at each launch) and Python literals."""
    import ast
    import importlib

    target, _, values = spec.partition("=")
    module_name, _, attr = target.rpartition(".")
    if not (module_name and attr and values):
        raise ValueError(f"--ab {spec!r}: expected MODULE.ATTR=V1,V2, e.g. gist_select.WINDOW_SELECT=True,False")
    module = importlib.import_module(f"gsa_rag.kernels.{module_name}")
    if not hasattr(module, attr):
        raise ValueError(f"--ab: gsa_rag.kernels.{module_name} has no attribute {attr}")
    try:
        parsed = [ast.literal_eval(v) for v in values.split(",")]
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"--ab {spec!r}: values must be Python literals ({e})") from None
    return [(module, attr, v, f"{target}={v!r}") for v in parsed]


def ab_setting(variant):
    """Sets one `ab_variants` entry's attribute for the block (nothing for None), then restores it."""
    return contextlib.nullcontext() if variant is None else mock.patch.object(*variant[:3])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 30-second smoke run (4K and 32K, batch 1)")
    p.add_argument("--contexts", nargs="+", default=["4,32,128"],
                   help="context lengths: tokens (>= 1024, e.g. 131072 32768) or K tokens (4,32,128)")
    p.add_argument("--batches", nargs="+", default=["1,8"])
    p.add_argument("--shapes", nargs="+", default=[",".join(SHAPES)], help=f"of {', '.join(SHAPES)}")
    p.add_argument("--name", default=None, help="result file name without .json (default: result_name's, every setting)")
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes the most time)")
    p.add_argument("--meta", type=int, nargs="*", default=[],
                   help="H-GSA: gists per meta-gist per level above the chunks (4: 32x at chunk 8)")
    p.add_argument("--top-k", type=int, default=4, help="H-GSA: units each query head picks per level")
    p.add_argument("--attend-sweep", action="store_true",
                   help="also time the attention kernel at 1/2..4x the default splits and key blocks of 32..128")
    p.add_argument("--score-dtype", default="cache", choices=["cache", "int8"],
                   help="GistConfig.score_dtype: int8 scores an int8 copy of the gist keys (single level only); "
                        "int8_overlap is then the share of the cache-scored list's keys that its list keeps")
    p.add_argument("--group-overlap", type=float, default=0.0,
                   help="0..1: each GQA group's query heads share this much of their direction (1: one query), "
                        "so their picks overlap and the lists fill less of their width (column `fill`)")
    p.add_argument("--ab", default=None, metavar="MODULE.ATTR=V1,V2",
                   help="a gsa_rag.kernels module switch and Python values to alternate, every case once per value "
                        "per round (column `ab`), e.g. gist_select.WINDOW_SELECT=True,False")
    p.add_argument("--rounds", type=int, default=1, help="with --ab: how many times each case runs every value")
    p.add_argument("--out", default="benchmarks/results/kernels", help="folder of the result files")
    args = p.parse_args(argv)
    if not 0.0 <= args.group_overlap <= 1.0:
        p.error("--group-overlap is a share: 0..1")
    try:
        variants = ab_variants(args.ab) if args.ab else [None]
    except ValueError as e:
        p.error(str(e))
    if args.meta and args.score_dtype != "cache":
        p.error("--score-dtype int8 is single-level only (GistConfig refuses it with meta_chunks)")

    def items(values):
        return [x for v in values for x in v.split(",") if x]

    contexts = [int(x) if int(x) >= K else int(x) * K for x in items(args.contexts)]
    batches = [int(x) for x in items(args.batches)]
    shapes = items(args.shapes)
    unknown = [x for x in shapes if x not in SHAPES]
    if unknown:
        sys.exit(f"unknown shapes {unknown}: choose from {list(SHAPES)}")
    if args.quick:
        contexts, batches = [4 * K, 32 * K], [1]
    name = args.name or result_name(shapes, batches, contexts, args.chunk, args.dtype, not args.no_flex,
                                    args.meta, args.top_k, args.attend_sweep, args.score_dtype, args.group_overlap, args.ab)
    refuse_existing_results(p, args.out, name)  # before the measurements, not after them
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs CUDA")
    dtype = getattr(torch, args.dtype)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=True)  # one compile per head shape, not per length
    bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bw / 1e12:.2f} TB/s", flush=True)
    payload = {"env": environment(), "copy_bw": bw, "rows": [], "failed": []}
    rows = payload["rows"]
    # longest contexts first: the targets are at 128K, and a cut-short run keeps them
    cases = [(L, shape, B, variant) for L in sorted(contexts, reverse=True) for shape in shapes for B in batches
             for _ in range(args.rounds if args.ab else 1) for variant in variants]
    for L, shape, B, variant in cases:
        tag = f"{variant[-1]} " if variant else ""  # the --ab setting a row's lines name
        try:
            with ab_setting(variant):
                row = bench_case(shape, B, L, args.chunk, flex, dtype, bw, tuple(args.meta), args.top_k,
                                 args.attend_sweep, args.score_dtype, args.group_overlap)
            if variant:
                row["ab"] = variant[-1]
        except Exception as e:  # noqa: BLE001 - one failing shape must not lose the table
            msg = f"{tag}{shape} B={B} L={L // K}K: {type(e).__name__}: {str(e)[:300]}"
            print("  FAILED " + msg, flush=True)
            payload["failed"].append(msg)
            torch.cuda.empty_cache()
            continue
        finally:
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"{tag}{shape} B={B} L={L // K}K: dense {row['dense_graph_us']:.1f} us (graph), gsa {row['gsa_graph_us']:.1f} "
              f"(graph; scores {row['scores_graph_us']:.1f}, topk {row['topk_graph_us']:.1f}, "
              f"expand {row['expand_graph_us']:.1f}, attend {row['attend_graph_us']:.1f} = "
              f"{row['attend_pct_floor']:.0f}% of its floor; plain launches {row['gsa_plain_graph_us']:.1f}), "
              f"x{row['x_dense']:.2f}, err {row['rel_err']:.1e}; "
              f"old select (torch.topk) {row['select_torch_topk_graph_us']:.1f} vs {row['select_graph_us']:.1f}; "
              f"H-GSA select with 64-slot unfold steps {row['select_unfold64_graph_us']:.1f}; "
              f"append+plan {row['plan_us']:.0f} us/step (cold plan {row['plan_cold_us']:.0f}; append alone {row['append_us']:.0f})",
              flush=True)
        if not row["fused_topk_same_lengths"]:
            print("  ERROR: fused top-k and torch.topk lists differ in length", flush=True)
        if row["rel_err"] > 1e-2:
            print("  ERROR: sparse decode disagrees with its reference", flush=True)
        write_results(args.out, name, payload)  # incremental: a killed run keeps its rows
    rows.sort(key=lambda r: (r["shape"], r["batch"], r["context"], r.get("ab", "")))
    print()
    print_table(rows, COLUMNS)
    print("\nappend+plan = per decode step for all layers, host wall time (layout.append + cached DecodePlan.build); "
          "plan_cold = the whole-sequence plan (once per generation); (g) = CUDA-graph replay "
          "rotating over input sets; plain = the step launched without programmatic dependent launch "
          "(gsa_rag.kernels.pdl); topk = scores+topk - scores; expand = select - scores+topk (mark, cumsum, "
          f"expansion); %fl = byte floor / time; copy bandwidth {bw / 1e12:.2f} TB/s; x_dense = best dense / best gsa; "
          "ceiling = dense bytes / gsa bytes")

    try:
        path = write_results(args.out, name, payload, lambda plt, path: draw(plt, path, rows))
    except Exception as e:  # noqa: BLE001 - the JSON is written already
        print(f"plot failed: {type(e).__name__}: {e}")
        path = write_results(args.out, name, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
