"""Int8 gist keys: what gist scoring reads under `GistConfig(score_dtype="int8")`.

Scoring reads every gist key at every decode step and layer: at chunk 8 and an L/8 budget that is
about 29% of the bytes a step reads (benchmarks/results/kernels/NOTES.md). An int8 copy halves them
(against bf16) and lays the gists out contiguously, so the scores kernel reads rows in order
instead of gathering them from the KV cache.

Quantized per channel: for each (batch row, KV head) and head-dim channel d, scale[d] is the
largest |k[c, d]| over the row's chunks / 127 and values[c, d] = round(k[c, d] / scale[d]). A
per-channel scale follows the few channels that RoPE'd keys concentrate their magnitude in (a
per-row scale would flatten the rest), and it folds into the query: q . k ~= sum_d (q[d] scale[d])
values[c, d], so a kernel multiplies the query once and reads no scale per key. The scaled query
is rounded to the query's dtype (the kernels' tensor-core operand); the reference
(`gsa_rag.selection.int8_gist_scores`) does the same, so both compute the same products and differ
only in the order of their fp32 sums.

A decode step's copy is made once per layer and generation (`gist_keys_of_layer`: appended tail
tokens add no gists, so it stays valid while the answer grows); a forward of several rows (the
question's) quantizes the keys it scores itself, once per layer. Scores, and so the
picks, differ from the cache dtype's where two chunks score within the rounding of each other
(benchmarks/gist_keys8_agreement.py measures how often on the default model).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from gsa_rag.layout import GistLayout

QMAX = 127


@dataclass(frozen=True)
class Int8GistKeys:
    """values: int8 [B, Hkv, C, D], row c the gist key of chunk c (zeros where the chunk does not
    exist); scale: float32 [B, Hkv, D], per channel (1 where every key of the row is 0 there)."""

    values: torch.Tensor
    scale: torch.Tensor


def quantize_gist_keys(key: torch.Tensor, gist_index: torch.Tensor, gist_valid: torch.Tensor) -> Int8GistKeys:
    """The int8 copy of a layer's gist keys.

    Args:
        key: [B, Hkv, T, D] the layer's key cache; gist_index: long [B, C] the gist columns;
        gist_valid: bool [B, C] the chunks that exist.
    """
    B, Hkv, T, D = key.shape
    C = gist_index.shape[1]
    index = gist_index.clamp(0, max(T - 1, 0))[:, None, :, None].expand(B, Hkv, C, D)
    # where, not a product: the columns padding chunks point at may hold anything (NaN * 0 is NaN)
    gists = torch.where(gist_valid[:, None, :, None], torch.gather(key, 2, index).float(), 0.0)
    amax = gists.abs().amax(2) if C else gists.new_zeros(B, Hkv, D)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    values = torch.round(gists / scale[:, :, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return Int8GistKeys(values, scale)


def scaled_query(query: torch.Tensor, keys: Int8GistKeys) -> torch.Tensor:
    """query [B, Hq, Tq, D] times its KV head's channel scales, rounded to the query's dtype
    (as the kernel rounds its tensor-core operand)."""
    B, Hq, Tq, D = query.shape
    Hkv = keys.scale.shape[1]
    scale = keys.scale[:, :, None, None, :]  # [B, Hkv, 1, 1, D] over the group's heads and rows
    rows = query.float().view(B, Hkv, Hq // Hkv, Tq, D) * scale
    return rows.to(query.dtype).view(B, Hq, Tq, D)


def gist_keys_of_layer(layout: GistLayout, layer_idx: int, key: torch.Tensor) -> Int8GistKeys:
    """The int8 copy of this layer's gist keys for a decode step, made at the first step and kept
    in the layout's lineage (the layouts `append` grows share it, and their gist columns): a later
    step reuses it while `key` is a view of the same live tensor (a DecodeCache's buffer). A cache
    that reallocated, HF's DynamicCache (a new tensor at every step) or any other tensor gets a
    fresh copy: the entry holds the tensor weakly, so it never keeps a cache alive, and a new
    tensor at a freed one's address is not taken for it."""
    owner = key if key._base is None else key._base
    lineage = layout.__dict__.get("_lineage")
    entry = None if lineage is None else lineage.get(("gist_keys8", layer_idx))
    if entry is not None and entry[0]() is owner and entry[1] is layout.gist_index:
        return entry[2]
    keys = quantize_gist_keys(key, layout.gist_index, layout.gist_valid)
    if lineage is not None:
        lineage[("gist_keys8", layer_idx)] = (weakref.ref(owner), layout.gist_index, keys)
    return keys
