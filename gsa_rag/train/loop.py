"""The training loop shared by both stages: LoRA (PEFT) or full fine-tuning, accelerate for
one or many processes (DDP; FSDP through an accelerate config), resumable checkpoints.

    gsa-rag train cpt --data docs.jsonl --output runs/cpt8 --chunk-size 8
    gsa-rag train sft --data nq/train.jsonl --output runs/sft8 --init-adapter runs/cpt8
    gsa-rag train sft --reuse --data nq/train.jsonl --output runs/sft8-reuse --init-adapter runs/cpt8
    accelerate launch --num_processes 2 -m gsa_rag.cli train sft ...                      # DDP
    accelerate launch --config_file examples/accelerate_fsdp2.yaml -m gsa_rag.cli train sft ...  # FSDP2

Every forward is the inference forward: `model(..., gsa_state=GistState(...))` through the
"gsa" attention function, context rows under the forgetting mask and tail rows unfolding the
chunks they select. Top-k is hard; gradients flow through attention over what was selected.
`train sft --selection-loss W` adds W times a listwise loss on the gist scores themselves,
pushing gold passages' chunks up (gsa_rag.train.selection_loss); W = 0 (the default) is the
plain answer loss, computed exactly as without the option.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from gsa_rag.attention import GistState
from gsa_rag.config import GistConfig
from gsa_rag.generation import check_state_reached
from gsa_rag.train.args import TrainArgs
from gsa_rag.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gsa_rag.train.data import Batch, TrainExample, collate
from gsa_rag.train.selection_loss import (
    ROWS,
    TARGETS,
    ScoreCollector,
    collected_loss,
    eligible_chunk_mask,
    query_rows,
)


def reuse_link_ids(args: TrainArgs, config: GistConfig, tokenizer) -> list[int] | None:
    """The link token ids a `--reuse` run puts after every passage (None: not a reuse run).

    As many as GistMemory uses at inference: `num_links`, by default all of `config.link_tokens`.
    """
    if not args.reuse:
        return None
    if args.stage != "sft":
        raise ValueError("--reuse trains the gist-memory (KV reuse) layout of RAG examples: use it with `train sft`")
    links = config.link_tokens
    n = len(links) if args.num_links is None else args.num_links
    if not 0 <= n <= len(links):
        raise ValueError(f"--num-links must be in 0..{len(links)} (the reserved link tokens), got {n}")
    return [tokenizer.convert_tokens_to_ids(t) for t in links[:n]]


def build_examples(args: TrainArgs, tokenizer, config: GistConfig | None = None) -> list[TrainExample]:
    from gsa_rag.train.data import pack_documents, rag_examples, read_texts

    if not args.data:
        raise ValueError("no training data: pass --data FILE [FILE ...]")
    link_ids = reuse_link_ids(args, config or GistConfig(**args.gist), tokenizer)
    if args.stage == "cpt":
        examples = pack_documents(read_texts(args.data), tokenizer, args.block_tokens, args.tail_tokens, args.max_blocks)
    elif args.stage == "sft":
        examples = rag_examples(args.data, tokenizer, args.max_prompt_tokens, seed=args.seed, link_ids=link_ids)
    else:
        raise ValueError(f"stage must be 'cpt' or 'sft', got {args.stage!r}")
    if not examples:
        raise ValueError(f"the data yielded no {args.stage} examples (too little text for one block?)")
    return examples


def _resolve_init_adapter(args: TrainArgs) -> TrainArgs:
    """`init_adapter="default"` names the adapter bundled for the default model (e.g. a trained 8x
    to continue at H-GSA 32x: README, round 6); the manifest records the path it resolved to."""
    if args.init_adapter != "default":  # a folder: `~` expanded, as --model and --adapter are
        return args if args.init_adapter is None else replace(args, init_adapter=str(Path(args.init_adapter).expanduser()))
    from gsa_rag.adapters import bundled_default_adapter

    bundled = bundled_default_adapter()
    if args.base is not None or bundled is None:
        raise ValueError("--init-adapter default is the adapter bundled for the default model: "
                         + ("drop --model, or name an adapter directory trained on that model"
                            if args.base is not None else "this install carries none; name an adapter directory"))
    return replace(args, init_adapter=str(bundled))


def start_config(args: TrainArgs) -> GistConfig:
    """The gist config a run trains with: stage 2 keeps stage 1's layout (the --init-adapter's
    config), and explicitly given gist options (e.g. top_k) override it."""
    from gsa_rag.adapters import adapter_config

    init_adapter = _resolve_init_adapter(args).init_adapter
    base_config = adapter_config(init_adapter).to_dict() if init_adapter else {}
    config = GistConfig(**{**base_config, **args.gist})
    if config.score_dtype != "cache":  # the adapter would save it, and every later load would score so
        raise ValueError(f"score_dtype {config.score_dtype!r} is an inference option: train with 'cache' "
                         "(the default), and score int8 at inference (--score-dtype int8)")
    return config


# fields that define a run: a resumed run must be given the same ones (the others, such as
# log_every, save_every, max_minutes or gradient_checkpointing, may change between sessions)
_RUN_FIELDS = ("stage", "data", "base", "init_adapter", "gist", "full", "lora_r", "lora_alpha", "lr", "steps",
               "batch_size", "grad_accum", "warmup", "seed", "block_tokens", "tail_tokens", "max_blocks",
               "max_prompt_tokens", "reuse", "num_links", "selection_loss", "selection_rows", "selection_target")


def _check_counts(args: TrainArgs) -> None:
    """Counts that must be positive, refused before the model loads (0 would divide by zero, or
    train nothing and still write an adapter)."""
    for name in ("steps", "batch_size", "grad_accum", "log_every", "lora_r", "lora_alpha", "block_tokens"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name in ("save_every", "warmup", "tail_tokens", "max_prompt_tokens"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if args.max_blocks is not None and (isinstance(args.max_blocks, bool) or args.max_blocks < 1):
        raise ValueError(f"max_blocks must be >= 1 (leave it out for no limit), got {args.max_blocks!r}")
    if isinstance(args.max_minutes, bool) or not isinstance(args.max_minutes, (int, float)) \
            or not math.isfinite(args.max_minutes) or args.max_minutes < 0:
        raise ValueError(f"max_minutes must be a number of minutes >= 0 (0: no limit), got {args.max_minutes!r}")


def _check_output(args: TrainArgs, output: Path) -> None:
    """A new run writes into an empty (or new) folder, so that nothing there is overwritten and no
    other run's checkpoints are picked up later; `resume` continues the run whose checkpoints are
    there, given the same run-defining settings."""
    from gsa_rag.adapters import MANIFEST

    last = latest_checkpoint(output / "checkpoints")
    if (output / MANIFEST).exists():
        stopped = json.loads((output / MANIFEST).read_text()).get("stopped_early")
        if not (args.resume and stopped and last is not None):
            raise FileExistsError(f"{output} already holds a trained adapter; choose another --output (nothing was "
                                  "overwritten)" + (" or add --resume: its run stopped at its time budget" if stopped else ""))
    if not args.resume:
        if output.exists() and any(output.iterdir()):
            raise FileExistsError(f"{output} is not empty: a new run needs an empty or new --output (to continue a run "
                                  "interrupted there, add --resume)")
        return
    if last is None:
        if output.exists() and any(output.iterdir()):
            raise FileExistsError(f"--resume: {output} holds no checkpoint of an interrupted run, and is not empty")
        return
    saved = json.loads((last / "state.json").read_text()).get("args", {})
    given = json.loads(json.dumps(asdict(args), default=str))  # as the checkpoint stored them
    changed = [f"{k}: {saved.get(k)!r} there, {given[k]!r} now" for k in _RUN_FIELDS if saved.get(k) != given[k]]
    if changed:
        raise ValueError(f"--resume: {last} was written with other settings ({'; '.join(changed)}); resume with "
                         "the same ones, or start a new run in another --output")


def _lora_from_init_adapter(args: TrainArgs) -> TrainArgs:
    """With --init-adapter the LoRA rank and alpha are the adapter's: recorded as such in the
    manifest; other values given explicitly are refused (they would be ignored)."""
    if not args.init_adapter or args.full:
        return args
    peft_config = json.loads((Path(args.init_adapter) / "adapter_config.json").read_text())
    r, alpha = peft_config.get("r"), peft_config.get("lora_alpha")
    defaults = TrainArgs(stage=args.stage, output=args.output)
    for name, value, default, kept in (("lora_r", args.lora_r, defaults.lora_r, r),
                                       ("lora_alpha", args.lora_alpha, defaults.lora_alpha, alpha)):
        if value != default and value != kept:
            raise ValueError(f"--{name.replace('_', '-')} {value}: --init-adapter continues {args.init_adapter}, whose "
                             f"LoRA keeps {name} = {kept}; leave the option out")
    return replace(args, lora_r=r, lora_alpha=alpha)


def _wrap_trainable(model, tokenizer, args: TrainArgs, config: GistConfig):
    if args.full:
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if args.init_adapter:
        return PeftModel.from_pretrained(model, args.init_adapter, is_trainable=True)
    token_ids = [tokenizer.convert_tokens_to_ids(t) for t in config.special_tokens]
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules="all-linear",
        trainable_token_indices={"embed_tokens": token_ids},
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def batch_loss(model, batch: Batch, config: GistConfig, selection_weight: float = 0.0,
               selection_rows: str = "last", selection_target: str = "any") -> torch.Tensor:
    """Mean next-token loss of a collated batch through the inference attention path, plus
    `selection_weight` times the selection loss (see `batch_losses`)."""
    return batch_losses(model, batch, config, selection_weight, selection_rows, selection_target)[0]


def batch_losses(model, batch: Batch, config: GistConfig, selection_weight: float = 0.0,
                 selection_rows: str = "last", selection_target: str = "any") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(total, answer, selection) losses of a collated batch.

    answer: the mean next-token loss over the labelled tokens. selection: the listwise gold-chunk
    loss on the gist scores of every selecting layer (gsa_rag.train.selection_loss), None when
    `selection_weight` is 0 — then nothing extra runs and total is the answer loss itself.
    """
    layout = batch.layout
    state = GistState.for_new_tokens(layout, layout.seq_len, config)
    collector = None
    if selection_weight:
        if batch.gold_chunks is None or batch.prompt_end is None:
            raise ValueError("the selection loss needs a batch from train.data.collate (gold chunks, prompt ends)")
        cols, row_valid = query_rows(layout, batch.prompt_end, selection_rows)
        collector = ScoreCollector(layout, cols, config.first_selecting_layer)
        state.hook = collector
    out = model(input_ids=layout.input_ids, position_ids=layout.position_ids, labels=batch.labels,
                gsa_state=state, use_cache=False)
    check_state_reached(model, state)  # else it would train plain causal attention, silently
    if collector is None:
        return out.loss, out.loss, None
    collector.recording = False  # gradient-checkpoint recomputation runs the hook again: keep the first
    if collector.calls == 0:
        raise RuntimeError("the selection loss reads gist scores through GistState.hook, but the attention path "
                           "never called it (an attention kernel that bypasses the hook?)")
    eligible = eligible_chunk_mask(layout, config.num_previous_chunks)
    selection = collected_loss(collector, batch.gold_chunks, eligible, row_valid, selection_target)
    return out.loss + selection_weight * selection, out.loss, selection


