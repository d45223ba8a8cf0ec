"""Time to first token over passages already in gist memory vs full-attention prefill of the
same passages, side by side in one run, with the KV bytes each keeps on the device.

    python benchmarks/memory_ttft.py                       # CUDA if there, else CPU
    python benchmarks/memory_ttft.py --device cpu --passages 10 20 --repeats 3
    python benchmarks/memory_ttft.py --data nq --out results.json
    python benchmarks/memory_ttft.py --arch llama3-8b --tokenizer DIR --no-offload --graph --profile
                      # Llama-3-8B shapes, random weights, a saved tokenizer (no model weights needed);
                      # --profile prints where one question's time goes (prepare's host functions,
                      # the eager question's kernels, the replayed question's kernels)

Columns (median over --repeats timed runs after one warm-up, one question at a time; the three
are interleaved within every repeat, so a busy machine slows them alike):
  full (HF)   the unmodified model (sdpa) prefilling the whole prompt, the passages included
  GSA prefill GSA at --chunk-size without memory: the prompt with gists, prefilled
  GSA memory  GistMemory: passages encoded once beforehand (not timed here; see "encode once");
              the question pays assembling the cached KV, running link tokens + question, and
              the first token
Bytes: "full KV" is the KV cache of the full prompt; "memory device"/"memory host" is what the
memory keeps between questions (with --offload, raw KV on the host and only gist KV, plus the
prompt prefix's sink, on the device); "question buffer" is the per-question device buffer
(full length, zeros where raw KV was not fetched); "fetched" the raw KV copied to the device for
the question's first token. "aten ops" counts the torch ops one question dispatches (memory path,
and the full prefill): on a GPU each is a kernel launch or a host step, so this count tracks the
host overhead that dominates there (issue #3) even where the CPU wall clock hides it.

`--graph` (CUDA only) measures what replaying the forwards as CUDA graphs would give, the host's
launches gone: the full prefill, and the memory question's forward over a prepared cache, each
captured once and replayed (the same inputs every time, so this is a bound for a graph-captured
engine, not a path the engine has); the memory column then adds the eager `prepare` (assembling
the cached KV), timed apart. It also replays the unmodified model running the question's rows
(its link and question tokens) with no context at all, `rows_alone_graph_ms`: the floor under the
question's forward that no attention, selection or cache work can lower, so the question's time
above it is what reading the memory costs. A capture that fails is reported with its error.

Passages: --data names a canonical JSONL set (nq, hotpotqa, ... under $GSA_RAG_DATA, or a path);
the first examples' passages are pooled. Without data, seeded synthetic passages of about the
same length stand in (the timing does not depend on the words).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from gsa_rag import attention as gsa_attention
from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.generation import SamplingParams, forward, generate_tokens
from gsa_rag.kernels import kv_place
from gsa_rag.memory import GistMemory
from gsa_rag.models import attention_heads, load_model

WORDS = (
    "the of and in to a was is for on as by with he that at from his it an were are which this also be has or "
    "had first one their its new after who they two her she been other when there all during into school time "
    "may years more most only over city some world would where later up such used many can state about national "
    "out known university united then made however team film between both under well series north south year"
).split()


def synthetic_passages(n: int, seed: int = 0, words: int = 100) -> list[dict]:
    rng = random.Random(seed)
    return [{"title": f"Topic {i}", "text": " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."} for i in range(n)]


def load_passages(data: str | None, n: int) -> tuple[list[dict], str, str]:
    """(passages, question, source)."""
    if data:
        from gsa_rag.eval.data import load_examples

        examples = load_examples(data, limit=max(1, n))
        pool, seen = [], set()
        for ex in examples:
            for p in ex.passages:
                if p.text not in seen:
                    seen.add(p.text)
                    pool.append({"title": p.title, "text": p.text})
            if len(pool) >= n:
                break
        if len(pool) >= n:
            return pool[:n], examples[0].question, f"{data} ({len(pool[:n])} passages pooled from its first examples)"
        print(f"# {data}: only {len(pool)} passages; using synthetic passages")
    return synthetic_passages(n), "Which topic is described first?", "synthetic (seeded, 100 words each)"


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_token(engine, layout, cache) -> int:
    tokens = generate_tokens(engine.model, layout, engine.config, SamplingParams(1), set(), engine._banned, cache=cache)
    return int(next(iter(tokens))[0])


def timed(fns: dict, device, repeats: int) -> tuple[dict, dict]:
    """Median milliseconds of each fn, the fns interleaved within every repeat (so a busy
    machine slows them alike), after one warm-up each; and each fn's last result."""
    results = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            results[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}, results


