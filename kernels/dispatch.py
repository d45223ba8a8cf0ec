"""Which path runs: the Triton kernels on CUDA, the torch references elsewhere.

`GSA_RAG_KERNELS` overrides the choice:
    unset / "auto"  kernels on CUDA tensors when Triton imports, references otherwise;
    "0"             references everywhere (the benchmarks' baseline);
    "1"             kernels wherever Triton can run them: CUDA, or CPU tensors under
                    TRITON_INTERPRET=1 (set before gsa_rag.kernels' Triton modules are
                    imported; Triton reads it when a kernel is decorated).

This module imports neither Triton nor the kernel modules at import time: gsa_rag.attention
imports it on every platform.
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache

import torch


def config_patch(config, **settings):
    """`config.patch(**settings)` (a torch config module) for the settings the installed torch
    has; the others are skipped (pyproject allows releases older than some switches)."""
    present = {name: value for name, value in settings.items() if hasattr(config, name)}
    return config.patch(**present) if present else contextlib.nullcontext()


@lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_compat() -> None:
    """Triton <= 3.6's interpreter turns a scalar (a 1-element array there) into an int with
    int(array), which NumPy >= 2.3 refuses, so loops with run-time bounds fail; later Triton
    squeezes the array first. Do the same on the old ones (interpreter only)."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_gsa_squeezed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._gsa_squeezed = True
    interpreter._patch_lang_tensor = patched


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`host.to(device)` that does not wait for the stream: a copy from pageable host memory into a
    CUDA device is ordered after the kernels already queued there, and the host waits for them;
    staged through pinned memory (PyTorch's caching host allocator keeps the block until the copy
    is done) it is queued like a kernel and the host goes on."""
    device = torch.device(device)
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_device_together(hosts: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """`[to_device(t, device) for t in hosts]` in one transfer: on CUDA, the host tensors' bytes are
    packed into one pinned buffer and copied once, and the results are views of that device buffer
    in the tensors' dtypes and shapes. A layout has 15 small tensors, whose copies one by one cost
    the host about 20 us each."""
    device = torch.device(device)
    if device.type != "cuda" or any(t.device.type != "cpu" for t in hosts):
        return [to_device(t, device) for t in hosts]
    packed, starts = pack_bytes(hosts, pin=True)
    moved = packed.to(device, non_blocking=True)  # the caching host allocator keeps `packed` until it is done
    return unpack_bytes(moved, hosts, starts)


def pack_bytes(tensors: list[torch.Tensor], pin: bool = False) -> tuple[torch.Tensor, list[int]]:
    """The tensors' bytes in one uint8 buffer, each starting at a multiple of 8 (so that any dtype
    of up to 8 bytes can be viewed there), and where each starts."""
    flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    starts, total = [], 0
    for b in flat:
        starts.append(total)
        total += -(-len(b) // 8) * 8
    packed = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    for b, start in zip(flat, starts, strict=True):
        packed[start : start + len(b)] = b
    return packed, starts


def unpack_bytes(packed: torch.Tensor, like: list[torch.Tensor], starts: list[int]) -> list[torch.Tensor]:
    """Views of `pack_bytes`' buffer (or a copy of it) as the tensors it packed (`like`: their
    dtypes and shapes)."""
    return [packed[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for t, start in zip(like, starts, strict=True)]


def _kernels_mode() -> str:
    return os.environ.get("GSA_RAG_KERNELS", "auto").strip().lower()


def kernels_off() -> bool:
    """Whether GSA_RAG_KERNELS asks for the references everywhere."""
    return _kernels_mode() in ("0", "false", "off", "ref", "reference")


def use_kernels(device: torch.device) -> bool:
    """Whether tensors on `device` take the Triton path (see the module docstring)."""
    if kernels_off():
        return False
    mode = _kernels_mode()
    if not triton_available():
        return False
    if device.type == "cuda":
        return not interpreting()  # the interpreter wants CPU tensors
    if mode in ("1", "true", "on") and interpreting():
        _interpreter_compat()
        return True
    return False


def head_dim_fits(head_dim: int) -> bool:
    """Whether the kernels take this head dim: a power of two >= 16 (their tl.arange / tl.dot need
    it); e.g. 80, 96 or 100 take the reference path."""
    return head_dim >= 16 and not head_dim & (head_dim - 1)


def sparse_decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            scaling: float | None, state) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The engine's decode step through the key-list kernels, or None to take the dense path.

    Taken when the kernels are on for the device, the forward has one query row, the head dim
    is a power of two >= 16 (the kernels' tl.arange / tl.dot need it; e.g. 80, 96 or 100 take
    the reference path), and `state` is a plain GistState whose query row is a tail token
    (every decode step of the engine). Hierarchical (H-GSA) layouts select coarse to fine
    through kernels/hier_select.py; single-level ones through kernels/gist_select.py.

    Args:
        module: the attention module (layer_idx).
        query: [B, Hq, 1, D]; key, value: [B, Hkv, T, D], the layer's cache.
        scaling: softmax scale.
        state: the GistState of this forward.

    Returns:
        ([B, 1, Hq, D] output, bool [B, H, 1, T] mask or None) — the mask only when the state
        has a hook (gist memory fetches the columns it makes visible); None when not taken.
    """
    from gsa_rag.attention import GistState

    # a plug-in's GistState subclass keeps its own masks; a graph step's state (gsa_rag.graph_decode) is the engine's
    kernel_state = type(state) is GistState or getattr(state, "graph_step", False)
    if query.shape[2] != 1 or not kernel_state or not use_kernels(query.device):
        return None
    if not head_dim_fits(query.shape[-1]):
        return None
    layout = state.layout
    if key.shape[2] != layout.seq_len:
        return None
    if layout.levels > 1 and state.config.k_policy == "adaptive":
        return None  # the hierarchy takes a fixed k per level (GistConfig.level_top_k; it refuses this pair)
    from gsa_rag.kernels.gist_select import DecodePlan, select_index_list
    from gsa_rag.kernels.hier_select import HierPlan, select_hier_index_list
    from gsa_rag.kernels.sparse_decode import sparse_decode_triton

    plan = getattr(state, "_decode_plan", None)
    if plan is None:  # plan-then-run: built by the first layer, reused by the others
        group = query.shape[1] // key.shape[1]
        if getattr(state, "_q_host", None) == range(layout.seq_len - 1, layout.seq_len):
            # a layout grown by append whose plan is cached: its last column is a tail token
            plan = DecodePlan.cached(layout, state.config, group)
        if plan is None:
            # one host sync: the kernels serve a tail token at the last column
            if int(state.q_index[-1]) != layout.seq_len - 1 or not bool(layout.is_tail[:, -1].all()):
                state._decode_plan = False
                return None
            plan = DecodePlan.build(layout, state.config, group)
        if layout.levels > 1:  # H-GSA: the same base and forgetting row, selection level by level
            plan = HierPlan.build(layout, state.config, group, plan)
        state._decode_plan = plan
    if plan is False:
        return None
    q = query[:, :, 0]
    if isinstance(plan, HierPlan):
        index, lengths = select_hier_index_list(q, key, layout, plan, state.config, module.layer_idx)
    else:
        index, lengths = select_index_list(q, key, layout, plan, state.config, module.layer_idx, use_triton=True)
    mask = None
    hook = getattr(state, "hook", None)
    if hook is not None:
        T = key.shape[2]
        live = torch.arange(index.shape[-1], device=index.device) < lengths[..., None]
        cols = torch.where(live, index.long(), T)
        mask = torch.zeros(*index.shape[:2], T + 1, dtype=torch.bool, device=index.device)
        mask.scatter_(2, cols, True)
        mask = mask[..., :T, None].transpose(-1, -2)  # [B, H, 1, T]
        hook(module.layer_idx, query, key, value, mask)
    state.attended[module.layer_idx] = lengths.float()
    out = torch.empty(query.shape[0], 1, query.shape[1], query.shape[3], dtype=query.dtype, device=query.device)
    # every step of a generation splits its lists as the first step did (DecodePlan.grown): a
    # graph step's lists also hold the later steps' columns, and the eager ones grow a column a step
    sparse_decode_triton(q, key, value, index, lengths, scaling, out=out[:, 0],
                         split_width=index.shape[-1] - plan.grown if plan.grown else None)
    return out, mask
