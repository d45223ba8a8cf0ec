"""Prefill under the forgetting (gist) mask: FlexAttention with a BlockMask, keys optionally
permuted so that the recall columns (sink, gists, link tokens) are contiguous.

Why permute: in natural order a raw query sees its own and the previous chunk (a band along
the diagonal) plus every earlier gist, one column in c+1. Every key block left of the
diagonal then holds some visible gist columns, so the BlockMask is as full as the causal one
and FlexAttention computes (and masks) nearly all of T^2/2. With the recall columns moved to
the front, a query block needs the recall blocks before it (about T/(c+1) columns) and the
one or two raw blocks around its position: about (T/(c+1)) * T/2 + 2 * block * T pairs.
Attention is invariant to the order of keys (with values moved alike), and the rule is
evaluated on the original column (`perm[kv]`), so the output is the same function.

Reference: the dense mask (`gsa_rag.masks.dense_gist_mask`) and SDPA.

Shapes: query [B, Hq, T, D], key/value [B, Hkv, T, D]; the whole layout is prefilled
(queries are columns 0..T-1). Output [B, Hq, T, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gsa_rag.layout import GistLayout
from gsa_rag.masks import dense_gist_mask, visible

_compiled_flex = None


def _flex():
    """flex_attention, compiled once on CUDA (eager FlexAttention is a slow reference path)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def gist_prefill_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: GistLayout,
                     num_previous_chunks: int, scale: float | None = None) -> torch.Tensor:
    """Reference: the dense forgetting mask through SDPA (math), GQA by repetition."""
    mask = dense_gist_mask(layout, num_previous_chunks)[:, None]  # [B, 1, T, T]
    G = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def recall_first_order(layout: GistLayout) -> torch.Tensor:
    """long [B, T]: key columns with the recall columns (sink, gist, link) first, each group in
    column order."""
    recall = layout.is_sink | layout.is_gist | layout.is_link
    T = layout.seq_len
    cols = torch.arange(T, device=recall.device)
    return torch.argsort((~recall).long() * T + cols, dim=-1)


def gist_prefill_block_mask(layout: GistLayout, num_previous_chunks: int, perm: torch.Tensor | None = None,
                            block_size: int = 128):
    """BlockMask of the forgetting rule over keys in `perm` order (natural order when None)."""
    from torch.nn.attention.flex_attention import create_block_mask

    P = num_previous_chunks

    if perm is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return visible(layout, b, q_idx, kv_idx, P, layout.is_gist[b, kv_idx])
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            kv = perm[b, kv_idx]
            return visible(layout, b, q_idx, kv, P, layout.is_gist[b, kv])

    T = layout.seq_len
    return create_block_mask(mask_mod, B=layout.batch_size, H=None, Q_LEN=T, KV_LEN=T,
                             device=layout.input_ids.device, BLOCK_SIZE=block_size)


def gist_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: GistLayout,
                 num_previous_chunks: int, scale: float | None = None, permute: bool = True,
                 block_mask=None, perm: torch.Tensor | None = None, block_size: int = 128) -> torch.Tensor:
    """FlexAttention under the forgetting mask.

    Args:
        query: [B, Hq, T, D]; key, value: [B, Hkv, T, D] (fp32/bf16/fp16).
        layout: the sequence (all T columns are queries).
        permute: move the recall columns to the front (see the module docstring).
        block_mask, perm: a plan from `gist_prefill_block_mask` / `recall_first_order` to reuse
            across layers (built here when None).
        block_size: FlexAttention's block (128 on the GPU; small for CPU tests).

    Returns:
        [B, Hq, T, D] in query's dtype.
    """
    from torch.nn.attention.flex_attention import flex_attention

    if permute:
        perm = recall_first_order(layout) if perm is None else perm
        idx = perm[:, None, :, None].expand(key.shape[0], key.shape[1], -1, key.shape[3])
        key, value = torch.gather(key, 2, idx), torch.gather(value, 2, idx)
    else:
        perm = None
    if block_mask is None:
        block_mask = gist_prefill_block_mask(layout, num_previous_chunks, perm, block_size)
    fn = _flex() if query.is_cuda else flex_attention
    return fn(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