def capture(fn) -> tuple[torch.cuda.CUDAGraph, object]:
    """`fn` captured as one CUDA graph, and the captured output (fn must run the same device work
    each call and never read the device on the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, cuBLAS workspaces)
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_replay_ms(fn, repeats: int) -> tuple[float, object]:
    """Median milliseconds of replaying `fn` captured as one CUDA graph (see `capture`), and the
    captured output."""
    graph, out = capture(fn)
    times = []
    for _ in range(repeats + 1):  # the first replay is not timed
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3, out


def rerunnable_question(gsa, layout, cache):
    """The memory question's forward over a prepared GistCache as a function that does the same
    device work on every call (it re-opens the cache's open columns, which the forward then fills
    again with the same KV): what a CUDA graph of it replays. Returns the last row's logits."""
    num_open = len(cache.pending_host)

    def question_forward():
        cache.reopen()
        out, _ = forward(gsa.model, layout, num_open, cache, gsa.config, logits_to_keep=1)
        return out.logits

    return question_forward


def profile_question(gsa, memory, question, ids, top: int = 35) -> None:
    """--profile: where one question's time goes. Prints the host functions of `prepare` (cProfile,
    by own time) and, on CUDA, the device kernels of one eager question and of five replays of
    its forward captured as a CUDA graph (torch.profiler, by device time)."""
    import cProfile
    import pstats

    device = gsa.device
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        memory.prepare(question, ids)
    sync(device)
    profiler.disable()
    print(f"\n# prepare, 5 calls, host functions by own time (top {top})")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
    if device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        layout, cache = memory.prepare(question, ids)
        first_token(gsa, layout, cache)
        sync(device)
    print(f"# one question (prepare + first token), by device time (top {top})")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top))
    with torch.inference_mode():
        graph, _ = capture(rerunnable_question(gsa, layout, cache))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            sync(device)
    print(f"# the question's forward replayed as a CUDA graph, 5 replays, by device time (top {top})")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=90))


def graph_columns(gsa, ref_model, prompt, memory, question, ids, repeats: int) -> dict:
    """--graph: the full prefill and the memory question's forward replayed as CUDA graphs."""
    row = {}
    try:
        with torch.inference_mode():
            row["ttft_full_graph_ms"], logits = graph_replay_ms(lambda: ref_model(prompt, logits_to_keep=1).logits, repeats)
        row["full_graph_token"] = int(logits[0, -1].argmax())
    except Exception as error:  # report it; the row keeps the eager columns
        row["full_graph_error"] = f"{type(error).__name__}: {error}"[:300]
    prepare, host = [], []
    for _ in range(repeats):
        sync(gsa.device)
        start = time.perf_counter()
        layout, cache = memory.prepare(question, ids)
        host.append(time.perf_counter() - start)
        sync(gsa.device)
        prepare.append(time.perf_counter() - start)
    row["prepare_ms"] = statistics.median(prepare) * 1e3
    row["prepare_host_ms"] = statistics.median(host) * 1e3  # until prepare returns, its device work maybe still queued
    try:
        with torch.inference_mode():
            row["question_graph_ms"], logits = graph_replay_ms(rerunnable_question(gsa, layout, cache), repeats)
        row["memory_graph_token"] = int(logits[0, -1].argmax())
        row["ttft_gsa_memory_graph_ms"] = row["prepare_ms"] + row["question_graph_ms"]
    except Exception as error:
        row["memory_graph_error"] = f"{type(error).__name__}: {error}"[:300]
    # the floor under the question's forward that no attention or cache work can lower: the
    # unmodified model running the same rows (the link and question tokens) with no context at all
    rows = layout.input_ids[:, cache.pending_host]
    row["question_rows"] = int(rows.shape[1])
    try:
        with torch.inference_mode():
            row["rows_alone_graph_ms"], _ = graph_replay_ms(lambda: ref_model(rows, logits_to_keep=1).logits, repeats)
    except Exception as error:
        row["rows_alone_graph_error"] = f"{type(error).__name__}: {error}"[:300]
    return row


