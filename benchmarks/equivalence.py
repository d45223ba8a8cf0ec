"""Max |logit difference| between GSA with no gists and the unmodified HF model, on the
default model and a real RAG prompt (the bundled demo passages). Prints one table row.

    python benchmarks/equivalence.py [--device cpu|cuda] [--dtype float32|bfloat16] [--out results.json]
"""

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

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
    parser.add_argument("--out", default=None, help="also write the row, the command and the environment as JSON")
    args = parser.parse_args()
    if args.out and Path(args.out).exists():  # before the measurement, not after it
        parser.error(f"--out {args.out} exists: results are never overwritten; name another file")
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
    row = {"device": args.device, "dtype": args.dtype, "prompt_tokens": layout.seq_len,
           "max_abs_logit_diff": (got - want).abs().max().item(), "logit_scale": want.abs().max().item(),
           "greedy_text_identical": gsa_text == ref_text, "new_tokens": args.new_tokens}
    print("| device | dtype | prompt tokens | max abs logit diff | logit scale (max abs) | greedy text identical |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.device} | {args.dtype} | {row['prompt_tokens']} | {row['max_abs_logit_diff']:.3g} "
          f"| {row['logit_scale']:.3g} | {row['greedy_text_identical']} |")
    if args.out:
        from gsa_rag.eval.harness import environment

        result = {"kind": "equivalence", "command": " ".join(["python", *sys.argv]),
                  "environment": environment(torch.device(args.device)), "row": row}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
