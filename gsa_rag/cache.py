"""GistCache: a question's KV cache assembled from gist memory, and RoPE re-rotation of cached keys.

A `GistCache` is a transformers `DynamicCache` whose buffers already hold the KV of every
cached column of a layout (prompt prefix, passages) and leave *open slots* for the columns
that still have to run (link tokens, which sit between passages, and the question). The first
forward writes its keys and values into those slots instead of appending; later forwards
(decode steps) append as usual. So the layout keeps its one column order for every room
(masks, selection) and the model runs only the open columns.

Raw KV offload: passages' raw (non-gist) KV may live in host memory (pinned when CUDA is
there). Their columns start as zeros in the device buffers; in every layer, once the attention
function knows the mask, `GistCache.hook` copies to the device the raw columns the mask makes
visible (the chunks the question unfolds and the local windows) that are not there yet,
re-rotating the keys on the way. Masked columns contribute exactly nothing to attention, so
offloaded answers equal device-resident answers.

The device buffers are full length (zeros where nothing was fetched); a compact paged working
set is the kernels' business. What stays on the device *between* questions is only what
GistMemory keeps there: the gist KV.

RoPE re-rotation: a key cached at position p is moved to p + d by rotating it by d
(`k' = k cos(d) + rotate_half(k) sin(d)`, cos/sin from the model's own rotary embedding, so
linear, Llama-3 and YaRN scaling are honoured). This composes exactly only when the rotation
angle is linear in position with fixed frequencies: `KeyRotator` refuses dynamic NTK, LongRoPE
and any rope type it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from gsa_rag.errors import UnsupportedModelError

# rope types whose angle is (fixed inverse frequency) x position: rotations compose exactly
EXACT_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn", "proportional"})


def _rotary_embedding(model) -> torch.nn.Module:
    base = getattr(model, "base_model", model)  # PEFT wrappers
    for candidate in (getattr(base, "model", None), base, getattr(getattr(base, "model", None), "model", None)):
        rotary = getattr(candidate, "rotary_emb", None)
        if isinstance(rotary, torch.nn.Module):
            return rotary
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding module (rotary_emb); gist memory needs RoPE")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KeyRotator:
    """Moves cached keys along the RoPE axis with the model's own rotary embedding.

    Args:
        model: a causal LM with a `rotary_emb` module (Llama, Qwen2, Qwen3, Mistral, ...).

    Raises:
        UnsupportedModelError (a ValueError): the rope type does not compose exactly (dynamic NTK, LongRoPE, per-layer
            or unknown types), or the rotary dimension is not the whole head.
    """

    def __init__(self, model):
        self.rotary = _rotary_embedding(model)
        rope_type = getattr(self.rotary, "rope_type", "default")
        if not isinstance(rope_type, str) or rope_type not in EXACT_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r}: re-rotating cached keys is exact only for fixed-frequency RoPE "
                f"({', '.join(sorted(EXACT_ROPE_TYPES))}); dynamic NTK and LongRoPE change their frequencies "
                "with the sequence length, so cached passage KV cannot be reused with them"
            )
        self.rope_type = rope_type
        self.scaling = float(getattr(self.rotary, "attention_scaling", 1.0) or 1.0)
        self._memo: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # one shift -> (cos, sin)

    def cos_sin(self, shifts: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pure rotations (attention scaling divided out) for integer shifts.

        Args:
            shifts: long [N] (may be negative).

        Returns:
            (cos, sin), float32 [N, D].
        """
        probe = torch.empty(0, dtype=torch.float32, device=device)
        cos, sin = self.rotary(probe, shifts.to(device).view(1, -1))
        return cos[0].float() / self.scaling, sin[0].float() / self.scaling

    def rotate(self, keys: torch.Tensor, shifts: torch.Tensor | int) -> torch.Tensor:
        """Rotates keys [..., N, D] by `shifts` (an int, or long [N] per column); same dtype out."""
        n = keys.shape[-2]
        if isinstance(shifts, int):
            if shifts == 0:
                return keys
            memo_key = (shifts, str(keys.device))
            pair = self._memo.get(memo_key)  # one lookup: another thread may clear the memo in between
            if pair is None:
                pair = self.cos_sin(torch.full((1,), shifts, dtype=torch.long), keys.device)
                if len(self._memo) > 4096:
                    self._memo.clear()
                self._memo[memo_key] = pair
            cos, sin = pair
        elif shifts.numel() != 1 and shifts.numel() != n:
            raise ValueError(f"{shifts.numel()} shifts for {n} keys")
        else:
            cos, sin = self.cos_sin(shifts, keys.device)
        if cos.shape[-1] != keys.shape[-1]:
            raise UnsupportedModelError(f"rotary dim {cos.shape[-1]} != head dim {keys.shape[-1]}: partial RoPE is not supported (gist memory re-rotates whole heads)")
        k = keys.float()
        return (k * cos + rotate_half(k) * sin).to(keys.dtype)


