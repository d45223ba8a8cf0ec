"""`gsa-rag` command line: demo, ask, eval."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path

from gsa_rag.config import GistConfig


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports anything else as a usage error, status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: give one >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: give a whole number >= 1")
    return value


def _model_arg(text: str) -> str:
    """argparse type for --model: an existing directory / .gguf file, or a Hugging Face model id.

    A value that exists as a path is kept; one that is no path and cannot be a hub id either
    (./dir, /abs/dir, ~/dir, dir/, x.gguf) is refused here, before any weights are loaded.
    """
    path = Path(text).expanduser()
    if path.exists():
        if text.endswith(".gguf") and not path.is_file():
            raise argparse.ArgumentTypeError(f"{text} is not a file: give the path of a .gguf file")
        return text
    looks_like_path = (text.startswith((".", "/", "~")) or text.endswith(("/", os.sep, ".gguf")) or "\\" in text
                       or text.count("/") > 1)
    if not looks_like_path:
        try:
            from huggingface_hub.utils import validate_repo_id

            validate_repo_id(text)
        except ImportError:  # let transformers judge it
            pass
        except ValueError:  # HFValidationError
            looks_like_path = True
    if looks_like_path:
        raise argparse.ArgumentTypeError(
            f"{text}: no such file or directory: give an existing model directory, a .gguf file, "
            "or a Hugging Face id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct); leave --model out for the default model")
    return text


def _device_arg(text: str) -> str:
    """argparse type for --device: a torch device that this machine has (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine: "
                                             "use --device cpu (or leave --device out)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s): "
                                             f"use cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine: use --device cpu")
    return text


def _check_out_path(out: str) -> None:
    """Refuses an --out that cannot be written, before the evaluation runs (never overwrites)."""
    path = Path(out).expanduser()
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"--out {out} already exists and results are never overwritten: "
                              "pick another path or delete that file")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {parent} does not exist: create it first or pick another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: folder {parent} is not writable: pick another path")


def _check_data(args) -> list | None:
    """Reads a local data set before the model loads: a missing file, a bad line or no examples
    at all fail now, not after minutes of loading (public hf: sets are read and checked by
    `evaluate`). Returns the examples (None for an hf: set), for `evaluate` to use."""
    from gsa_rag.eval.data import HF_PREFIX, load_examples

    if str(args.data).startswith(HF_PREFIX):
        return None
    examples = load_examples(args.data, split=args.split, limit=args.limit)
    if not examples:
        raise ValueError(f"{args.data} ({args.split}) holds no examples: give a JSONL file with at least one")
    return examples


def _add_hierarchy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--meta-chunks", type=int, nargs="+", default=None, metavar="N",
                   help="H-GSA: gists per <mgist>, one number per level above the first (--chunk-size 8 "
                        "--meta-chunks 4 is 32x); 0 = single level")
    p.add_argument("--chunk", type=int, nargs="+", default=None, metavar="N",
                   help="every level at once: raw tokens per gist, then gists per <mgist> per level (--chunk 8 4)")
    p.add_argument("--levels", type=int, default=None,
                   help="gist levels (1 + the number of meta-chunk sizes); checks the layout the run uses: "
                        "the adapter's, with --chunk / --meta-chunks over it")
    p.add_argument("--section-top-k", type=int, default=None, metavar="K",
                   help="H-GSA: sections each query head keeps above the chunks (default: the adapter's, else "
                        "--top-k; 0: --top-k); a wider beam scores more gists but unfolds no more raw tokens")


def _gist_overrides(args) -> dict:
    """The GistConfig fields given on the command line (None: not given, the adapter's or default).

    `--chunk 8 4` is `--chunk-size 8 --meta-chunks 4`; `--meta-chunks 0` turns the hierarchy off.
    `--section-top-k 0` sets it back to top_k (None), as does turning the hierarchy or fixed k off
    when the command does not name it (an adapter's saved beam would then be refused).
    """
    given = {"chunk_size": args.chunk_size, "top_k": args.top_k, "k_policy": args.k_policy, "sink": args.sink,
             "section_top_k": args.section_top_k, "score_dtype": getattr(args, "score_dtype", None)}
    meta = args.meta_chunks
    if args.chunk is not None:
        if args.chunk_size is not None or meta is not None:
            raise ValueError("--chunk gives every level: use it instead of --chunk-size / --meta-chunks, not with them")
        given["chunk_size"], meta = args.chunk[0], args.chunk[1:]
    if meta is not None:
        given["meta_chunks"] = () if list(meta) == [0] else tuple(meta)
    overrides = {k: v for k, v in given.items() if v is not None}
    beam_off = overrides.get("meta_chunks") == () or overrides.get("k_policy", "fixed") != "fixed"
    if args.section_top_k == 0 or (args.section_top_k is None and beam_off):
        overrides["section_top_k"] = None
    return overrides


