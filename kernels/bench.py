"""Helpers the kernel benchmarks share (benchmarks/kernels.py, prefill.py, decode_latency.py):
a synthetic gist layout of any length (no tokenizer), timing, the measured copy bandwidth,
and result files. Nothing here runs at import."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from gsa_rag.layout import GistLayout


def synthetic_layout(batch: int, context: int, chunk: int, sink: int = 4, tail: int = 32,
                     device: str | torch.device = "cuda") -> GistLayout:
    """`sink` raw tokens, n chunks of `chunk` raw tokens + 1 gist (as many as fit in
    `context` columns), then `tail` raw tokens (question; the last one is the decode query).
    Every row of the batch has the same layout; token ids are arbitrary (1..999).

    Returns:
        A GistLayout with T = sink + n * (chunk + 1) + tail columns.
    """
    n = max(0, (context - sink) // (chunk + 1))
    T = sink + n * (chunk + 1) + tail
    col = torch.arange(T, device=device)
    rel = col - sink
    in_ctx = (col >= sink) & (rel < n * (chunk + 1))
    chunk_id = torch.where(col < sink, -1, torch.where(in_ctx, rel.div(chunk + 1, rounding_mode="floor"), n))
    is_gist = in_ctx & (rel.remainder(chunk + 1) == chunk)
    position = col - torch.cumsum(is_gist.long(), 0)
    gist_index = sink + torch.arange(max(n, 1), device=device) * (chunk + 1) + chunk
    if n == 0:
        gist_index.zero_()

    def rows(x):
        return x[None].expand(batch, -1).contiguous()

    return GistLayout(
        input_ids=rows(1 + col % 999),
        is_gist=rows(is_gist),
        is_sink=rows(col < sink),
        chunk_id=rows(chunk_id),
        passage_id=rows(torch.full_like(col, -1)),
        position_ids=rows(position),
        valid=rows(torch.ones_like(col, dtype=torch.bool)),
        num_chunks=torch.full((batch,), n, dtype=torch.long, device=device),
        gist_index=rows(gist_index),
    )


def decode_case(batch: int, context: int, chunk: int, meta_chunks: tuple[int, ...] = (), top_k: int = 4,
                score_dtype: str = "cache", device: str | torch.device = "cuda"):
    """The decode benchmarks' config and layout (sink 4, a 32-token tail): adaptive k (about L/8
    raw tokens per KV head) over `synthetic_layout`, or with `meta_chunks` H-GSA over
    `synthetic_hier_layout`, `top_k` units per head at every level (adaptive k is single-level
    only). Returns (GistConfig, GistLayout)."""
    from gsa_rag.config import GistConfig

    if meta_chunks:
        config = GistConfig(chunk_size=chunk, meta_chunks=tuple(meta_chunks), sink=4, k_policy="fixed", top_k=top_k,
                            word_aware=False, score_dtype=score_dtype)
        return config, synthetic_hier_layout(batch, context, chunk, tuple(meta_chunks), sink=4, tail=32, device=device)
    config = GistConfig(chunk_size=chunk, sink=4, k_policy="adaptive", adaptive_ratio=8.0, score_dtype=score_dtype)
    return config, synthetic_layout(batch, context, chunk, sink=4, tail=32, device=device)


class _StubTokenizer:
    """What build_layout asks of a tokenizer when word_aware is off: the gist tokens' ids."""

    pad_token_id = 0
    unk_token_id = None

    def convert_tokens_to_ids(self, token: str) -> int:
        return 998 if token == "<mgist>" else 999


def synthetic_hier_layout(batch: int, context: int, chunk: int, meta_chunks: tuple[int, ...], sink: int = 4,
                          tail: int = 32, device: str | torch.device = "cuda") -> GistLayout:
    """`synthetic_layout`'s sequence (the same raw tokens: sink, n chunks, tail) laid out with
    the hierarchy (H-GSA, `meta_chunks` as in GistConfig) by `gsa_rag.layout.build_layout`
    itself: one passage, so every level's sections are full but the last. Host-side Python,
    about a second per 100K tokens."""
    from gsa_rag.config import GistConfig
    from gsa_rag.layout import Segment, build_layout

    n = max(0, (context - sink) // (chunk + 1))
    ids = tuple(1 + i % 990 for i in range(sink + n * chunk))
    segments = [Segment(ids, True), Segment(tuple(1 + i % 990 for i in range(tail)), False)]
    config = GistConfig(chunk_size=chunk, meta_chunks=tuple(meta_chunks), sink=sink, word_aware=False)
    return build_layout([segments] * batch, config, _StubTokenizer(), device=device)


# one attention layer's heads, (query heads, KV heads, head dim): the decode benchmarks' shapes
SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}

