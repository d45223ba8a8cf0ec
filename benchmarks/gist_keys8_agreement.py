"""How much int8 gist scoring (`GistConfig(score_dtype="int8")`) changes what a gist adapter
selects and answers, against the default "cache" scoring.

    python benchmarks/gist_keys8_agreement.py --data nq --limit 20          # the bundled 8x adapter, CPU
    python benchmarks/gist_keys8_agreement.py --data nq --limit 200 --adapter runs/sft8 --dtype bfloat16

Two greedy runs of the rag_eval "gsa" method over the same questions and passages (one question
at a time), the first with score_dtype "cache", the second with "int8":

- selections: in the first run a hook (GistState.hook) sees every selecting layer's query and key
  tensors and selects from them twice, with `ChunkSelector` under each scoring; per (KV head,
  row) the two chunk sets are compared: mean Jaccard and the share of identical sets, for the
  question's tail rows (prefill) and the decode steps apart, per layer and over all of them.
  Both scorings read the same tensors, so a difference is the scoring's alone, not a drift of
  the inputs after an earlier layer chose otherwise.
- answers: the share of questions answered with the same text by both runs, and each run's
  best-subspan EM (rag_eval's metric).

On CUDA a decode step takes the sparse kernel path, which calls no hook: set GSA_RAG_KERNELS=0
to compare decode selections there (the answers then come from the reference path too).

`--levels 7` asks what a 4-bit copy would do: the same per-channel scales, values rounded to
-7..7 (stored as int8 still, so only the rounding changes, not the kernels).

Prints a table and writes JSON (default benchmarks/results/gist_keys8/agreement_<set><n>.json);
an existing result file is never overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parent.parent
# benchmarks/ holds kernels.py: keep it off sys.path so transformers' own `kernels` import is not shadowed
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]

from gsa_rag.kernels import gist_keys8
from gsa_rag.kernels.bench import environment as kernel_environment
from gsa_rag.kernels.bench import refuse_existing_results

from gsa_rag.attention import GistState
from gsa_rag.engine import GistEngine
from gsa_rag.eval.data import KNOWN_SETS, load_examples
from gsa_rag.eval.harness import RunSettings, environment, run_method
from gsa_rag.eval.methods import RunContext, parse_spec
from gsa_rag.selection import ChunkSelector

SCORINGS = ("cache", "int8")
PHASES = ("prefill", "decode")


def set_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [N, C] chunk sets (one a row) -> (float [N] Jaccard, bool [N] identical). Two empty
    sets agree fully (Jaccard 1)."""
    inter = (a & b).sum(-1)
    union = (a | b).sum(-1)
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float32))
    return jaccard.float(), (a == b).all(-1)


class Agreement:
    """Per (phase, layer) sums of the set comparisons: sets, Jaccard, identical sets, and the
    chunks each scoring chose."""

    def __init__(self):
        self.sums: dict[tuple[str, int], torch.Tensor] = {}

    def add(self, phase: str, layer: int, cache: torch.Tensor, int8: torch.Tensor, live: torch.Tensor) -> None:
        """cache, int8: bool [B, Hkv, R, C] the chosen chunks of R rows; live: bool [B, R] the
        rows that are the sequence's own tail rows (left padding and other rows' tails are not)."""
        keep = live[:, None, :].expand(cache.shape[:3])
        a, b = cache[keep], int8[keep]
        jaccard, same = set_agreement(a, b)
        row = torch.tensor([float(len(jaccard)), float(jaccard.sum()), float(same.sum()),
                            float(a.sum()), float(b.sum())], dtype=torch.float64)
        key = (phase, layer)
        self.sums[key] = self.sums.get(key, torch.zeros(5, dtype=torch.float64)) + row

    def summary(self) -> dict:
        """{phase: {"all": stats, "layers": {layer: stats}}}; stats: sets, mean_jaccard,
        identical_pct, chunks_cache and chunks_int8 (mean set sizes); None for a phase without sets."""
        def stats(total: torch.Tensor) -> dict:
            n, jac, same, ca, cb = total.tolist()
            n_ = max(n, 1.0)
            return {"sets": int(n), "mean_jaccard": jac / n_, "identical_pct": 100 * same / n_,
                    "chunks_cache": ca / n_, "chunks_int8": cb / n_}

        out: dict = {}
        for phase in PHASES:
            layers = {layer: total for (p, layer), total in sorted(self.sums.items()) if p == phase}
            out[phase] = None if not layers else {
                "all": stats(sum(layers.values())),
                "layers": {str(layer): stats(total) for layer, total in layers.items()},
            }
        return out


