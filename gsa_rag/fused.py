"""The model's norms, rotary embedding and SiLU gates through Liger's fused Triton kernels.

`GistEngine.from_pretrained(..., fuse=True)` or `fuse_model(model)`; needs a CUDA device and
`pip install "gsa-rag[fast]"` (liger-kernel).

A question over gist memory runs tens of query rows through the model. Its matmuls read the
weights once; much of the rest of a layer is small kernels, each a launch and a pass over
memory: Hugging Face's RMSNorm is eight (cast, square, mean, add, rsqrt, multiply, cast,
scale), its rotary embedding about ten. Liger (linkedin/Liger-Kernel) has one kernel for each:

- every RMSNorm module of the Llama / Qwen / Mistral form (`weight * norm(x)`);
- the MLP's `silu(gate(x)) * up(x)` (the three matmuls stay cuBLAS's);
- `apply_rotary_pos_emb` of the model's modeling module (q and k in one kernel).

Measured on an H200 (Llama-3-8B shapes, a question over 20 passages replayed as a CUDA graph):
11.06 -> 8.56 ms; the same first token.

Before a piece takes over it runs against the code it replaces on random inputs; one that
disagrees (another norm form, another activation) is left alone, and `FusedParts` says what was
fused and what was not. The rotary function is a module global of transformers (the attention's
forward looks it up there), so fusing it serves every model of that family in the process; the
replacement falls back to the original for what Liger does not take (partial rotary, another
layout of q and k, tensors off CUDA) and computes the same values otherwise. `unfuse` puts every
original back (the rotary once the last fused model of its family is unfused). A fused model
deep-copies as it is; save it through its state dict (`save_pretrained`), not by pickling it.
"""

from __future__ import annotations

import sys
import types
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gsa_rag.errors import ConfigError

_ORIGINAL = "_gsa_fused"  # instance attribute: set on a module whose forward fuse_model replaced
# modeling module name -> the models fused with its rotary: unfuse restores the global when the last goes
_ROTARY_USERS: dict[str, weakref.WeakSet] = {}


@dataclass(frozen=True)
class FusedOps:
    """The three fused functions (Liger's by default; tests pass torch ones on the CPU).

    rms_norm(x, weight, eps) -> weight * norm(x) in x's dtype; silu_mul(gate, up);
    rotary(q, k, cos, sin, unsqueeze_dim) -> (q, k) rotated (may write into q and k).
    """

    rms_norm: object
    silu_mul: object
    rotary: object
    devices: tuple[str, ...] = ("cuda",)  # where they run; elsewhere the original code does


def liger_ops() -> FusedOps:
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError as error:
        raise ImportError('fusing needs liger-kernel: pip install "gsa-rag[fast]"') from error

    def rms_norm(x, weight, eps):
        # "llama" casting: x in float32 for the norm, cast back before the weight, as Hugging Face's
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)

    def rotary(q, k, cos, sin, unsqueeze_dim):
        return LigerRopeFunction.apply(q, k, cos, sin, None, unsqueeze_dim)

    return FusedOps(rms_norm, LigerSiLUMulFunction.apply, rotary)


@dataclass
class FusedParts:
    """What `fuse_model` fused: module names, the modeling modules whose rotary it replaced, and
    what it left alone ("name: why")."""

    norms: list[str] = field(default_factory=list)
    mlps: list[str] = field(default_factory=list)
    rotary: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.norms or self.mlps or self.rotary)


def _agrees(got, want) -> bool:
    """Outputs equal up to the rounding a fused kernel may do differently (relative to their size)."""
    pairs = zip(got, want, strict=True) if isinstance(got, tuple) else [(got, want)]
    for a, b in pairs:
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        bound = 1e-5 if a.dtype == torch.float32 else 1e-2
        if float((a.float() - b.float()).norm()) > bound * float(b.float().norm()) + 1e-6:
            return False
    return True


