"""Max |logit difference| between GSA with no gists and the unmodified HF model, on the
default model and a real RAG prompt (the bundled demo passages). Prints one table row.

    python benchmarks/equivalence.py [--device cpu|cuda] [--dtype float32|bfloat16]
"""

import argparse
import json
from importlib import resources

import torch

from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.generation import forward
from gsa_rag.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    demo = json.loads(resources.files("gsa_rag").joinpath("data/demo_passages.json").read_text())

    gsa, tok = load_model(device=args.device, dtype=dtype)
    ref, _ = load_model(device=args.device, dtype=dtype, attn_implementation="sdpa")
    engine = GistEngine(gsa, tok, GistConfig(chunk_size=0))
    layout = engine.layout([demo["question"]], [demo["passages"]])
    from transformers import DynamicCache

    with torch.no_grad():
        got = forward(gsa, layout, layout.seq_len, DynamicCache(), engine.config)[0].logits.float()
        want = ref(layout.input_ids).logits.float()
        greedy = ref.generate(layout.input_ids, attention_mask=torch.ones_like(layout.input_ids), do_sample=False,
                              max_new_tokens=args.new_tokens, suppress_tokens=engine._banned.tolist())
    ref_text = tok.decode(greedy[0, layout.seq_len :], skip_special_tokens=True)
    gsa_text = engine.generate(demo["question"], demo["passages"], max_new_tokens=args.new_tokens)
    print("| device | dtype | prompt tokens | max abs logit diff | logit scale (max abs) | greedy text identical |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.device} | {args.dtype} | {layout.seq_len} | {(got - want).abs().max().item():.3g} "
          f"| {want.abs().max().item():.3g} | {gsa_text == ref_text} |")


if __name__ == "__main__":
    main()