def _check_levels(levels: int | None, config: GistConfig, trained_in: str | Path | None) -> None:
    """--levels only checks: the layout the run uses, the trained one with the command's overrides,
    must have that many levels (checked before any weights load)."""
    if levels is None or levels == config.levels:
        return
    source = f"the layout trained in {trained_in}" if trained_in is not None else "the default layout"
    sizes = " ".join(str(n) for n in (config.chunk_size, *config.meta_chunks))
    raise ValueError(f"--levels {levels} but {source}, with this command's options, has {config.levels} level(s) "
                     f"(--chunk {sizes}): give one size per level with --chunk (--chunk 8 4 for two levels), "
                     "or drop --levels")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=_model_arg, default=None,
                   help="HF id, local dir or .gguf path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="raw tokens per gist; 0 = no gists (full attention); default: the adapter's, else 8")
    _add_hierarchy_args(p)
    p.add_argument("--top-k", type=int, default=None, help="chunks each query head unfolds (default 4)")
    p.add_argument("--k-policy", choices=["fixed", "adaptive", "top_p"], default=None)
    p.add_argument("--sink", type=int, default=None)
    p.add_argument("--score-dtype", choices=["cache", "int8"], default=None,
                   help="the gist keys scoring reads: as cached (default) or an int8 copy, half the bytes a "
                        "decode step scores (picks may differ at near-ties; single-level only)")
    p.add_argument("--device", type=_device_arg, default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="the answer's token budget (>= 1)")
    p.add_argument("--adapter", default="default",
                   help="gist adapter dir; 'default': the bundled one (default model only); 'none': no adapter")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="CUDA: decode step by step instead of replaying one captured CUDA graph per step "
                        "(gsa_rag.graph_decode; the default wherever it can run)")
    p.add_argument("--fuse", action="store_true",
                   help="CUDA: the model's norms, rotary and SiLU gates through Liger's fused kernels "
                        "(pip install 'gsa-rag[fast]'; gsa_rag.fused)")


def _engine(args):
    from gsa_rag.adapters import (
        adapter_config,
        bundled_default_adapter,
        trained_manifest_dir,
    )
    from gsa_rag.engine import GistEngine

    # a folder is expanded here, so that what is printed and reported names the folder read
    adapter = {"none": None, "default": bundled_default_adapter() if args.model is None else None}.get(
        args.adapter, str(Path(args.adapter).expanduser()))
    manifest_dir = trained_manifest_dir(args.model, adapter)  # a --full run's model folder holds one too
    trained = adapter_config(manifest_dir).to_dict() if manifest_dir is not None else {}
    # the adapter fixes the layout it was trained with unless the command overrides it
    config = GistConfig(**{**GistConfig().to_dict(), **trained, **_gist_overrides(args)})
    _check_levels(args.levels, config, manifest_dir)
    engine = GistEngine.from_pretrained(args.model, config=config, adapter=adapter, device=args.device, fuse=args.fuse)
    if getattr(args, "no_cuda_graphs", False):
        engine.cuda_graphs = False
    args.adapter_used = str(adapter) if adapter is not None else None
    args.fully_trained = manifest_dir is not None and adapter is None
    return engine


def _demo(args) -> None:
    from gsa_rag import validation

    if args.question is not None:  # given empty is a mistake (an unset shell variable), not "use the demo's"
        validation.check_question(args.question, "--question")
    demo = json.loads(resources.files("gsa_rag").joinpath("data/demo_passages.json").read_text())
    question = args.question or demo["question"]
    engine = _engine(args)
    trained = (f"adapter {args.adapter_used}" if args.adapter_used else
               "fully fine-tuned (gsa-rag train --full)" if args.fully_trained else "no adapter: untrained gists")
    print(f"model: {engine.model.config.model_type}, {engine.config.chunk_size}x gists, top-{engine.config.top_k}, {trained}")
    print(f"question: {question}")
    for p in demo["passages"]:
        print(f"  [{p['title']}] {p['text'][:70]}...")
    print("answer: ", end="", flush=True)
    start = time.perf_counter()
    for piece in engine.stream(question, demo["passages"], max_new_tokens=args.max_new_tokens):
        print(piece, end="", flush=True)
    print(f"\n({time.perf_counter() - start:.1f} s)")


def _ask(args) -> None:
    from gsa_rag import validation

    # the engine refuses these too, but only after the model has loaded
    validation.check_question(args.question)
    passages = validation.check_passage_list(list(args.passage))  # text: refused before torch loads
    engine = _engine(args)
    print(engine.generate(args.question, passages, max_new_tokens=args.max_new_tokens))


def _eval(args) -> None:
    from gsa_rag.eval.run import evaluate

    if args.out:
        _check_out_path(args.out)  # before the run: a finished report must not be lost to a bad path
    examples = _check_data(args)
    engine = _engine(args)
    report = evaluate(engine, args.data, split=args.split, limit=args.limit, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, examples=examples)
    report["summary"]["adapter"] = args.adapter_used
    print(json.dumps(report["summary"], indent=2))
    if args.out:
        out = Path(args.out).expanduser()  # as _check_out_path checked it
        with open(out, "x") as f:  # never overwrite a saved result
            json.dump(report, f, indent=2)
        print(f"wrote {out}")