def capturing_factory(agreement: Agreement):
    """A state factory (generation.StateFactory) whose states select every selecting layer's tail
    rows under both scorings, from the query and key the layer itself selects from, into `agreement`."""

    def make(layout, num_new, config):
        state = GistState.for_new_tokens(layout, num_new, config)
        phase = "prefill" if num_new == layout.seq_len else "decode"
        configs = [dataclasses.replace(config, score_dtype=s) for s in SCORINGS]

        def hook(layer_idx, query, key, value, mask):
            rows = state.tail_rows()
            if layer_idx < config.first_selecting_layer or rows is None or rows.select is None:
                return
            q = query[:, :, rows.start:]
            picks = [ChunkSelector(layout.gist_index, layout.gist_valid, rows.select.context_len, c)(q, key)
                     for c in configs]
            agreement.add(phase, layer_idx, *picks, layout.is_tail[:, rows.q_index])

        hook.reads_mask = False  # the selections need no mask: spare building one per layer
        state.hook = hook
        return state

    return make


def answer_runs(engine: GistEngine, examples, data: str, max_new_tokens: int, progress: bool = True
                ) -> tuple[dict, Agreement]:
    """The "gsa" method's greedy runs under each scoring -> ({scoring: run_method's record}, the
    selections compared in the "cache" run)."""
    agreement = Agreement()
    settings = RunSettings(batch_size=1, max_new_tokens=max_new_tokens, progress=progress)
    runs = {}
    for scoring in SCORINGS:
        # every field the spec does not set comes from ctx.trained (methods.base.over_trained)
        ctx = RunContext(data, engine.model.config.num_hidden_layers, retrieval_dir="",
                         trained=dataclasses.replace(engine.config, score_dtype=scoring))
        method = parse_spec("gsa")
        if scoring == "cache":
            # an instance attribute in place of Method.state_factory: the harness asks the method for it
            method.state_factory = lambda config: capturing_factory(agreement)
        runs[scoring] = run_method(engine, method, examples, ctx, settings)
    return runs, agreement


def quantization_levels(levels: int):
    """int8 gist keys rounded to -levels..levels (per-channel scales as shipped) inside the block."""
    return mock.patch.object(gist_keys8, "QMAX", levels)


def compare_answers(examples, runs: dict) -> tuple[dict, list[dict]]:
    """(the answers' summary, per question both predictions and their best-subspan EM)."""
    rows = []
    for ex, a, b in zip(examples, runs["cache"]["results"], runs["int8"]["results"], strict=True):
        rows.append({"id": ex.id, "question": ex.question, "answers": ex.answers,
                     "cache": a["prediction"], "int8": b["prediction"],
                     "subspan_em_cache": a["subspan_em"], "subspan_em_int8": b["subspan_em"]})
    n = max(len(rows), 1)
    summary = {"n": len(rows), "identical_pct": 100 * sum(r["cache"] == r["int8"] for r in rows) / n,
               **{f"subspan_em_{s}": runs[s]["summary"]["subspan_em"] for s in SCORINGS},
               **{f"f1_{s}": runs[s]["summary"]["f1"] for s in SCORINGS}}
    return summary, rows