# random-weight stand-ins for timing (speed does not depend on the weights; no download)
ARCHS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def random_model(arch: str, layers: int | None = None, device: str | torch.device = "cuda",
                 dtype: torch.dtype = torch.bfloat16, vocab_size: int | None = None, max_positions: int = 256 * 1024):
    """A Llama model of `arch`'s shapes (`ARCHS`) with seeded random weights, attention "gsa",
    in eval mode; `layers` and `vocab_size` override the architecture's (a tokenizer of
    another model fits when the vocabulary is its size)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import gsa_rag.attention  # noqa: F401  (registers "gsa")

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: choose from {sorted(ARCHS)}")
    spec = dict(ARCHS[arch])
    if layers:
        spec["num_hidden_layers"] = layers
    if vocab_size:
        spec["vocab_size"] = vocab_size
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(max_position_embeddings=max_positions, **spec),
                                                 attn_implementation="gsa", dtype=dtype)
    return model.eval()


def set_attention(model, name: str) -> None:
    """The model's attention implementation by name ("sdpa", "gsa", a registered one)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        model.config._attn_implementation = name


def crop_cache(cache, length: int) -> None:
    """Cuts every layer of a DynamicCache back to `length` columns (crop's sign convention changed
    across transformers 5.x releases, so this does it directly). On a DecodeCache the cut layers
    stay views of its buffers, so the next steps write over the cut columns: no reallocation."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b|, in float32."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def input_copies(set_bytes: int) -> int:
    """How many input sets of `set_bytes` a timing rotates among so that they hold >= 256 MB in
    all (an H200's L2 is 60 MB: no set is still cached when it comes round again); 1 to 16."""
    return max(1, min(16, -(-(256 << 20) // set_bytes)))


def bench_us(fn, cuda_graph: bool = False, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of `fn()` in microseconds (device events through triton.testing; host clock
    on the CPU). `cuda_graph`: time graph replays (no launch gaps); NaN if capture fails."""
    if not torch.cuda.is_available():
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    import triton.testing

    if cuda_graph:
        from gsa_rag.graph_decode import rng_kept_on_failed_capture

        try:
            with rng_kept_on_failed_capture():  # later cases may draw random numbers on the device
                return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
        except Exception as err:  # a path that syncs with the host cannot be captured
            print(f"  (cuda graph capture failed: {type(err).__name__}: {str(err)[:120]})")
            return float("nan")
    return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def host_us(fn, reps: int = 50, warmup: int = 3) -> float:
    """Median wall time of `fn()` in microseconds, synchronised after each call: for host work
    (plans, layout growth) that device-event timings would miss when it launches little."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return 1e6 * sorted(times)[len(times) // 2]


def copy_bandwidth(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))
    return 2 * num_bytes / (us * 1e-6)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def environment() -> dict:
    import triton

    return {"device": device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def context_tag(contexts) -> str:
    """Context lengths for a result file's name: sorted, once each, whole thousands as `8k`."""
    return "+".join(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in sorted(set(contexts)))


def refuse_existing_results(parser, out_dir: str | Path, name: str, suffixes: tuple[str, ...] = (".json", ".png")) -> None:
    """Stops a benchmark (argparse error, exit 2) before it measures anything when a result file
    of `name` exists under out_dir: results are never overwritten."""
    for path in (Path(out_dir) / f"{name}{s}" for s in suffixes):
        if path.exists():
            parser.error(f"{path} exists: results are never overwritten; pass --name or --out to write elsewhere")


def write_results(out_dir: str | Path, name: str, payload: dict, plot=None) -> Path:
    """Writes `name`.json under out_dir; `plot(plt, path)` draws `name`.png if matplotlib imports."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no PNG")
        else:
            plot(plt, out_dir / f"{name}.png")
            plt.close("all")
    return path


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    heads = [h for _, h, _ in columns]
    cells = [[format(r.get(k, float("nan")), f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)))
