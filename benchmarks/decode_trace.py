"""Where a decode step through the kernels parts from the reference path, layer by layer.

    python benchmarks/decode_trace.py --meta 4                 # H-GSA 32x, Llama-3-8B shapes, 32K
    python benchmarks/decode_trace.py --context 32 --layers 8  # flat GSA 8x (adaptive k)

decode_latency.py reports `logits err`: the first decode step's logits through the kernels
(GSA_RAG_KERNELS=1) against the reference path (=0). A whole step compounds every layer's
rounding, and a rounding can flip a near-tie in a later layer's selection, so that number alone
cannot tell a kernel that chooses differently from one that rounds differently. This script
decodes one step both ways from the same prefill (a random-weight model, bf16, one plain causal
prefill over decode_case's synthetic layout, as decode_latency.py) and prints, per layer:

    whole_cols  visible columns (summed over KV heads) that differ between the two whole steps;
    same_err    |out kernel - out ref| / |out ref| of the layer's attention when both paths get
                the reference step's own query, keys and values for that layer;
    same_cols   visible columns that differ on those same inputs (0: the kernels choose exactly
                what the reference chooses).

Writes `--out`/`--name`.json; results are never overwritten.
"""

from __future__ import annotations

import os
import sys

# benchmarks/kernels.py shares its name with the `kernels` package that transformers imports:
# drop this folder from the import path so `import kernels` can never find a script here
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse

import torch
from gsa_rag.kernels.bench import (
    ARCHS,
    crop_cache,
    decode_case,
    environment,
    random_model,
    refuse_existing_results,
    rel_err,
    set_attention,
    write_results,
)

K = 1024


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    """Visible columns that differ between two last-row masks [B, 1 or H, T] (1 broadcasts)."""
    H = max(a.shape[1], b.shape[1])
    return int((a.expand(-1, H, -1) != b.expand(-1, H, -1)).sum())


def recording_state(store: dict):
    """A state factory whose GistState hands every layer's last-row mask to `store` (the hook
    that gist memory uses sees the same mask on both paths)."""
    from gsa_rag.attention import GistState

    def factory(layout, num_new, config):
        state = GistState.for_new_tokens(layout, num_new, config)
        state.hook = lambda layer, query, key, value, mask: store.__setitem__(layer, mask[:, :, -1].clone())
        return state

    return factory


def trace(model, config, layout) -> dict:
    from transformers import AttentionInterface, DynamicCache

    from gsa_rag.attention import gsa_attention
    from gsa_rag.generation import _cache_keyword, forward

    cache = DynamicCache()
    set_attention(model, "sdpa")
    with torch.inference_mode():
        model(input_ids=layout.input_ids, position_ids=layout.position_ids, use_cache=True,
              **{_cache_keyword(model): cache})
    prefill_len = layout.seq_len
    step = layout.append(torch.full((layout.batch_size, 1), 7, dtype=torch.long, device=layout.input_ids.device))
    inputs = {}

    def recording(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        inputs[module.layer_idx] = (module, query.clone(), key.clone(), value.clone(), scaling)
        return gsa_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    AttentionInterface.register("gsa_recording", recording)
    logits, whole = {}, {}
    for mode in ("0", "1"):  # the reference first: its layers' inputs are the ones replayed below
        os.environ["GSA_RAG_KERNELS"] = mode
        crop_cache(cache, prefill_len)  # back to the prefill
        set_attention(model, "gsa_recording" if mode == "0" else "gsa")
        whole[mode] = {}
        with torch.inference_mode():
            out, _ = forward(model, step, 1, cache, config, state_factory=recording_state(whole[mode]))
        logits[mode] = out.logits[:, -1]
    rows = []
    for layer_idx in sorted(inputs):
        module, query, key, value, scaling = inputs[layer_idx]
        outs, same = {}, {}
        for mode in ("0", "1"):
            os.environ["GSA_RAG_KERNELS"] = mode
            store = {}
            state = recording_state(store)(step, 1, config)
            with torch.inference_mode():
                outs[mode] = gsa_attention(module, query, key, value, None, scaling, gsa_state=state)[0]
            same[mode] = store[layer_idx]
        rows.append({"layer": layer_idx, "whole_cols": differing(whole["1"][layer_idx], whole["0"][layer_idx]),
                     "same_err": rel_err(outs["1"], outs["0"]), "same_cols": differing(same["1"], same["0"]),
                     "ref_cols": int(same["0"].sum())})
    return {"logits_rel_err": rel_err(logits["1"], logits["0"]), "layers": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama3-8b", choices=list(ARCHS))
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--context", type=int, default=32, help="K tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--meta", type=int, nargs="*", default=[], help="H-GSA: gists per meta-gist at each level, e.g. 4")
    p.add_argument("--top-k", type=int, default=4, help="with --meta: units each query head keeps at every level")
    p.add_argument("--out", default="benchmarks/results/kernels", help="folder of the result file")
    p.add_argument("--name", default=None, help="result file name without .json")
    args = p.parse_args(argv)
    layers = args.layers or ARCHS[args.arch]["num_hidden_layers"]
    meta = "meta" + "x".join(map(str, args.meta)) + f"_top{args.top_k}" if args.meta else "flat"
    name = args.name or f"decode_trace_{args.arch}_l{layers}_b{args.batch}_{args.context}k_{meta}"
    refuse_existing_results(p, args.out, name, suffixes=(".json",))
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode_trace.py needs CUDA (it compares the kernels with the reference)")
    model = random_model(args.arch, args.layers, "cuda")
    config, layout = decode_case(args.batch, args.context * K, 8, tuple(args.meta), args.top_k, device="cuda")
    result = trace(model, config, layout)
    print(f"{args.arch}, {layers} layers, batch {args.batch}, {args.context}K, {meta}: "
          f"whole-step logits err {result['logits_rel_err']:.3e}")
    print("layer  whole_cols  same_err  same_cols  ref_cols")
    for r in result["layers"]:
        print(f"{r['layer']:5d}  {r['whole_cols']:10d}  {r['same_err']:.2e}  {r['same_cols']:9d}  {r['ref_cols']:8d}")
    payload = {"env": environment(), "arch": args.arch, "layers": layers, "batch": args.batch,
               "context": args.context * K, "meta": args.meta, "top_k": args.top_k if args.meta else None, **result}
    print(f"wrote {write_results(args.out, name, payload)}")


if __name__ == "__main__":
    main()