def print_tables(selection: dict, answers: dict) -> None:
    print("| layer | prefill Jaccard | prefill identical (%) | decode Jaccard | decode identical (%) |\n|---|---|---|---|---|")
    layers = sorted({int(layer) for s in selection.values() if s for layer in s["layers"]})

    def cells(phase: str, layer: str | None) -> str:
        s = selection[phase]
        st = None if s is None else (s["all"] if layer is None else s["layers"].get(layer))
        return "- | -" if st is None else f"{st['mean_jaccard']:.4f} | {st['identical_pct']:.1f}"

    for layer in [*map(str, layers), None]:
        print(f"| {layer or 'all'} | {cells('prefill', layer)} | {cells('decode', layer)} |")
    for phase in PHASES:
        if selection[phase]:
            st = selection[phase]["all"]
            print(f"{phase}: {st['sets']} sets, mean {st['chunks_cache']:.2f} chunks (cache) / {st['chunks_int8']:.2f} (int8)")
    print(f"\nanswers: {answers['identical_pct']:.1f}% of {answers['n']} identical; best-subspan EM "
          f"cache {answers['subspan_em_cache']:.1f}, int8 {answers['subspan_em_int8']:.1f}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="nq", help=f"{', '.join(KNOWN_SETS)} (under $GSA_RAG_DATA) or a JSONL path")
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--adapter", default="default", help="adapter dir, 'default' (bundled) or 'none'")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--levels", type=int, default=gist_keys8.QMAX,
                   help=f"quantization levels each side of 0 (default {gist_keys8.QMAX}, int8; 7 emulates 4 bits)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/gist_keys8/agreement_<set><n>.json)")
    args = p.parse_args(argv)
    examples = load_examples(args.data, split=args.split, limit=args.limit)
    if not 1 <= args.levels <= gist_keys8.QMAX:
        p.error(f"--levels must be 1..{gist_keys8.QMAX} (int8 values), got {args.levels}")
    if not examples:
        p.error(f"no questions in {args.data}")
    tag = args.data if args.data in KNOWN_SETS else Path(args.data).stem
    suffix = ("" if args.dtype == "auto" else f"-{args.dtype}") + ("" if args.levels == gist_keys8.QMAX else f"-levels{args.levels}")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / "gist_keys8" / f"agreement_{tag}{len(examples)}{suffix}.json"
    refuse_existing_results(p, out.parent, out.stem, (out.suffix,))  # before the runs, not after them

    adapter = None if args.adapter == "none" else args.adapter
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    engine = GistEngine.from_pretrained(adapter=adapter, device=args.device, dtype=dtype)
    if engine.config.meta_chunks:
        p.error("score_dtype 'int8' is single-level only; this adapter's config has meta_chunks")
    with quantization_levels(args.levels):
        runs, agreement = answer_runs(engine, examples, tag, args.max_new_tokens)
    selection = agreement.summary()
    answers, questions = compare_answers(examples, runs)
    name = Path(adapter).name if adapter and adapter != "default" else ("default" if adapter else "untrained")
    result = {
        "kind": "gist_keys8_agreement",
        "command": " ".join(["python", "benchmarks/gist_keys8_agreement.py", *(sys.argv[1:] if argv is None else argv)]),
        "run": {"data": args.data, "split": args.split, "n": len(examples), "adapter": name,
                "dtype": str(next(engine.model.parameters()).dtype), "max_new_tokens": args.max_new_tokens,
                "levels": args.levels,
                "gist_config": engine.config.to_dict()},
        "environment": {**kernel_environment(), **environment(engine.device)},
        "selection": selection,
        "answers": answers,
        "summaries": {s: runs[s]["summary"] for s in SCORINGS},
        "questions": questions,
    }
    print(f"\nint8 ({args.levels} levels) vs cache gist scoring — {args.data}, {len(examples)} questions, adapter {name}, "
          f"{result['run']['dtype']}\n")
    print_tables(selection, answers)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False, default=str) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
