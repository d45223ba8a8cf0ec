"""GSA against vector-store retrieval and other baselines on NQ, TriviaQA, HotpotQA, MuSiQue.

    python benchmarks/rag_eval.py --data nq --limit 100                      # every method, CPU or GPU
    python benchmarks/rag_eval.py --data hotpotqa --methods closed-book,full,vector:k=1,gsa:chunk=16
    python benchmarks/rag_eval.py --data nq --device cuda --batch-size 32 --adapter runs/sft8
    python benchmarks/rag_eval.py --data hotpotqa --methods gsa,gsa:reuse=1 --adapter runs/sft8-reuse  # KV reuse
    python benchmarks/rag_eval.py --list-methods

Methods are spec strings "name:option=value:..." (see --list-methods), or the presets
`baselines`, `open`, `sparse`, `all` (default; no preset holds the KV-reuse rows `gsa:...:reuse=1`,
which answer from one gist memory shared by the run, best with an adapter trained by
`gsa-rag train sft --reuse`). Every method answers the same questions, greedy;
the results file (JSON, under benchmarks/results/rag_eval/) is written after each method, and a
rerun of the same command skips the methods already in it (so a long run survives a time
limit: run it again). Then a markdown table on stdout and two plots beside the JSON.

Vector rankings are cached under benchmarks/results/rag_eval/retrieval/ (commit them): a machine
without faiss / LlamaIndex (the GPU box) reuses them. `--prepare-retrieval` only fills the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import random
import sys
import warnings
from pathlib import Path

import torch

from gsa_rag.adapters import (
    adapter_config,
    trained_manifest_dir,
    warn_if_untrained_layout,
)
from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.eval.data import HF_PREFIX, KNOWN_SETS, load_corpus, load_examples
from gsa_rag.eval.harness import RunSettings, environment, run_method
from gsa_rag.eval.methods import RunContext, available, parse_spec
from gsa_rag.eval.rag_report import markdown_table, plot_budget, plot_compression

RESULTS = Path(__file__).resolve().parent / "results" / "rag_eval"
FORMAT_VERSION = 1

PRESETS = {
    "baselines": ["closed-book", "full", "vector:k=1", "vector:k=3", "vector:k=5"],
    "open": ["vector:k=1:source=corpus", "vector:k=3:source=corpus", "vector:k=5:source=corpus"],
    "sparse": ["gist-only", "gist-only:chunk=16", "quest", "quest:chunk=16", "gsa", "gsa:chunk=16",
               "gsa:policy=adaptive", "gsa:chunk=16:policy=adaptive"],
}
PRESETS["all"] = PRESETS["baselines"] + PRESETS["open"] + PRESETS["sparse"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="nq",
                   help=f"{', '.join(KNOWN_SETS)} (under $GSA_RAG_DATA), a canonical JSONL path, or "
                        f"{HF_PREFIX}nq_open / {HF_PREFIX}trivia_qa / {HF_PREFIX}hotpot_qa (online, `datasets`)")
    p.add_argument("--split", default="dev")
    p.add_argument("--methods", default="all", help="comma-separated specs and presets (all, baselines, open, sparse)")
    p.add_argument("--limit", type=int, default=None, help="the first N questions (file order)")
    p.add_argument("--seed", type=int, default=0, help="seeds torch/random and the bootstrap")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--fuse", action="store_true", help="CUDA: the gist engine's model through Liger's fused norm, "
                   "rotary and SiLU-gate kernels (gsa_rag.fused; pip install 'gsa-rag[fast]')")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--model", default=None, help="HF id, local dir or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default="default",
                   help="a gist adapter directory; 'default': the bundled trained adapter of the default model "
                        "if this install has one; 'none': the base model alone")
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/rag_eval/<set>-...json)")
    p.add_argument("--fresh", action="store_true", help="start the results file over instead of resuming it")
    p.add_argument("--retrieval-dir", default=str(RESULTS / "retrieval"), help="where vector rankings are cached")
    p.add_argument("--corpus", default=None, help="corpus JSONL for source=corpus (default: $GSA_RAG_DATA/corpus/...)")
    p.add_argument("--embed-device", default="cpu", help="device of the retrieval embedder")
    p.add_argument("--prepare-retrieval", action="store_true", help="only fill the vector rankings cache, then exit")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list-methods", action="store_true")
    return p.parse_args(argv)


def expand_methods(text: str) -> list[str]:
    specs: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        for spec in PRESETS.get(item, [item] if item else []):
            canonical = parse_spec(spec).spec
            if canonical not in specs:
                specs.append(canonical)
    return specs


def data_tag(data: str, split: str) -> str:
    """A short file-name-safe name for the set: "nq", "hf_nq_open", or "<folder>-<file>" for a path."""
    if data in KNOWN_SETS:
        return data
    if data.startswith(HF_PREFIX):
        return "hf_" + data[len(HF_PREFIX) :]
    path = Path(data)
    return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem


def resolve_adapter(args) -> str | None:
    if args.adapter == "none":
        return None
    if args.adapter == "default":
        if args.model is not None:
            return None
        try:
            from gsa_rag.adapters import bundled_default_adapter
        except ImportError:
            return None
        found = bundled_default_adapter()
        return str(found) if found is not None else None
    if not Path(args.adapter).is_dir():
        raise SystemExit(f"rag_eval: --adapter {args.adapter!r} is not a directory")
    return str(Path(args.adapter).resolve())


def load_engine(args, adapter: str | None, dtype) -> GistEngine:
    # config None: the adapter's trained one, as main reads it into ctx.trained (each method runs its
    # own, gist_config(ctx), which starts from that)
    kwargs = {"config": None, "device": args.device, "dtype": dtype}
    if getattr(args, "fuse", False):
        kwargs["fuse"] = True
    if "adapter" in inspect.signature(GistEngine.from_pretrained).parameters:
        kwargs["adapter"] = adapter
    elif adapter is not None:
        raise SystemExit("rag_eval: this gsa-rag's GistEngine.from_pretrained takes no `adapter`; "
                         "adapters need the training issue's code (gsa_rag.adapters)")
    return GistEngine.from_pretrained(args.model, **kwargs)


def warn_untrained_layouts(specs: list[str], ctx: RunContext, trained: str | Path) -> None:
    """Warns for each gist method whose layout (chunk size, hierarchy, sink, ...) is not the one
    the model was trained with (`trained`: its adapter or `--full` folder): a legitimate
    experiment, but one to run knowingly. A method takes every field its spec does not set from
    ctx.trained, so only what the spec sets can warn. Quest has chunks but no gists: it is not checked."""
    for spec in specs:
        method = parse_spec(spec)
        if method.name in ("gsa", "gist-only"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                warn_if_untrained_layout(trained, method.gist_config(ctx))
            for warning in caught:
                print(f"rag_eval: warning: --methods {spec}: {warning.message}", file=sys.stderr)


def run_key(args, examples, adapter, dtype_name: str, trained: GistConfig | None) -> dict:
    """What a resumed results file must share with this run: the questions (ids_sha, which reports
    also merge runs by), their answers and passages (content_sha), and the settings that change
    answers or timings, the trained config included (gist methods take the fields their spec does
    not set from it: the same spec over another trained config is another run)."""
    ids = hashlib.sha256("\n".join(f"{ex.id}\x00{ex.question}" for ex in examples).encode()).hexdigest()[:16]
    content = json.dumps([[ex.answers, [[p.title, p.text, p.is_gold] for p in ex.passages]] for ex in examples])
    return {"data": args.data, "split": args.split, "ids_sha": ids, "n": len(examples),
            "content_sha": hashlib.sha256(content.encode()).hexdigest()[:16],
            "model": args.model or "default", "adapter": adapter, "dtype": dtype_name,
            "max_new_tokens": args.max_new_tokens, "seed": args.seed, "batch_size": args.batch_size,
            "device": args.device, "corpus": args.corpus, "fuse": bool(getattr(args, "fuse", False)),
            # as JSON has it (meta_chunks a list), so that a resumed file's key compares equal; absent
            # where the gist methods run the library's defaults, as files written before this field did
            **({} if trained is None or trained == GistConfig() else
               {"gist_config": json.loads(json.dumps(trained.to_dict()))})}


def load_previous(path: Path, key: dict, fresh: bool) -> dict | None:
    if fresh or not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        previous = None
    if not isinstance(previous, dict) or previous.get("kind") != "rag_eval":
        raise SystemExit(f"rag_eval: {path} is not a rag_eval results file; pass --out for another file "
                         "(nothing was overwritten)")
    if previous.get("format_version") != FORMAT_VERSION or previous.get("run_key") != key:
        raise SystemExit(f"rag_eval: {path} holds a different run ({previous.get('run_key')}); "
                         "pass --fresh to replace it or --out for another file")
    return previous


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.list_methods:
        for name, cls in sorted(available().items()):
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            defaults = parse_spec(name).options()
            print(f"{doc}\n    options (defaults): {', '.join(f'{k}={v!r}' for k, v in defaults.items()) or 'none'}")
        print("presets: " + "; ".join(f"{k} = {','.join(v)}" for k, v in PRESETS.items()))
        return None
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    specs = expand_methods(args.methods)
    examples = load_examples(args.data, split=args.split, limit=args.limit)
    if not examples:
        raise SystemExit(f"rag_eval: no questions in {args.data}")
    tag = data_tag(args.data, args.split)
    adapter = resolve_adapter(args)
    # the adapter, or a `train --full` model folder: its config is what from_pretrained(config=None) runs
    trained = trained_manifest_dir(args.model, adapter)
    ctx = RunContext(data=tag, num_layers=0, retrieval_dir=args.retrieval_dir, embed_device=args.embed_device,
                     load_corpus=lambda: load_corpus(args.corpus),
                     trained=adapter_config(trained) if trained is not None else None)
    for spec in specs:  # every method's settings checked now, not when its turn comes after the others ran
        try:
            parse_spec(spec).gist_config(ctx)
        except ValueError as error:
            raise SystemExit(f"rag_eval: --methods {spec}: {error}") from None

    if args.prepare_retrieval:
        for spec in specs:
            method = parse_spec(spec)
            if method.name == "vector":
                method.setup(examples, ctx)
                print(f"cached {method.label} for {len(examples)} questions of {tag}")
        return None

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = str(device)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    dtype_name = args.dtype if dtype is not None else ("bfloat16" if device.type == "cuda" else "float32")
    if trained is not None:
        warn_untrained_layouts(specs, ctx, trained)
    key = run_key(args, examples, adapter, dtype_name, ctx.trained)
    run_tag = Path(adapter).name if adapter else "vanilla"
    n_tag = f"{args.split}{len(examples)}"
    out = Path(args.out) if args.out else RESULTS / f"{tag}-{n_tag}-{run_tag}-{device.type}.json"
    previous = load_previous(out, key, args.fresh)

    engine = load_engine(args, adapter, dtype)
    text_config = engine.model.config.get_text_config() if hasattr(engine.model.config, "get_text_config") \
        else engine.model.config
    ctx.num_layers = text_config.num_hidden_layers
    settings = RunSettings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed)
    result = previous or {
        "kind": "rag_eval",
        "format_version": FORMAT_VERSION,
        "run_key": key,
        "run": {**key, "data_tag": tag,
                "model": args.model or "SmolLM2-135M-Instruct", "model_type": text_config.model_type},
        "environment": environment(device),
        "command": " ".join(["python", "benchmarks/rag_eval.py", *(sys.argv[1:] if argv is None else argv)]),
        "questions": [{"id": ex.id, "question": ex.question, "answers": ex.answers} for ex in examples],
        "methods": [],
    }
    done = {m["spec"] for m in result["methods"]}
    for spec in specs:
        if spec in done:
            print(f"{spec}: already in {out}, skipped (--fresh to redo)")
            continue
        method = parse_spec(spec)
        torch.manual_seed(args.seed)
        result["methods"].append(run_method(engine, method, examples, ctx, settings))
        write_json(out, result)

    print()
    print(markdown_table(result, out.name))
    print(f"\nwrote {out}")
    if not args.no_plots:
        for plot, suffix in ((plot_budget, "budget"), (plot_compression, "compression")):
            print(f"wrote {plot(result, out.with_suffix(f'.{suffix}.png'))}")
    return result


if __name__ == "__main__":
    main()