def train(args: TrainArgs) -> Path:
    """Runs one stage and writes the adapter (or full model) to `args.output`. Returns its path."""
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    from gsa_rag.adapters import base_fingerprint, check_base
    from gsa_rag.models import load_model

    args = _resolve_init_adapter(args)
    output = Path(args.output).expanduser()  # as --model, --adapter and --init-adapter are
    args = replace(args, output=str(output))
    _check_counts(args)
    if args.full and args.init_adapter:
        raise ValueError("--full trains a whole model: continue from an earlier full run with --base, not --init-adapter")
    if args.reuse and args.stage != "sft":
        raise ValueError("--reuse trains the gist-memory (KV reuse) layout of RAG examples: use it with `train sft`")
    _check_selection_args(args)
    args = _lora_from_init_adapter(args)
    _check_output(args, output)
    config = start_config(args)
    accelerator = Accelerator(
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        gradient_accumulation_steps=args.grad_accum,
        cpu=not torch.cuda.is_available(),
    )
    _check_fsdp(accelerator)
    fsdp = _is_fsdp(accelerator)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.base, gist_config=config, dtype=torch.float32, device=accelerator.device)
    fingerprint = base_fingerprint(model)
    if args.init_adapter:
        check_base(args.init_adapter, fingerprint)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _wrap_trainable(model, tokenizer, args, config)
    model.train()
    if fsdp:
        _fsdp2_shard(model, accelerator)
    examples = build_examples(args, tokenizer, config)
    if args.selection_loss:
        if not config.uses_gists:
            raise ValueError("--selection-loss trains the choice among gists: it needs gists (--chunk-size > 0)")
        if not any(ex.gold for ex in examples):
            raise ValueError("--selection-loss needs gold passages: no training example marks one (`is_gold: true`)")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    # the scheduler stays outside prepare(): accelerate would step it once per process, which
    # makes an N-process run finish its schedule in steps / N
    model, optimizer = accelerator.prepare(model, optimizer)
    # after prepare: FSDP2 replaces every parameter by a sharded DTensor (the optimizer is switched
    # over by accelerate); gradient clipping must see those
    params = [p for p in model.parameters() if p.requires_grad]

    start, progress = 0, {}
    checkpoints = output / "checkpoints"
    if args.resume and (last := latest_checkpoint(checkpoints)) is not None:
        progress = _resumed_progress(last, accelerator.num_processes)
        start = load_checkpoint(last, accelerator.unwrap_model(model), optimizer, scheduler)
        accelerator.print(f"resumed from {last} at step {start}")

    order = _example_order(len(examples), args, accelerator)
    log_path = output / "train_log.jsonl"
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
    bar = tqdm(range(start, args.steps), desc=f"train {args.stage}", disable=not accelerator.is_main_process,
               initial=start, total=args.steps)
    # the last micro-steps' losses, carried over a resume (the logs' windows and the manifest's final loss)
    keep = max(20, args.grad_accum * args.log_every)
    losses: list[float] = progress.get("losses", [])
    parts: list[tuple[float, float]] = [tuple(p) for p in progress.get("parts", [])]  # (answer, selection), --selection-loss
    steps_done, stopped_early = start, False

    def save(step_count: int) -> None:
        # every rank takes part (FSDP gathers sharded tensors); the main process writes
        accelerator.wait_for_everyone()
        save_checkpoint(checkpoints, accelerator.unwrap_model(model), optimizer, scheduler, step_count, asdict(args),
                        write=accelerator.is_main_process,
                        progress={"num_processes": accelerator.num_processes, "losses": losses[-keep:],
                                  "parts": parts[-keep:]})

    tokens, t0 = 0, time.perf_counter()
    for step in bar:
        index = step * args.grad_accum * args.batch_size
        micro_batches = [
            collate([examples[order[(index + m * args.batch_size + i) % len(order)]] for i in range(args.batch_size)],
                    config, tokenizer).to(accelerator.device)
            for m in range(args.grad_accum)
        ]
        # every labelled token of the step weighs the same, however its examples are split into
        # micro-batches and processes: each micro-batch's mean loss is scaled by its share of the
        # step's tokens (times the micro-steps and processes that accumulate() and DDP average over)
        step_tokens = _all_sum(accelerator, sum(label_tokens(b) for b in micro_batches))
        for batch in micro_batches:
            with accelerator.accumulate(model):
                loss, answer_loss, selection_loss = batch_losses(model, batch, config, args.selection_loss,
                                                                 args.selection_rows, args.selection_target)
                share = label_tokens(batch) * args.grad_accum * accelerator.num_processes / max(1, step_tokens)
                objective = answer_loss * share
                if selection_loss is not None:
                    objective = objective + args.selection_loss * selection_loss
                accelerator.backward(objective)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            tokens += int(batch.layout.valid.sum())
            losses.append(loss.item())
            if selection_loss is not None:
                parts.append((answer_loss.item(), selection_loss.item()))
            # their autograd nodes hold the parameters (see the end)
            del loss, answer_loss, selection_loss, objective
        del micro_batches, batch
        steps_done = step + 1
        if accelerator.is_main_process and (steps_done % args.log_every == 0 or steps_done == args.steps):
            window = args.grad_accum * args.log_every
            record = {"step": steps_done, "loss": sum(losses[-window:]) / len(losses[-window:]),
                      "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens * accelerator.num_processes / (time.perf_counter() - t0)}
            if parts:  # with --selection-loss, "loss" is answer + weight * selection
                record["answer_loss"] = sum(a for a, _ in parts[-window:]) / len(parts[-window:])
                record["selection_loss"] = sum(s for _, s in parts[-window:]) / len(parts[-window:])
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        losses, parts = losses[-keep:], parts[-keep:]
        out_of_time = bool(args.max_minutes) and _all_agree(accelerator, time.perf_counter() - t0 > 60 * args.max_minutes)
        if args.save_every and steps_done % args.save_every == 0 and steps_done < args.steps:
            save(steps_done)
        if out_of_time and steps_done < args.steps:
            # the adapter is written as it stands, and a checkpoint lets --resume finish the run
            accelerator.print(f"time budget of {args.max_minutes} min spent: stopping after step {steps_done}")
            if not (args.save_every and steps_done % args.save_every == 0):
                save(steps_done)
            stopped_early = True
            break

    accelerator.wait_for_everyone()
    # under FSDP the full state dict is gathered by every rank together; otherwise None (the model's own)
    state_dict = _full_state_dict(accelerator.unwrap_model(model)) if fsdp else None
    if accelerator.is_main_process:
        _save_result(accelerator.unwrap_model(model), tokenizer, output, args, config, fingerprint, losses, parts=parts,
                     num_processes=accelerator.num_processes, state_dict=state_dict,
                     parallelism="fsdp2" if fsdp else "ddp" if accelerator.num_processes > 1 else "single",
                     steps_done=steps_done, stopped_early=stopped_early)
    # Every rank leaves together and lets go of the model while its process group and the
    # interpreter are still alive: a sharded model's device mesh holds the group, and a gloo group
    # finalised at interpreter exit, or torn down while a peer still writes, can abort a rank
    # ("terminate called without an active exception", seen once in a 2-process CI run).
    accelerator.wait_for_everyone()
    del params, state_dict
    model, optimizer, scheduler = accelerator.free_memory(model, optimizer, scheduler)
    accelerator.end_training()
    return output


def _check_selection_args(args: TrainArgs) -> None:
    if args.selection_rows not in ROWS:
        raise ValueError(f"--selection-rows must be one of {ROWS}, got {args.selection_rows!r}")
    if args.selection_target not in TARGETS:
        raise ValueError(f"--selection-target must be one of {TARGETS}, got {args.selection_target!r}")
    if not math.isfinite(args.selection_loss) or args.selection_loss < 0:
        raise ValueError(f"--selection-loss is a weight >= 0, got {args.selection_loss}")
    if args.selection_loss and args.stage != "sft":
        raise ValueError("--selection-loss needs RAG examples with gold passages: use it with `train sft`")


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _check_fsdp(accelerator) -> None:
    """FSDP runs as FSDP2 (`fully_shard`: parameters stay named, each a sharded DTensor), which
    checkpoints and adapters handle; FSDP1's flattened parameters are refused up front."""
    if _is_fsdp(accelerator) and not accelerator.is_fsdp2:
        raise ValueError("gsa-rag trains under FSDP version 2 only: set `fsdp_version: 2` in the accelerate config "
                         "(see examples/accelerate_fsdp2.yaml)")


def _fsdp2_shard(model, accelerator) -> None:
    """Shards the (PEFT-wrapped) model with FSDP2 before accelerate sees it: one unit per decoder
    layer, the rest (embedding, final norm, lm_head) in the root unit.

    accelerate's own FSDP2 wrapping puts the input embedding and the lm_head in separate units
    unless `get_input_embeddings().weight is get_output_embeddings().weight`; PEFT's trainable
    tokens wrap both (each wrapper's `.weight` is a fresh tensor), so a tied embedding (SmolLM2)
    would be sharded twice and `fully_shard` fails. In the root unit the tied weight is sharded
    once. accelerate's prepare then keeps the model as it is (it is an FSDPModule already).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    kwargs = {"reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    # resolves the config's layer classes (default: the model's _no_split_modules) while they still
    # have their own names; fully_shard renames them (FSDPLlamaDecoderLayer) and accelerate's
    # second call is then a no-op
    plugin.set_auto_wrap_policy(model)
    layers = set(plugin.transformer_cls_names_to_wrap or getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in layers]
    if not units:
        raise ValueError(f"FSDP: no decoder layers ({sorted(layers)}) found in {type(model).__name__}")
    for module in units:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)


def _full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every entry of the model's state dict whole, on the CPU (sharded DTensors gathered: every
    rank must call this). Keys are the model's own (fully_shard keeps parameter names)."""
    from gsa_rag.train.checkpoint import whole_tensor

    return {name: whole_tensor(t) for name, t in model.state_dict().items()}


def label_tokens(batch: Batch) -> int:
    """The tokens a batch's loss averages over: labelled positions after the next-token shift."""
    return int((batch.labels[:, 1:] != -100).sum())


def _all_sum(accelerator, count: int) -> int:
    value = torch.tensor([count], dtype=torch.long, device=accelerator.device)
    return int(accelerator.reduce(value, reduction="sum").item())


def _resumed_progress(checkpoint: Path, num_processes: int) -> dict:
    """The checkpoint's carried-over losses; refuses another process count (each process reads its
    own slice of the example order, and the global batch is per-process batch x processes)."""
    progress = json.loads((checkpoint / "state.json").read_text()).get("progress") or {}
    saved = progress.get("num_processes", num_processes)
    if saved != num_processes:
        raise ValueError(f"--resume: {checkpoint} was written by {saved} processes, this run has {num_processes}; "
                         f"resume with {saved} (the example order and the global batch depend on it)")
    return progress


def _all_agree(accelerator, flag: bool) -> bool:
    """True on every process if it is true on any (so all ranks stop at the same step)."""
    return _all_sum(accelerator, int(flag)) > 0


def _example_order(n: int, args: TrainArgs, accelerator) -> list[int]:
    """A seeded order over as many epochs as the run needs; each process takes its own slice."""
    needed = args.steps * args.grad_accum * args.batch_size * accelerator.num_processes
    rng = random.Random(args.seed)
    order: list[int] = []
    while len(order) < needed:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += epoch
    return order[accelerator.process_index :: accelerator.num_processes]


def _save_result(model, tokenizer, output: Path, args: TrainArgs, config: GistConfig, fingerprint: str, losses,
                 num_processes: int = 1, state_dict: dict | None = None, parallelism: str = "single",
                 parts: list[tuple[float, float]] | None = None, steps_done: int | None = None,
                 stopped_early: bool = False) -> None:
    """Writes the adapter (or full model). `state_dict`: the gathered full state dict when the
    parameters are sharded (FSDP); None: the model's own."""
    from safetensors.torch import load_file, save_file

    from gsa_rag.adapters import write_manifest

    base = args.base or "default (SmolLM2-135M-Instruct)"
    if args.full:
        model.save_pretrained(output, state_dict=state_dict)
        tokenizer.save_pretrained(output)
    else:
        # the resized embedding is the base's plus mean rows (models.add_gist_tokens), rebuilt
        # at load; only the trained gist/link rows travel, inside PEFT's trainable tokens
        model.save_pretrained(output, save_embedding_layers=False, state_dict=state_dict)
        # bf16 halves the adapter (it must fit the 16 MiB a GPU run can send back)
        weights = output / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(weights)).items()},
                  str(weights))
    tail = losses[-20:]
    # a --reuse adapter was trained for GistMemory with this many link tokens after each passage
    links = config.link_tokens[: len(config.link_tokens) if args.num_links is None else args.num_links]
    kv_reuse = {"num_links": len(links), "link_tokens": list(links)} if args.reuse else None
    extra = {}
    if parts:  # --selection-loss: final_loss is answer + weight * selection; both parts too
        extra = {"final_answer_loss": sum(a for a, _ in parts[-20:]) / len(parts[-20:]),
                 "final_selection_loss": sum(s for _, s in parts[-20:]) / len(parts[-20:])}
    write_manifest(output, base_model=str(base), fingerprint=fingerprint, config=config, stage=args.stage,
                   train_args=asdict(args), final_loss=sum(tail) / max(1, len(tail)), num_processes=num_processes,
                   micro_steps_done=(args.steps if steps_done is None else steps_done) * args.grad_accum,
                   steps_done=args.steps if steps_done is None else steps_done, stopped_early=stopped_early,
                   kv_reuse=kv_reuse, parallelism=parallelism, **extra)