@dataclass
class OffloadedSource:
    """Raw KV of one cached passage kept off the device.

    Attributes:
        columns: long [r], the layout columns of the raw tokens (on the model device).
        keys, values: [L, Hkv, r, D] on the host (pinned when CUDA is there), as cached.
        shift: RoPE shift from the cached positions to the layout's.
    """

    columns: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    shift: int


class GistCache(DynamicCache):
    """A DynamicCache assembled from cached KV, with open slots for the columns still to run.

    Args:
        keys, values: per layer, [1, Hkv, T, D] on the model device: every column of the
            layout; open slots and offloaded raw columns hold zeros.
        pending: long [n], the layout columns the first forward fills (sorted).
        offloaded: raw KV left on the host, fetched per layer on demand.
        rotator: re-rotates fetched keys (needed when `offloaded` is not empty).
    """

    def __init__(self, keys, values, pending: torch.Tensor, offloaded: list[OffloadedSource] = (), rotator=None):
        super().__init__()
        if keys[0].shape[0] != 1:
            raise ValueError("a GistCache holds one question (batch size 1)")
        for layer_idx, (k, v) in enumerate(zip(keys, values, strict=True)):
            DynamicCache.update(self, k, v, layer_idx)
        self.num_layers = len(keys)
        self.pending: torch.Tensor | None = pending if pending.numel() else None
        self._filled: set[int] = set()
        self.offloaded = list(offloaded)
        self.rotator = rotator
        T = keys[0].shape[-2]
        device = keys[0].device
        # per layer: offloaded raw columns not on the device yet
        self._source = torch.full((T,), -1, dtype=torch.long, device=device)
        self._local = torch.zeros(T, dtype=torch.long, device=device)
        for i, src in enumerate(self.offloaded):
            self._source[src.columns] = i
            self._local[src.columns] = torch.arange(len(src.columns), device=device)
        self._missing = [self._source >= 0 for _ in range(self.num_layers)]
        self.fetched_columns = 0  # summed over layers
        self.fetched_bytes = 0
        self.queries: dict[int, torch.Tensor] | None = None  # set to {} to record each layer's queries

    # -- the first forward fills the open slots ------------------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.pending is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if key_states.shape[-2] != len(self.pending):
            raise ValueError(f"the first forward over a GistCache must fill its {len(self.pending)} open slots")
        layer = self.layers[layer_idx]
        layer.keys.index_copy_(2, self.pending, key_states.to(layer.keys.dtype))
        layer.values.index_copy_(2, self.pending, value_states.to(layer.values.dtype))
        self._filled.add(layer_idx)
        if len(self._filled) == self.num_layers:
            self.pending = None
        return layer.keys, layer.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        length = super().get_seq_length(layer_idx)
        return length - len(self.pending) if self.pending is not None else length

    # -- per layer, before attention -----------------------------------------------------------

    def hook(self, layer_idx: int, query, key, value, mask) -> None:
        """GistState hook: fetch the offloaded raw columns that `mask` makes visible."""
        if self.queries is not None:
            self.queries[layer_idx] = query.detach()
        missing = self._missing[layer_idx]
        if not self.offloaded:
            return
        visible = mask.reshape(-1, mask.shape[-1]).any(0)[: len(missing)]  # later columns are never offloaded
        fetch = torch.nonzero(visible & missing).flatten()
        if fetch.numel() == 0:
            return
        layer = self.layers[layer_idx]
        targets = [(layer.keys, layer.values)]
        if key is not layer.keys:
            targets.append((key, value))
        sources = self._source[fetch]
        for i in torch.unique(sources).tolist():
            src = self.offloaded[i]
            cols = fetch[sources == i]
            local = self._local[cols].cpu()
            k = src.keys[layer_idx].index_select(1, local).to(key.device, non_blocking=True)
            v = src.values[layer_idx].index_select(1, local).to(value.device, non_blocking=True)
            k = self.rotator.rotate(k, src.shift)
            for tk, tv in targets:
                tk[0].index_copy_(1, cols, k.to(tk.dtype))
                tv[0].index_copy_(1, cols, v.to(tv.dtype))
            self.fetched_bytes += k.numel() * k.element_size() + v.numel() * v.element_size()
        missing[fetch] = False
        self.fetched_columns += int(fetch.numel())
