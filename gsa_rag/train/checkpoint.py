"""Resumable training checkpoints as safetensors + JSON (no pickle).

A checkpoint directory holds:
    trainable.safetensors   every parameter with requires_grad, by name
    optimizer.safetensors   AdamW state tensors, keyed "<param name>/<state key>"
    state.json              step, optimizer scalar state and hyper-parameters, scheduler state,
                            the training arguments, and the RNG seeds for the data order
    rng.safetensors         torch CPU (and CUDA) generator states

Writes go to a temporary sibling directory renamed into place, so a crash mid-save leaves the
previous checkpoint intact.

Under FSDP2 parameters and optimizer moments are sharded DTensors: saving gathers each one whole
(every rank must call `save_checkpoint`; only the one with `write=True` writes), and loading
hands every rank its own shard of the saved whole tensor. A checkpoint is therefore the same
files whatever the sharding, and resumes under FSDP or DDP alike; the training loop resumes it
with the process count that wrote it (the example order and the global batch depend on it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_VERSION = 1


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """The full tensor on the CPU (a sharded DTensor is gathered: a collective)."""
    from torch.distributed.tensor import DTensor

    t = t.detach()
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.contiguous().cpu()


def _like(saved: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`saved` (a whole tensor) laid out as `target`: this rank's shard when target is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        return distribute_tensor(saved.to(target.device, target.dtype), target.device_mesh, target.placements)
    return saved.to(target.device, target.dtype)


def save_checkpoint(directory: str | Path, model, optimizer, scheduler, step: int, args: dict, write: bool = True,
                    progress: dict | None = None) -> Path:
    """Writes the checkpoint for `step` under `directory/step-<step>` atomically. `progress`: what
    the loop carries over a resume besides the tensors (JSON: process count, recent losses).

    With sharded (FSDP) parameters every rank calls this (the gathers are collectives) and only
    the one with `write` True touches the disk."""
    directory = Path(directory)
    target = directory / f"step-{step:07d}"
    params = _trainable(model)
    weights = {n: whole_tensor(p) for n, p in params.items()}

    names = {id(p): n for n, p in params.items()}
    tensors, scalars = {}, {}
    for param, state in optimizer.state.items():
        name = names[id(param)]
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{name}/{key}"] = whole_tensor(value)
            else:
                scalars[f"{name}/{key}"] = float(value)
    if not write:
        return target
    tmp = directory / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "trainable.safetensors"))
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "optimizer_scalars": scalars,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "args": args,
        "progress": progress,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = sorted(Path(directory).glob("step-*")) if Path(directory).is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> int:
    """Restores parameters, optimizer, scheduler and RNG; returns the step to continue from."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
    params = _trainable(model)
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        raise ValueError(f"{path}: the checkpoint's trainable parameters do not match this model/adapter setup")
    for name, p in params.items():  # copy_ would broadcast a smaller tensor (another LoRA rank) into p
        if tuple(saved[name].shape) != tuple(p.shape):
            raise ValueError(f"{path}: {name} is {tuple(saved[name].shape)} in the checkpoint, {tuple(p.shape)} here "
                             "(another LoRA rank or model?)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(_like(saved[name], p))

    tensors = load_file(str(path / "optimizer.safetensors"))
    for name, p in params.items():
        entry = {k.split("/", 1)[1]: _like(v, p) for k, v in tensors.items() if k.split("/", 1)[0] == name}
        entry.update({k.split("/", 1)[1]: torch.tensor(v) for k, v in state["optimizer_scalars"].items()
                      if k.split("/", 1)[0] == name})
        if entry:
            optimizer.state[p] = entry
    for group, saved_group in zip(optimizer.param_groups, state["param_groups"]):
        group.update(saved_group)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])