def _train(args) -> None:
    from gsa_rag.train.loop import TrainArgs, start_config, train

    gist = _gist_overrides(args)
    fields = {k: getattr(args, k) for k in TrainArgs.__dataclass_fields__ if k not in ("gist", "base", "stage")}
    train_args = TrainArgs(stage=args.stage, base=args.model, gist=gist, **fields)
    if args.levels is not None:  # against the layout the run trains with, as train() builds it
        _check_levels(args.levels, start_config(train_args), train_args.init_adapter)
    out = train(train_args)
    print(f"wrote {out}")


def _add_train_parser(sub) -> None:
    from gsa_rag.train.args import TrainArgs  # the options' defaults; no torch

    p = sub.add_parser("train", help="stage 1 (cpt) or stage 2 (sft) training of a gist adapter")
    p.add_argument("stage", choices=["cpt", "sft"])
    p.add_argument("--data", nargs="+", required=True, help="cpt: text or JSONL(text) files; sft: canonical RAG JSONL")
    p.add_argument("--output", required=True, help="adapter directory to write (never overwritten)")
    p.add_argument("--model", type=_model_arg, default=None,
                   help="base model id/dir/.gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--init-adapter", default=None,
                   help="continue from an earlier stage's adapter ('default': the one bundled for the default model)")
    p.add_argument("--chunk-size", type=int, default=None, help="raw tokens per gist (0: train without gists)")
    _add_hierarchy_args(p)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--k-policy", choices=["fixed", "adaptive", "top_p"], default=None)
    p.add_argument("--sink", type=int, default=None)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT/checkpoints")
    p.add_argument("--reuse", action="store_true",
                   help="sft: train the KV-reuse (gist memory) layout: passages encoded independently, "
                        "link tokens after each one")
    p.add_argument("--num-links", type=int, default=None,
                   help="with --reuse: link tokens after each passage (default: all reserved, as GistMemory uses)")
    p.add_argument("--selection-loss", type=float, default=0.0, metavar="WEIGHT",
                   help="sft: add WEIGHT x a listwise loss on the gist scores that pushes the gold passages' "
                        "chunks up (needs is_gold in the data; 0 = answer loss only)")
    p.add_argument("--selection-rows", choices=["last", "tail"], default="last",
                   help="with --selection-loss: score the prompt's last token (default) or every tail row")
    p.add_argument("--selection-target", choices=["any", "all"], default="any",
                   help="with --selection-loss: raise the gold passages' total probability (default) or "
                        "spread it over every gold chunk (the loss of H200 round 2)")
    defaults = TrainArgs(stage="cpt", output="")
    for name in ("lora_r", "lora_alpha", "lr", "steps", "batch_size", "grad_accum", "warmup", "seed", "block_tokens",
                 "tail_tokens", "max_blocks", "max_prompt_tokens", "save_every", "log_every", "max_minutes"):
        value = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value) if value is not None else int, default=value)
    p.set_defaults(run=_train)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gsa-rag", description="Gist Sparse Attention for RAG")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="answer a question over bundled passages with the default model")
    p.add_argument("--question", default=None)
    _add_model_args(p)
    p.set_defaults(run=_demo)

    p = sub.add_parser("ask", help="answer a question over passages given on the command line")
    p.add_argument("question")
    p.add_argument("--passage", action="append", default=[], help="a passage text (repeatable)")
    _add_model_args(p)
    p.set_defaults(run=_ask)

    p = sub.add_parser("eval", help="best-subspan EM on a canonical JSONL set (nq, hotpotqa, ... or a path)")
    p.add_argument("data", help="set name under $GSA_RAG_DATA (nq, hotpotqa, triviaqa, musique) or a JSONL path")
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N examples (N >= 1)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="questions per batch (>= 1)")
    p.add_argument("--out", default=None, help="write the full report as JSON (refuses to overwrite)")
    _add_model_args(p)
    p.set_defaults(run=_eval)

    _add_train_parser(sub)

    args = parser.parse_args(argv)
    if getattr(args, "fuse", False):  # checked before the model loads
        import importlib.util

        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not str(device).startswith("cuda"):
            parser.error(f"--fuse runs Liger's Triton kernels, which need CUDA; the model would run on {device}")
        if importlib.util.find_spec("liger_kernel") is None:
            parser.error("--fuse needs liger-kernel: pip install 'gsa-rag[fast]'")
    try:
        args.run(args)
    except (ValueError, OSError, RuntimeError) as e:  # OSError: FileNotFound / FileExists / Permission, hub errors
        message = " ".join(str(e).split()) if isinstance(e, OSError) else e  # the hub's are several lines
        print(f"gsa-rag: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