def _draw(shape, like: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _is_rms_norm(module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _is_gated_mlp(module) -> bool:
    return all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def _take_over(module, forward, probe: torch.Tensor) -> str | None:
    """Makes `forward` (a function of the module and its input) the module's forward if it gives
    the module's own output on `probe`; else says why not."""
    if hasattr(module, "_hf_hook") or "forward" in module.__dict__:
        return "its forward is replaced already (an accelerate hook, or another library's patch)"
    with torch.no_grad():
        try:
            agrees = _agrees(forward(module, probe.clone()), module(probe.clone()))
        except Exception as error:  # noqa: BLE001  (a piece it cannot run is left alone, and said so)
            return f"the fused piece does not run here ({type(error).__name__}: {error})"[:200]
    if not agrees:
        return "differs from the module's own output"
    # bound to the module (not a closure over it): a deepcopy of the model binds its copy
    module.forward = types.MethodType(forward, module)
    setattr(module, _ORIGINAL, True)
    return None


def _norm_forward(module, hidden_states):
    ops = module._gsa_fused_ops
    if hidden_states.device.type not in ops.devices:
        return type(module).forward(module, hidden_states)  # moved off the device the kernels run on
    return ops.rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _mlp_forward(module, x):
    ops = module._gsa_fused_ops
    if x.device.type not in ops.devices:
        return type(module).forward(module, x)
    return module.down_proj(ops.silu_mul(module.gate_proj(x), module.up_proj(x)))


def _fuse(module, ops: FusedOps) -> str | None:
    module._gsa_fused_ops = ops
    if _is_rms_norm(module):
        why = _take_over(module, _norm_forward, _draw((1, 5, module.weight.shape[-1]), module.weight, 0))
    else:
        why = _take_over(module, _mlp_forward, _draw((1, 5, module.gate_proj.in_features), module.gate_proj.weight, 1))
    if why:
        del module._gsa_fused_ops
    return why


def _fused_rotary(original, ops: FusedOps):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        if (kwargs or unsqueeze_dim != 1 or q.device.type not in ops.devices or cos.dim() != 3
                or not (cos.shape[-1] == q.shape[-1] == k.shape[-1]) or cos.shape[-1] % 2):
            return original(q, k, cos, sin, unsqueeze_dim, **kwargs)  # partial rotary, other layouts, other devices
        return ops.rotary(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._gsa_original = original
    return apply_rotary_pos_emb


def _fuse_rotary(modeling, head_dim: int, like: torch.Tensor, ops: FusedOps) -> str | None:
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is None:
        return "no apply_rotary_pos_emb in the modeling module"
    fused = _fused_rotary(original, ops)
    q, k = _draw((1, 4, 5, head_dim), like, 2), _draw((1, 2, 5, head_dim), like, 3)
    angle = _draw((1, 5, head_dim // 2), like, 4).float()
    cos, sin = torch.cat([angle, angle], -1).cos().to(like.dtype), torch.cat([angle, angle], -1).sin().to(like.dtype)
    with torch.no_grad():
        try:
            agrees = _agrees(fused(q.clone(), k.clone(), cos, sin), original(q.clone(), k.clone(), cos, sin))
        except Exception as error:  # noqa: BLE001  (another signature, e.g. GPT-J's (x, sin, cos))
            return f"its rotary does not take (q, k, cos, sin) ({type(error).__name__}: {error})"[:200]
    if not agrees:
        return "differs from the modeling module's own rotary"
    modeling.apply_rotary_pos_emb = fused
    return None


def fuse_model(model: torch.nn.Module, ops: FusedOps | None = None) -> FusedParts:
    """Replaces the model's RMSNorms, SiLU-gated MLPs and rotary embedding with fused kernels
    (see the module docstring). Idempotent; `unfuse` undoes it.

    Args:
        model: a Hugging Face causal LM on a CUDA device (Liger's kernels are Triton's).
        ops: the fused functions; default Liger's (`liger_ops`).

    Returns:
        FusedParts: the names of what was fused and why anything was left alone.

    Raises:
        ConfigError: the model is not on a device the ops run on (Liger's: CUDA).
        ImportError: liger-kernel is not installed.
    """
    device = next(model.parameters()).device
    if ops is None:
        if device.type != "cuda":
            raise ConfigError(f"fusing runs Liger's Triton kernels, which need a CUDA device; this model is on {device}")
        ops = liger_ops()
    elif device.type not in ops.devices:
        raise ConfigError(f"these fused ops run on {', '.join(ops.devices)}; this model is on {device}")
    parts = FusedParts()
    rotary_families = {}
    for name, module in model.named_modules():
        if (_is_rms_norm(module) or _is_gated_mlp(module)) and not hasattr(module, _ORIGINAL):  # (fused already)
            why = _fuse(module, ops)
            if why:
                parts.skipped.append(f"{name}: {why}")
            else:
                (parts.norms if _is_rms_norm(module) else parts.mlps).append(name)
        head_dim = getattr(module, "head_dim", None)
        if isinstance(getattr(module, "q_proj", None), torch.nn.Linear) and isinstance(head_dim, int):
            rotary_families.setdefault(type(module).__module__, (head_dim, module.q_proj.weight))
    for modeling_name, (head_dim, weight) in rotary_families.items():
        modeling = sys.modules[modeling_name]
        users = _ROTARY_USERS.setdefault(modeling_name, weakref.WeakSet())
        if model in users:
            continue  # fused already
        if not hasattr(getattr(modeling, "apply_rotary_pos_emb", None), "_gsa_original"):
            why = _fuse_rotary(modeling, head_dim, weight, ops)
            if why:
                parts.skipped.append(f"{modeling_name}: {why}")
                continue
        users.add(model)  # (a global fused for another model of this family serves this one too)
        parts.rotary.append(modeling_name)
    return parts


def unfuse(model: torch.nn.Module) -> None:
    """Puts back every forward `fuse_model` replaced in `model`; and the rotary function of its
    modeling modules once no other fused model of that family uses it."""
    for module in model.modules():
        if module.__dict__.pop(_ORIGINAL, False):
            del module.forward  # the class's own forward shows through again
            del module._gsa_fused_ops
    for modeling_name, users in _ROTARY_USERS.items():
        if model in users:
            users.discard(model)
            modeling = sys.modules[modeling_name]
            fused = getattr(modeling, "apply_rotary_pos_emb", None)
            if not users and hasattr(fused, "_gsa_original"):
                modeling.apply_rotary_pos_emb = fused._gsa_original


def torch_ops() -> FusedOps:
    """The three functions in plain torch (the math the fused kernels do): for tests on the CPU,
    where Liger's kernels do not run."""

    def rms_norm(x, weight, eps):
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rotary(q, k, cos, sin, unsqueeze_dim):
        from gsa_rag.cache import rotate_half

        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    return FusedOps(rms_norm, lambda gate, up: F.silu(gate) * up, rotary, devices=("cpu", "cuda"))
