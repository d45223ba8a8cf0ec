"""The host side of `GistMemory.prepare` alone, on any machine (issue #3: on the H200 it is most of
`prepare`, and its run-to-run noise there hides changes of a few tenths of a millisecond).

    python benchmarks/prepare_host.py [--passages 10 20 50] [--repeats 30] [--profile 50]

A random model with Llama-3-8B's layer and head counts (32 layers, 32 query / 8 KV heads) but head
dim 16 and width 64, the default model's tokenizer, synthetic passages (as benchmarks/memory_ttft.py
draws them) added once; then `prepare` timed with its device work stubbed out: the KV buffers
allocated empty instead of zeroed and the placement kernel's launch replaced by a no-op, the rest of
its host path as on CUDA (the placement's table building included). What this cannot see: the host
cost of CUDA calls (allocations, launches, copies), which the one-transfer layout move reduces.
Prints the median milliseconds per passage count; --profile N prints cProfile's top functions at N.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from gsa_rag.kernels import dispatch, kv_place
from transformers import AutoModelForCausalLM, LlamaConfig

import gsa_rag.attention  # noqa: F401  (registers the "gsa" attention)
from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.memory import GistMemory
from gsa_rag.models import load_model

sys.path.insert(0, str(Path(__file__).parent))
from memory_ttft import load_passages


class _NoLaunch:
    """Stands in for the placement kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profile", type=int, default=None, help="cProfile prepare at this many passages")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = GistConfig(chunk_size=8, top_k=4)
    base, tokenizer = load_model(None, gist_config=config, device="cpu")
    del base
    torch.manual_seed(0)
    shape = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=16, vocab_size=len(tokenizer), rope_theta=500000.0,
                        max_position_embeddings=65536)
    model = AutoModelForCausalLM.from_config(shape, attn_implementation="gsa", dtype=torch.bfloat16).eval()
    engine = GistEngine(model, tokenizer, config)
    passages, question, _ = load_passages(None, max(args.passages))
    zeros, zeros_like = torch.zeros, torch.zeros_like
    for n in args.passages:
        memory = GistMemory(engine, offload=False, progress=False)
        ids = memory.add(passages[:n])  # encoded with the real functions
        kernel, use_kernels = kv_place._place_kernel, dispatch.use_kernels
        kv_place._place_kernel, dispatch.use_kernels = _NoLaunch(), lambda device: True
        # the KV buffers ([L, 1, Hkv, T, D]) left unzeroed: the device zeroes them asynchronously
        torch.zeros = lambda *size, **kw: (torch.empty if len(size) == 5 else zeros)(*size, **kw)
        torch.zeros_like = lambda t, **kw: (torch.empty_like if t.dim() == 5 else zeros_like)(t, **kw)
        try:
            for _ in range(3):
                memory.prepare(question, ids)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                memory.prepare(question, ids)
                times.append(time.perf_counter() - start)
            print(f"{n} passages: prepare's host path {statistics.median(times) * 1e3:.3f} ms (median of {args.repeats})")
            if args.profile == n:
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(args.repeats):
                    memory.prepare(question, ids)
                profiler.disable()
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
                print(out.getvalue())
        finally:
            kv_place._place_kernel, dispatch.use_kernels = kernel, use_kernels
            torch.zeros, torch.zeros_like = zeros, zeros_like


if __name__ == "__main__":
    main()
