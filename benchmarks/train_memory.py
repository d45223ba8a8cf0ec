"""Memory and time of one SFT training step (`batch_losses` forward + backward) through the
reference attention path, on a tiny Llama with the default model's head layout.

    python benchmarks/train_memory.py                       # CPU: 4 layers, B=4, T ~ 512, 1024
    python benchmarks/train_memory.py --tokens 2048 --batch 8 --layers 30   # on a GPU

Printed per prompt length:
    T             the batch's padded length (gists included); tail = the longest tail in rows
    t_step_s      wall time of one forward + backward (best of --repeats, after a warm-up)
    peak_MB       peak allocated memory during that step (CUDA: max_memory_allocated; CPU: the
                  profiler's allocator trace), above what was allocated before it
    saved_for_backward_MB  what autograd keeps from the forward (distinct storages, weights included)
    mask_MB/layer the bytes of T-wide 4-D tensors ([B, H, rows, T]: masks, their float bias,
                  score matrices) created while attention runs, per attention layer
    masks         the attn_mask shapes SDPA received in one layer that selects

The model is random (the numbers do not depend on the weights); the prompts are canonical RAG
examples (question, passages, answer) laid out by `train.data.collate`, so the tail (question +
answer rows, the rows that select) is as in training.
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
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from gsa_rag import attention
from gsa_rag.config import GistConfig
from gsa_rag.models import default_model_path, load_model
from gsa_rag.train.data import collate, rag_example
from gsa_rag.train.loop import batch_losses

WORDS = ("gist", "tokens", "summarise", "chunks", "of", "text", "so", "that", "later", "tokens", "recall",
         "them", "while", "the", "question", "unfolds", "the", "chunks", "it", "selects")


def tiny_model(layers: int, device: str, tokenizer_dir: str):
    """A random Llama with SmolLM2-135M's attention: 9 query / 3 KV heads of d=64."""
    path = tempfile.mkdtemp(prefix="train_memory_")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return load_model(path, dtype=torch.float32, device=device)


def rag_batch(tok, config: GistConfig, batch: int, tokens: int, device: str):
    """`batch` RAG examples of about `tokens` prompt tokens (rows differ a little in length)."""
    examples = []
    for b in range(batch):
        n = tokens - 40 - 16 * b  # ragged rows: left padding, as in training
        words = [WORDS[(i * 7 + b) % len(WORDS)] for i in range(int(n / 1.3))]
        passages = [{"title": f"P{i}", "text": " ".join(words[i::4])} for i in range(4)]
        examples.append(rag_example(tok, "Which chunks does the question select, and why?", passages,
                                    "The chunks whose gists score highest."))
    return collate(examples, config, tok).to(device)


class MaskCounter(TorchDispatchMode):
    """Counts the bytes of T-wide 4-D tensors that ops create (masks, float biases, scores)."""

    def __init__(self, T: int):
        super().__init__()
        self.T, self.bytes = T, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] == self.T and t.shape[-2] > 1:
                self.bytes += t.numel() * t.element_size()  # views count too: they are rare here
        return out


def _masks_seen(model, batch, config, layer: int) -> list[str]:
    """The attn_mask shapes (and dtypes) SDPA receives in `layer` during one forward."""
    seen, sdpa, current = [], attention.F.scaled_dot_product_attention, {}
    original = attention.gsa_attention

    def spy(*args, **kwargs):
        mask = kwargs.get("attn_mask")
        if current.get("layer") == layer and mask is not None:
            seen.append(f"{list(mask.shape)} {str(mask.dtype).removeprefix('torch.')}")
        return sdpa(*args, **kwargs)

    def tracked(module, *args, **kwargs):
        current["layer"] = module.layer_idx
        return original(module, *args, **kwargs)

    attention.F.scaled_dot_product_attention = spy
    from transformers import AttentionInterface
    AttentionInterface.register("gsa", tracked)
    try:
        with torch.no_grad():
            batch_losses(model, batch, config)
    finally:
        attention.F.scaled_dot_product_attention = sdpa
        AttentionInterface.register("gsa", original)
    return seen


def _peak_bytes(step, device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU: the profiler records every allocation and free with the allocator's running total
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace:
            events = json.load(trace)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not memory:
        return 0
    base = memory[0]["Total Allocated"] - memory[0]["Bytes"]  # the total is taken after each event
    return max(m["Total Allocated"] for m in memory) - base


def _saved_bytes(forward) -> int:
    """Bytes autograd keeps for backward over one forward (distinct storages: a bias shared by
    every layer counts once; the weights count too, the same before and after)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return sum(storages.values())


def measure(model, tok, config, args, tokens: int) -> dict:
    batch = rag_batch(tok, config, args.batch, tokens, args.device)
    layout = batch.layout
    T = layout.seq_len
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else torch.autocast("cpu", enabled=False)

    def forward():
        with autocast:
            return batch_losses(model, batch, config, args.selection)[0]

    def step():
        total = forward()
        total.backward()
        model.zero_grad(set_to_none=True)
        return float(total.detach())

    first_loss = step()  # warm-up
    times = []
    for _ in range(args.repeats):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = _peak_bytes(step, args.device)
    saved = _saved_bytes(forward)
    counter = MaskCounter(T)
    with counter, torch.no_grad(), autocast:
        batch_losses(model, batch, config)
    layers = model.config.num_hidden_layers
    return {
        "T": T, "tail": int(layout.is_tail.sum(-1).max()), "B": layout.batch_size,
        "loss": round(first_loss, 6),
        "t_step_s": round(min(times), 3),
        "peak_MB": round(peak / 2**20, 1),
        "saved_for_backward_MB": round(saved / 2**20, 1),
        "mask_MB_per_layer": round(counter.bytes / layers / 2**20, 2),
        "masks": _masks_seen(model, batch, config, layer=max(config.first_selecting_layer, layers - 1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024], help="prompt tokens per row")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--selection", type=float, default=0.0, help="selection-loss weight (0: off)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokenizer", default=None, help="a directory with the default model's tokenizer "
                        "(default: the default model's, fetched once)")
    args = parser.parse_args()
    model, tok = tiny_model(args.layers, args.device, args.tokenizer or default_model_path())
    model.train()
    config = GistConfig()
    print(f"device {args.device}, torch {torch.__version__}, {args.layers} layers, 9 q / 3 kv heads, d 64, "
          f"batch {args.batch}, selection loss {args.selection}")
    for tokens in args.tokens:
        row = measure(model, tok, config, args, tokens)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
