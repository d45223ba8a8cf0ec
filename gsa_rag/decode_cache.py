"""DecodeCache: a KV cache whose decode step writes one column instead of copying the layer.

transformers' `DynamicCache` appends by `torch.cat` of the whole layer KV with the new token,
so every decode step copies O(T) bytes per layer — far more than the sparse attention reads
(issue #6: at 32K context the copy, not the attention, set the decode speed). Here each layer
keeps a preallocated buffer `[B, Hkv, capacity, D]` with spare columns: an update writes the
new columns into it and returns the views `buffer[:, :, :length]`; when it is full the buffer
doubles (one copy of L columns per doubling, so O(1) bytes per appended token amortised).

`reserve` sizes the first buffer as `first update + reserve` columns: the engine passes its
`max_new_tokens`, so a whole generation never reallocates (and never holds more than it needs).

The views are what the attention function and the Triton kernels receive: not contiguous in
the batch and head dims (their strides span `capacity`), which both handle — SDPA takes any
strides and the kernels are launched with the tensors' own strides. A view returned at length L
keeps its values while tokens are appended (they go to columns >= L); only cropping and then
appending overwrites columns, as it does for a StaticCache.

Example:
    >>> cache = DecodeCache(reserve=64)
    >>> out = model(input_ids=ids, use_cache=True, past_key_values=cache)   # or cache=cache
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """One layer's KV in a buffer with spare capacity (see the module docstring).

    `keys` / `values` stay what `DynamicLayer` code expects (the cached `[B, Hkv, L, D]`
    tensors), here as views of `key_buffer` / `value_buffer`. Anything that replaces them with
    other tensors (`DynamicLayer.crop` keeps views; `batch_select_indices`, `reorder_cache`,
    offloading make new ones) is adopted at the next update by copying into a new buffer.

    Args:
        reserve: spare columns allocated past the first update (and past any adopted length).
    """

    def __init__(self, reserve: int = 0, **kwargs):
        super().__init__(**kwargs)
        if reserve < 0:
            raise ValueError(f"reserve must be >= 0, got {reserve}")
        self.reserve = reserve
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.column: torch.Tensor | None = None  # pinned: see `pin_columns`

    @property
    def capacity(self) -> int:
        """Columns the buffers hold before the next reallocation (0 before the first update)."""
        return 0 if self.key_buffer is None else self.key_buffer.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def adopt(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        """Takes over buffers `[B, Hkv, capacity, D]` filled elsewhere (no copy): their first
        `length` columns are the cached KV, the rest is room for later updates (gist memory
        assembles a question's KV in place and leaves room for the answer: gsa_rag.cache)."""
        if not 0 <= length <= key_buffer.shape[-2] or key_buffer.shape != value_buffer.shape:
            raise ValueError(f"cannot adopt {length} columns of buffers {tuple(key_buffer.shape)}, {tuple(value_buffer.shape)}")
        # what lazy_initialization records, without the two empty tensors it makes on the device
        # (a question adopts a pair per layer); dtype for the transformers versions that keep it
        self.dtype, self.device, self.is_initialized = key_buffer.dtype, key_buffer.device, True
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.keys, self.values = key_buffer[:, :, :length], value_buffer[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends `[B, Hkv, n, D]` keys and values; returns the `[B, Hkv, L + n, D]` views.
        Between `pin_columns` and `unpin`: writes them at the pinned column, returns the pinned views."""
        if self.column is not None:
            self.key_buffer.index_copy_(2, self.column, key_states)
            self.value_buffer.index_copy_(2, self.column, value_states)
            return self.keys, self.values
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        new_length = length + key_states.shape[-2]
        if not (self._holds(self.keys, self.key_buffer, key_states) and self._holds(self.values, self.value_buffer, value_states)
                and new_length <= self.capacity):
            # doubling the length keeps appends O(1) amortised; the reserve sizes the first buffer
            self._reallocate(key_states, value_states, length, max(new_length + self.reserve, 2 * length))
        self.key_buffer[:, :, length:new_length].copy_(key_states)
        self.value_buffer[:, :, length:new_length].copy_(value_states)
        self.keys = self.key_buffer[:, :, :new_length]
        self.values = self.value_buffer[:, :, :new_length]
        return self.keys, self.values

    @staticmethod
    def _holds(view: torch.Tensor, buffer: torch.Tensor | None, new: torch.Tensor) -> bool:
        """Whether `view` is still a leading slice of `buffer` that `new` columns can extend."""
        return (
            buffer is not None and view.dim() == 4 and view.data_ptr() == buffer.data_ptr()
            and view.stride() == buffer.stride() and view.shape[:2] == buffer.shape[:2]
            and view.shape[-1] == buffer.shape[-1] and new.shape[:2] == buffer.shape[:2]
            and new.shape[-1] == buffer.shape[-1] and new.dtype == buffer.dtype and new.device == buffer.device
        )

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, capacity: int) -> None:
        """New buffers of `capacity` columns holding the first `length` cached columns."""
        buffers = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty(*new.shape[:2], capacity, new.shape[-1])
            if length:
                buffer[:, :, :length].copy_(old)
            buffers.append(buffer)
        self.key_buffer, self.value_buffer = buffers

    def pin_columns(self, column: torch.Tensor, width: int) -> None:
        """Until `unpin`, every update writes its one column at `column` (a long [1] tensor on the
        buffers' device, which the caller advances) and returns the same `[B, Hkv, width, D]` views:
        no host value changes from step to step, so a CUDA graph of a decode step replays
        (`gsa_rag.graph_decode`). The columns not written yet are zeroed (buffers are allocated
        uninitialised: a masked attention's zero weight times a NaN there would still be NaN)."""
        if not self._holds(self.keys, self.key_buffer, self.keys) or width > self.capacity:
            raise ValueError(f"cannot pin {width} columns of a layer holding {self.capacity} "
                             "(make the cache with reserve >= the steps to decode)")
        length = self.get_seq_length()
        with torch.inference_mode(self.key_buffer.is_inference()):  # the engine fills its cache in inference mode
            self.key_buffer[:, :, length:width].zero_()
            self.value_buffer[:, :, length:width].zero_()
        self.column = column
        self.keys, self.values = self.key_buffer[:, :, :width], self.value_buffer[:, :, :width]

    def unpin(self, length: int) -> None:
        """Back to appending, with the first `length` columns as the cached KV."""
        self.column = None
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        self.column = None
        super().reset()


class DecodeCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s: the same `update` results, no whole-layer copy per step.

    Args:
        reserve: spare columns per layer past the first update (the engine: max_new_tokens);
            past them the buffers double.
    """

    def __init__(self, reserve: int = 0):
        # DynamicCache.__init__ would replicate DynamicLayer; the layers are still made lazily,
        # one per layer index on its first update, as there
        Cache.__init__(self, layer_class_to_replicate=partial(GrowingLayer, reserve=reserve))
        self.reserve = reserve

    def pinnable(self) -> bool:
        """Whether every layer is a filled GrowingLayer whose views are still of its buffers."""
        return bool(self.layers) and all(
            isinstance(layer, GrowingLayer) and layer.is_initialized and layer.key_buffer is not None
            and layer._holds(layer.keys, layer.key_buffer, layer.keys)
            and layer._holds(layer.values, layer.value_buffer, layer.values) for layer in self.layers)

    def pin_columns(self, column: torch.Tensor, width: int) -> None:
        """`GrowingLayer.pin_columns` on every layer, or on none (all must be `pinnable` and hold
        `width` columns)."""
        if not self.pinnable():
            raise ValueError("pin_columns needs a DecodeCache whose every layer holds the prefill in its buffers")
        if width > min(layer.capacity for layer in self.layers):
            raise ValueError(f"cannot pin {width} columns of layers holding {min(layer.capacity for layer in self.layers)} "
                             "(make the cache with reserve >= the steps to decode)")
        for layer in self.layers:
            layer.pin_columns(column, width)

    def unpin(self, length: int) -> None:
        """`GrowingLayer.unpin` on every layer: the first `length` columns are the cached KV."""
        for layer in self.layers:
            layer.unpin(length)
