"""H-GSA's memory: its forward allocates nothing wider than the single-level one's (CPU).

The forgetting mask is built per (query, key) pair: any long tensor over that grid costs 8 bytes
a pair, 1.5 GB for a prefill of 32 prompts of 2.2K columns. On CUDA, advanced indexing with
several index tensors of different strides also makes each of them contiguous at the broadcast
shape; `_Widest` counts those copies, so the CPU sees what the GPU would allocate.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gsa_rag.config import GistConfig
from gsa_rag.generation import SamplingParams, generate_tokens
from gsa_rag.kernels.bench import random_model, synthetic_hier_layout
from gsa_rag.masks import dense_gist_mask


class _Widest(TorchDispatchMode):
    """The most bytes one op allocates: its outputs and, for aten.index with index tensors of
    different broadcast strides, the contiguous copies CUDA makes of them."""

    def __init__(self):
        super().__init__()
        self.bytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        size = sum(t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        if func is torch.ops.aten.index.Tensor:
            index = torch.broadcast_tensors(*(i for i in args[1] if i is not None))
            if len({i.stride() for i in index}) > 1:
                size += sum(i.numel() * i.element_size() for i in index)
        if size > self.bytes:
            self.bytes, self.op = size, func
        return out


def _layout(batch: int, context: int, meta_chunks: tuple[int, ...]):
    return synthetic_hier_layout(batch, context, 8, meta_chunks, tail=12, device="cpu")


@pytest.mark.parametrize("meta_chunks", [(), (4,), (2, 2)], ids=["one-level", "two-levels", "three-levels"])
def test_forgetting_mask_allocates_at_most_a_byte_a_pair(meta_chunks):
    layout = _layout(2, 300, meta_chunks)
    widest = _Widest()
    with widest:
        mask = dense_gist_mask(layout, 1)
    assert widest.bytes <= mask.numel(), (widest.op, widest.bytes / mask.numel())


def test_hierarchical_forward_allocates_no_wider_than_the_single_level_one():
    """Prefill and a decode step (torch path) of the (8, 4) hierarchy against plain 8x GSA: the
    widest allocation, per (query, key) pair of the prefill, within 10%."""
    model = random_model("smollm2-135m", layers=2, device="cpu", dtype=torch.float32, vocab_size=1000)
    per_pair = {}
    for meta_chunks in ((), (4,)):
        layout = _layout(2, 400, meta_chunks)
        config = GistConfig(chunk_size=8, meta_chunks=meta_chunks, sink=4, word_aware=False)
        widest = _Widest()
        with widest:
            for _ in generate_tokens(model, layout, config, SamplingParams(max_new_tokens=2), set()):
                pass
        per_pair[meta_chunks] = (widest.bytes / (layout.batch_size * layout.seq_len**2), widest.op)
    assert per_pair[(4,)][0] <= 1.1 * per_pair[()][0], per_pair