def aten_ops(fn) -> int:
    """How many aten ops one call of `fn` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.ops


def kv_bytes_per_token(model) -> int:
    _, kv_heads, head_dim = attention_heads(model.config)
    return model.config.num_hidden_layers * 2 * kv_heads * head_dim * next(model.parameters()).element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model id/path/.gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default="default", help="gist adapter dir; 'default': the bundled one for the "
                        "default model (if any); 'none': the base model (timing does not depend on it)")
    parser.add_argument("--arch", default=None, help="instead of --model: a random-weight model of these shapes "
                        "(gsa_rag.kernels.bench.ARCHS, e.g. llama3-8b) with the tokenizer of --model (its weights are "
                        "loaded on the CPU and dropped); no adapter; the full prefill then runs the same weights without "
                        "gists (plain causal SDPA)")
    parser.add_argument("--layers", type=int, default=None, help="with --arch: override its layer count")
    parser.add_argument("--links", type=int, default=None, help="link tokens per passage (default: all reserved)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--passages", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the memory's raw KV in host memory (default) or on the device")
    parser.add_argument("--data", default=None, help="canonical JSONL set (nq, hotpotqa, ... or a path); default synthetic")
    parser.add_argument("--gsa-prefill-up-to", type=int, default=None,
                        help="time the GSA-prefill column only up to this many passages (it is the slow dense-mask "
                        "reference path on the CPU); default: always")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (on a shared, busy CPU use 1: spinning OpenMP threads that wait "
                        "for a descheduled peer make the many small ops of the memory path 30x slower)")
    parser.add_argument("--graph", action="store_true",
                        help="CUDA: also replay the full prefill and the memory question's forward as CUDA graphs")
    parser.add_argument("--tokenizer", default=None, help="with --arch: a tokenizer directory (save_pretrained of a "
                        "gsa-rag tokenizer) instead of loading --model for its tokenizer")
    parser.add_argument("--profile", action="store_true",
                        help="also print where one question's time goes at the largest --passages (prepare's host "
                        "functions; on CUDA the device kernels)")
    parser.add_argument("--rows-kernel", action=argparse.BooleanOptionalAction, default=True,
                        help="CUDA: the question's rows through the split-K kernel (gsa_rag.attention.ROWS_KERNEL, "
                        "the default) or, with --no-rows-kernel, the folded SDPA")
    parser.add_argument("--select-kernel", action=argparse.BooleanOptionalAction, default=True,
                        help="CUDA: the question rows' chunk selection through the select kernels "
                        "(gsa_rag.attention.SELECT_KERNEL, the default) or, with --no-select-kernel, the torch reference")
    parser.add_argument("--place-kernel", action=argparse.BooleanOptionalAction, default=True,
                        help="CUDA: `prepare` places and re-rotates the cached KV through one kernel "
                        "(gsa_rag.kernels.kv_place.KERNEL, the default) or, with --no-place-kernel, the torch reference")
    parser.add_argument("--fuse", action="store_true",
                        help="CUDA: the model's norms, rotary and SiLU gates through Liger's fused kernels "
                        "(gsa_rag.fused), in the gist model and in the full-prefill model alike")
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    args = parser.parse_args()
    if args.out and Path(args.out).exists():  # before the measurements, not after them
        parser.error(f"--out {args.out} exists: results are never overwritten; name another file")
    gsa_attention.ROWS_KERNEL = args.rows_kernel
    gsa_attention.SELECT_KERNEL = args.select_kernel
    kv_place.KERNEL = args.place_kernel
    if args.tokenizer and not args.arch:
        parser.error("--tokenizer goes with --arch (a random-weight model); --model loads its own tokenizer")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    config = GistConfig(chunk_size=args.chunk_size, top_k=args.top_k)
    adapter = None if args.adapter == "none" else args.adapter
    if args.arch:
        from gsa_rag.kernels.bench import random_model

        if args.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            tokenizer.add_tokens(config.special_tokens, special_tokens=True)  # no-op for a gsa-rag tokenizer
        else:
            base, tokenizer = load_model(args.model, gist_config=config, device="cpu")  # for its tokenizer
            del base
        gsa = GistEngine(random_model(args.arch, args.layers, device, dtype, vocab_size=len(tokenizer)), tokenizer, config)
        ref_model = gsa.model  # without a gist state its attention is plain causal SDPA
    else:
        gsa = GistEngine.from_pretrained(args.model, config=config, adapter=adapter, device=device, dtype=dtype)
        ref_model, _ = load_model(args.model, device=device, dtype=dtype, attn_implementation="sdpa")
    if args.fuse:
        from gsa_rag.fused import fuse_model

        for lm in {id(gsa.model): gsa.model, id(ref_model): ref_model}.values():
            parts = fuse_model(lm)
            print(f"# fused: {len(parts.norms)} norms, {len(parts.mlps)} MLPs, rotary of {parts.rotary}; "
                  f"left alone: {parts.skipped or 'nothing'}")
    gsa_model, tokenizer = gsa.model, gsa.tokenizer
    full = GistEngine(gsa_model, tokenizer, GistConfig(chunk_size=0))  # the same prompt, no gists (for ids)
    per_token = kv_bytes_per_token(gsa_model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    all_passages, question, source = load_passages(args.data, max(args.passages))
    model_name = f"random {args.arch}, {gsa_model.config.num_hidden_layers} layers" if args.arch else args.model or "default"
    print(f"# {name}, {dtype}, model {gsa_model.config.model_type} ({model_name}), chunk {args.chunk_size}, "
          f"top-{args.top_k}, links {args.links if args.links is not None else len(config.link_tokens)}, offload={args.offload}, "
          f"passages: {source}, question: {question!r}")

    rows = []
    for n in args.passages:
        passages = all_passages[:n]
        prompt = full.layout([question], [passages]).input_ids
        memory = GistMemory(gsa, offload=args.offload, num_links=args.links, progress=False)
        sync(device)
        start = time.perf_counter()
        ids = memory.add(passages)
        sync(device)
        encode_ms = (time.perf_counter() - start) * 1e3

        def full_prefill(prompt=prompt):
            with torch.inference_mode():
                return int(ref_model(prompt, logits_to_keep=1).logits[0, -1].argmax())

        def from_memory(memory=memory, ids=ids):
            layout, cache = memory.prepare(question, ids)
            token = first_token(gsa, layout, cache)
            return token, cache, layout

        fns = {"full": full_prefill, "memory": from_memory}
        if args.gsa_prefill_up_to is None or n <= args.gsa_prefill_up_to:
            fns["gsa"] = lambda passages=passages: first_token(gsa, gsa.layout([question], [passages]), None)
        ms, results = timed(fns, device, args.repeats)
        t_full, t_mem, t_gsa = ms["full"], ms["memory"], ms.get("gsa")
        peak = None
        if device.type == "cuda":  # device memory one question over the memory takes beyond what is held
            del results
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            _, cache, layout = from_memory()
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            _, cache, layout = results["memory"]
        stats = memory.stats()
        ops_memory, ops_full = aten_ops(from_memory), aten_ops(full_prefill)
        buffer = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
        row = {
            "passages": n,
            "prompt_tokens": int(prompt.shape[1]),
            "gsa_prompt_tokens": int(layout.seq_len),
            "ttft_full_hf_ms": t_full,
            "ttft_gsa_prefill_ms": t_gsa,
            "ttft_gsa_memory_ms": t_mem,
            "speedup_vs_full": t_full / t_mem,
            "encode_once_ms": encode_ms,
            "full_kv_bytes": int(prompt.shape[1]) * per_token,
            "memory_device_bytes": stats.device_bytes,
            "memory_host_bytes": stats.host_bytes,
            "memory_gist_bytes": stats.gist_bytes,
            "memory_full_bytes": stats.full_bytes,
            "question_buffer_bytes": buffer,
            "fetched_bytes": cache.fetched_bytes,
            "question_peak_device_bytes": peak,
            "question_aten_ops_memory": ops_memory,
            "question_aten_ops_full": ops_full,
            "device": name,
            "model": model_name,
            "dtype": str(dtype),
            "offload": args.offload,
            "rows_kernel": args.rows_kernel,
            "select_kernel": args.select_kernel,
            "place_kernel": args.place_kernel,
            "fused": args.fuse,
            "chunk_size": args.chunk_size,
            "top_k": args.top_k,
            "source": source,
        }
        if args.graph and device.type == "cuda":
            row.update(graph_columns(gsa, ref_model, prompt, memory, question, ids, args.repeats))
            if "ttft_gsa_memory_graph_ms" in row and "ttft_full_graph_ms" in row:
                row["speedup_graph_vs_full_graph"] = row["ttft_full_graph_ms"] / row["ttft_gsa_memory_graph_ms"]
                row["speedup_graph_vs_full"] = t_full / row["ttft_gsa_memory_graph_ms"]
        rows.append(row)
        if args.profile and n == max(args.passages):
            profile_question(gsa, memory, question, ids)
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()
                          if k not in ("device", "dtype", "source")}), flush=True)

    mib = 1 / 2**20
    print()
    print("| passages | prompt tokens | TTFT full (HF) ms | TTFT GSA prefill ms | TTFT GSA memory ms | speedup vs full "
          "| encode once ms | full KV MiB | memory device MiB | memory host MiB | device / full KV | question buffer MiB "
          "| fetched MiB | aten ops memory / full |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gsa_ms = "-" if r["ttft_gsa_prefill_ms"] is None else f"{r['ttft_gsa_prefill_ms']:.1f}"
        print(f"| {r['passages']} | {r['prompt_tokens']} | {r['ttft_full_hf_ms']:.1f} | {gsa_ms} "
              f"| {r['ttft_gsa_memory_ms']:.1f} | {r['speedup_vs_full']:.1f}x | {r['encode_once_ms']:.0f} "
              f"| {r['full_kv_bytes'] * mib:.2f} | {r['memory_device_bytes'] * mib:.2f} | {r['memory_host_bytes'] * mib:.2f} "
              f"| {r['memory_device_bytes'] / r['full_kv_bytes']:.3f} | {r['question_buffer_bytes'] * mib:.2f} "
              f"| {r['fetched_bytes'] * mib:.2f} | {r['question_aten_ops_memory']} / {r['question_aten_ops_full']} |")
    graphed = [r for r in rows if "ttft_gsa_memory_graph_ms" in r and "ttft_full_graph_ms" in r]
    if graphed:  # --graph: where the replayed question stands against its own floor
        print()
        print("| passages | full prefill, replayed ms | prepare ms | question, replayed ms | its rows alone, replayed ms "
              "| TTFT vs full | with the question at its rows alone |")
        print("|---|---|---|---|---|---|---|")
        for r in graphed:
            alone = r.get("rows_alone_graph_ms", float("nan"))
            print(f"| {r['passages']} | {r['ttft_full_graph_ms']:.2f} | {r['prepare_ms']:.2f} | {r['question_graph_ms']:.2f} "
                  f"| {alone:.2f} ({r['question_rows']} rows) | {r['speedup_graph_vs_full_graph']:.2f}x "
                  f"| {r['ttft_full_graph_ms'] / (r['prepare_ms'] + alone):.2f}x |")
    if args.out:
        with open(args.out, "x") as f:  # never overwrite a saved result
            json.dump(rows, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
