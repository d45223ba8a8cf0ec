"""Host memory for gist memory's offloaded raw KV: entries packed into a few large blocks.

With `GistMemory(offload=True)` a passage's raw (non-gist) KV stays in host memory and a question
fetches, per layer, the columns its mask unfolds (`GistCache.hook`). Stored one tensor per
passage, that fetch is one gather per passage per layer: on a GPU machine the host-side ops of
50 passages x 30 layers cost more than the copy itself. Here passages share blocks
[L, 2, Hkv, capacity, D] (keys and values of every layer, pinned when CUDA is there, one
registration per block instead of one per passage), so a layer's fetch is one gather per
block the question touches. A block is BLOCK_BYTES: in bf16 about 5,800 raw columns (40 NQ
passages) of SmolLM2-135M, 1,024 of Llama-3-8B.

Blocks are filled in order and never rewritten: a passage's KV is a view of its block. A block
is freed when no stored entry holds a view of it any more (Python reference counting), so
evicted passages leave holes until their block empties; `GistMemory` repacks its entries
(`HostKVStore.repack`) when the blocks they use hold more than twice their bytes plus a block.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

BLOCK_BYTES = 128 << 20  # a block's size (one entry larger than this gets a block of its own)


@dataclass(eq=False)  # compared by identity: == on tensor fields would not give a bool
class HostKV:
    """One entry's raw KV in a block.

    Attributes:
        block: [L, 2, Hkv, capacity, D] on the host; [:, 0] keys, [:, 1] values.
        start: the entry's first column in the block; it holds `length` columns.
    """

    block: torch.Tensor
    start: int
    length: int

    @property
    def keys(self) -> torch.Tensor:
        """[L, Hkv, length, D], a view of the block."""
        return self.block[:, 0, :, self.start : self.start + self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.block[:, 1, :, self.start : self.start + self.length]


class HostKVStore:
    """Packs [L, Hkv, n, D] key and value pairs into host blocks (see the module docstring).

    Args:
        block_bytes: bytes per block (default: the module's BLOCK_BYTES, read when the store is made).
        pin: page-lock the blocks (default: when CUDA is available), so copies to the device
            can be asynchronous.
    """

    def __init__(self, block_bytes: int | None = None, pin: bool | None = None):
        self.block_bytes = int(block_bytes or BLOCK_BYTES)
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self._open: torch.Tensor | None = None  # the block being filled
        self._used = 0
        self._blocks: list[weakref.ref] = []  # every block made, alive while an entry holds it

    def put(self, keys: torch.Tensor, values: torch.Tensor) -> HostKV:
        """Copies keys and values ([L, Hkv, n, D], any device) into a block."""
        if keys.shape != values.shape or keys.dim() != 4:
            raise ValueError(f"keys and values must share one [L, Hkv, n, D] shape, got {tuple(keys.shape)} and {tuple(values.shape)}")
        L, H, n, D = keys.shape
        block = self._open
        fits = (block is not None and block.dtype == keys.dtype and block.shape[:3] == (L, 2, H)
                and block.shape[4] == D and self._used + n <= block.shape[3])
        if not fits:
            per_column = L * 2 * H * D * keys.element_size()
            capacity = max(n, self.block_bytes // max(1, per_column))
            block = self._open = torch.empty(L, 2, H, capacity, D, dtype=keys.dtype, pin_memory=self.pin)
            self._used = 0
            self._blocks.append(weakref.ref(block))
        start = self._used
        block[:, 0, :, start : start + n] = keys
        block[:, 1, :, start : start + n] = values
        self._used += n
        return HostKV(block, start, n)

    @property
    def reserved_bytes(self) -> int:
        """Host bytes of the blocks still alive (entries' KV, holes and unfilled room)."""
        self._blocks = [ref for ref in self._blocks if ref() is not None]
        return _bytes(b for b in (ref() for ref in self._blocks) if b is not None)

    @staticmethod
    def block_bytes_of(stored: list[HostKV]) -> int:
        """Host bytes of the blocks `stored` lives in (each block once)."""
        return _bytes({id(kv.block): kv.block for kv in stored}.values())

    def close_if_unused(self, stored: list[HostKV]) -> None:
        """Stops filling the open block when no entry of `stored` lives in it, so that it is freed
        with the last view of it (otherwise the store itself would keep it, empty, for good)."""
        if self._open is not None and not any(kv.block is self._open for kv in stored):
            self._open, self._used = None, 0

    def repack(self, stored: list[HostKV]) -> list[HostKV]:
        """Copies `stored` into fresh blocks, in order, and returns their new homes; the old
        blocks are freed once the callers drop the old `HostKV`s (and views of them)."""
        self._open, self._used = None, 0
        return [self.put(kv.keys, kv.values) for kv in stored]


def _bytes(blocks) -> int:
    return sum(b.numel() * b.element_size() for b in blocks)
