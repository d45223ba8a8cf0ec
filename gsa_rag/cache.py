"""GistCache: a question's KV cache assembled from gist memory, and RoPE re-rotation of cached keys.

A `GistCache` is a `DecodeCache` (a transformers `DynamicCache` whose layers keep buffers with
spare columns, gsa_rag.decode_cache) whose buffers already hold the KV of every cached column of
a layout (prompt prefix, passages) and leave *open slots* for the columns that still have to run
(link tokens, which sit between passages, and the question). The first forward writes its keys
and values into those slots instead of appending; later forwards (decode steps) append as a
DecodeCache does: into the spare columns past the layout (gist memory leaves room for the answer),
one column per step, where a DynamicCache would copy the whole layer KV every step. So the layout
keeps its one column order for every room (masks, selection) and the model runs only the open
columns.

Raw KV offload: passages' raw (non-gist) KV may live in host memory (pinned when CUDA is
there). Their columns start as zeros in the device buffers; in every layer, once the attention
function knows the mask, `GistCache.hook` copies to the device the raw columns the mask makes
visible (the chunks the question unfolds and the local windows) that are not there yet,
re-rotating the keys on the way. Masked columns contribute exactly nothing to attention, so
offloaded answers equal device-resident answers. A layer's fetch is one device sync (the host
must learn which columns the mask opened), one gather on the host per block of the store the
passages live in (gsa_rag.host_kv; a block holds tens of passages of a small model) into one
(pinned) buffer, one asynchronous copy, one rotation and one index_copy per tensor: the work
grows with the blocks a question touches, not with its passages (on a GPU, per-passage copies,
kernels and gathers made the question path launch-bound; issue #3).

The device buffers are full length (zeros where nothing was fetched); a compact paged working
set is the kernels' business. What stays on the device *between* questions is only what
GistMemory keeps there: the gist KV.

RoPE re-rotation: a key cached at position p is moved to p + d by rotating it by d
(`k' = k cos(d) + rotate_half(k) sin(d)`, cos/sin from the model's own rotary embedding, so
linear, Llama-3 and YaRN scaling are honoured). This composes exactly only when the rotation
angle is linear in position with fixed frequencies: `KeyRotator` refuses dynamic NTK, LongRoPE
and any rope type it does not know. Layers without RoPE (SmolLM3's and Llama 4's NoPE layers,
`config.no_rope_layers[i] == 0`) cache keys that carry no position: they are never rotated
(`KeyRotator.rope_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gsa_rag.decode_cache import DecodeCache
from gsa_rag.errors import UnsupportedModelError
from gsa_rag.host_kv import HostKV
from gsa_rag.kernels.dispatch import to_device
from gsa_rag.models import attention_heads, text_config

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


def rope_layers(config) -> tuple[bool, ...] | None:
    """Per layer, whether it applies RoPE, read as transformers' modeling code reads it
    (SmolLM3, Llama 4, Mistral Large 4: `use_rope = config.no_rope_layers[layer_idx]`, so 0 means
    no RoPE); None when every layer does."""
    flags = getattr(text_config(config), "no_rope_layers", None)
    if not flags:
        return None
    uses = tuple(bool(flag) for flag in flags)
    return None if all(uses) else uses


def partial_rope_message(rotary_dim: int, head_dim: int) -> str:
    return (f"rotary dim {rotary_dim} != head dim {head_dim}: partial RoPE is not supported "
            "(gist memory re-rotates whole heads)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# KeyRotator.table's bound: 32K shifts of float32 cos and sin are 32 MiB at head dim 128
TABLE_MAX_ROWS = 1 << 15


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
        # per layer, whether its keys carry RoPE (None: all do); NoPE layers' keys are never rotated
        self.rope_layers = rope_layers(model.config)
        self.scaling = float(getattr(self.rotary, "attention_scaling", 1.0) or 1.0)
        self._memo: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # one shift -> (cos, sin)
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> cos_sin of shifts 0..n-1
        head_dim = attention_heads(model.config)[2]
        buffer = next(self.rotary.buffers(), None)
        rotary_dim = self.cos_sin(torch.zeros(1, dtype=torch.long), buffer.device if buffer is not None else "cpu")[0].shape[-1]
        if rotary_dim != head_dim:
            raise UnsupportedModelError(partial_rope_message(rotary_dim, head_dim))

    def uses_rope(self, layer: int) -> bool:
        """Whether layer `layer` applies RoPE (its cached keys are rotated when moved)."""
        return self.rope_layers is None or self.rope_layers[layer]

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

    def table(self, rows: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`cos_sin(arange(n))` for some n >= `rows`, kept per device (grown by doubling), or None
        past TABLE_MAX_ROWS shifts. Row s equals `cos_sin` of shift s exactly (each position's
        rotation is computed on its own), so gist memory reads a question's rotations out of it
        instead of running the rotary embedding for every question."""
        if rows > TABLE_MAX_ROWS:
            return None
        pair = self._tables.get(str(device))  # one lookup: another thread may replace it in between
        if pair is None or pair[0].shape[0] < rows:
            size = min(TABLE_MAX_ROWS, max(1024, 1 << (rows - 1).bit_length()))
            pair = self._tables[str(device)] = self.cos_sin(torch.arange(size), device)
        return pair

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
        return self.apply(keys, cos, sin)

    @staticmethod
    def apply(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotates keys [..., N, D] by (cos, sin) [N or 1, D] from `cos_sin`; same dtype out."""
        if cos.shape[-1] != keys.shape[-1]:
            raise UnsupportedModelError(partial_rope_message(cos.shape[-1], keys.shape[-1]))
        k = keys.float()
        return (k * cos + rotate_half(k) * sin).to(keys.dtype)


@dataclass
class OffloadedSource:
    """Raw KV of one cached passage kept off the device.

    Attributes:
        columns: long [r] (CPU), the layout columns of the raw tokens, ascending.
        home: where its r columns of keys and values are, as cached (a HostKV of gsa_rag.host_kv:
            a host block, pinned when CUDA is there, and the first column in it).
        shift: RoPE shift from the cached positions to the layout's.
    """

    columns: torch.Tensor
    home: HostKV
    shift: int


class GistCache(DecodeCache):
    """A DecodeCache assembled from cached KV, with open slots for the columns still to run.

    Args:
        keys, values: per layer, [1, Hkv, capacity, D] on the model device: the first `length`
            columns are every column of the layout (open slots and offloaded raw columns hold
            zeros), the rest is room for decode steps. The cache takes these tensors over (no copy).
        pending: long [n], the layout columns the first forward fills (sorted); on the host
            preferably (the cache keeps a host copy and moves it to the model device).
        offloaded: raw KV left on the host, fetched per layer on demand, in layout order (the
            columns ascend across sources).
        rotator: re-rotates fetched keys (needed when `offloaded` is not empty).
        length: the layout's columns (default: all of `capacity`, so the first decode step
            reallocates the buffers at double length; GistMemory.prepare leaves room instead).
    """

    def __init__(self, keys, values, pending: torch.Tensor, offloaded: list[OffloadedSource] = (), rotator=None,
                 length: int | None = None):
        super().__init__()  # past the adopted room, the buffers double (DecodeCache's rule)
        if keys[0].shape[0] != 1:
            raise ValueError("a GistCache holds one question (batch size 1)")
        T = keys[0].shape[-2] if length is None else length
        for k, v in zip(keys, values, strict=True):
            layer = self.layer_class_to_replicate()
            layer.adopt(k, v, T)  # update would copy the buffers
            self.layers.append(layer)
        self.num_layers = len(keys)
        self.pending_host: list[int] = pending.tolist()  # host copy (a read of the device here if pending is there)
        pending = to_device(pending, keys[0].device)  # not waiting for the buffers' assembly to finish
        self.pending: torch.Tensor | None = pending if pending.numel() else None
        self._filled: set[int] = set()
        self._opened = (self.pending, T)  # what `reopen` restores
        self.offloaded = list(offloaded)
        self.rotator = rotator
        self.fetched_columns = 0  # summed over layers
        self.fetched_bytes = 0
        self.queries: dict[int, torch.Tensor] | None = None  # set to {} to record each layer's queries
        self.observers: list = []  # observer(layer_idx, mask): each layer's mask, seen by `hook` first
        if self.offloaded:
            self._index_offloaded(T, keys[0].device)

    def _index_offloaded(self, T: int, device: torch.device) -> None:
        """Per-question tables, so that a layer's fetch costs a fixed number of ops whatever the
        number of passages: the host block of every layout column and its column in that block,
        on the host; the source of every column and one (cos, sin) row per source, on the device."""
        columns = torch.cat([src.columns.cpu() for src in self.offloaded])
        if len(columns) > 1 and not bool((columns[1:] > columns[:-1]).all()):
            raise ValueError("offloaded sources must come in layout order (their columns ascending)")
        for src in self.offloaded:
            if len(src.columns) != src.home.length:
                raise ValueError(f"an offloaded source has {len(src.columns)} columns but {src.home.length} stored")
        lengths = torch.tensor([len(src.columns) for src in self.offloaded])
        owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        index: dict[int, int] = {}  # id of a host block -> its place in self._blocks
        self._blocks = []
        for src in self.offloaded:
            if id(src.home.block) not in index:
                index[id(src.home.block)] = len(self._blocks)
                self._blocks.append(src.home.block)
        block_of = torch.tensor([index[id(src.home.block)] for src in self.offloaded])
        start_of = torch.tensor([src.home.start for src in self.offloaded])
        source_host = torch.full((T,), -1, dtype=torch.long)
        source_host[columns] = owner
        self._block_host = torch.zeros(T, dtype=torch.long)
        self._block_host[columns] = block_of[owner]
        self._slot_host = torch.zeros(T, dtype=torch.long)  # the column's place in its block
        self._slot_host[columns] = start_of[owner] + torch.arange(len(columns)) - (torch.cumsum(lengths, 0) - lengths)[owner]
        self._source = source_host.to(device)
        self._missing = (self._source >= 0).expand(self.num_layers, T).clone()  # per layer: not on the device yet
        self._cos, self._sin = self.rotator.cos_sin(torch.tensor([src.shift for src in self.offloaded]), device)
        self._pin = device.type == "cuda"  # a pinned staging buffer makes the copy asynchronous

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

    def reopen(self) -> None:
        """Opens the first forward's slots again, so that the same first forward can run again
        over the same cache and write the same KV (a CUDA graph of it replays; benchmarks re-time
        it). Offloaded raw columns already fetched stay on the device.

        Raises:
            ValueError: a decode step has run since (its columns would be read as the first
                forward's context), or the cache had no open slots.
        """
        pending, length = self._opened
        if pending is None:
            raise ValueError("this GistCache had no open slots: nothing to reopen")
        if super().get_seq_length(0) != length:
            raise ValueError("a decode step has run over this GistCache: reopen only before the first decode step")
        self.pending, self._filled = pending, set()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        length = super().get_seq_length(layer_idx)
        return length - len(self.pending) if self.pending is not None else length

    # -- per layer, before attention -----------------------------------------------------------

    def has_work(self) -> bool:
        """Whether `hook` does anything (offloaded columns to fetch, queries to record, observers,
        or a hook assigned on this cache in its place): the engine leaves it out otherwise, and
        with it each layer's full mask that it reads."""
        return bool(self.offloaded) or self.queries is not None or bool(self.observers) or "hook" in vars(self)

    def hook(self, layer_idx: int, query, key, value, mask) -> None:
        """GistState hook: fetch the offloaded raw columns that `mask` makes visible."""
        for observe in self.observers:
            observe(layer_idx, mask)
        if self.queries is not None:
            self.queries[layer_idx] = query.detach()
        if not self.offloaded:
            return
        missing = self._missing[layer_idx]
        visible = mask.reshape(-1, mask.shape[-1]).any(0)[: missing.shape[0]]  # later columns are never offloaded
        fetch = torch.nonzero(visible & missing).flatten()  # the layer's one sync: the host must know what to send
        if fetch.numel() == 0:
            return
        kv = self._gather(layer_idx, fetch.cpu()).to(fetch.device, non_blocking=True)
        source = self._source[fetch]
        k, v = kv[0], kv[1]
        if self.rotator.uses_rope(layer_idx):  # a NoPE layer's keys carry no position
            k = self.rotator.apply(k, self._cos[source], self._sin[source])
        layer = self.layers[layer_idx]
        targets = [(layer.keys, layer.values)]
        if key is not layer.keys:
            targets.append((key, value))
        for tk, tv in targets:
            tk[0].index_copy_(1, fetch, k.to(tk.dtype))
            tv[0].index_copy_(1, fetch, v.to(tv.dtype))
        missing[fetch] = False
        self.fetched_columns += int(fetch.numel())
        self.fetched_bytes += kv.numel() * kv.element_size()

    def _gather(self, layer_idx: int, fetch: torch.Tensor) -> torch.Tensor:
        """[2, Hkv, n, D] on the host (pinned with CUDA, so one asynchronous copy moves it): the
        layer's keys and values of the offloaded columns `fetch` (ascending, on the host), one
        gather per host block they live in."""
        slot = self._slot_host[fetch]
        _, _, H, _, D = self._blocks[0].shape
        out = torch.empty((2, H, len(fetch), D), dtype=self._blocks[0].dtype, pin_memory=self._pin)
        if len(self._blocks) == 1:
            return torch.index_select(self._blocks[0][layer_idx], 2, slot, out=out)
        which = self._block_host[fetch]
        for i, block in enumerate(self._blocks):
            at = torch.nonzero(which == i).flatten()
            if len(at):
                out.index_copy_(2, at, block[layer_idx].index_select(2, slot[at]))
        return out
