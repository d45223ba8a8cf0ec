"""The "gsa" attention function, registered with transformers' AttentionInterface.

A model loaded with `attn_implementation="gsa"` runs its own modeling code unchanged; each
attention layer calls `gsa_attention`, which reads the `gsa_state` keyword that the engine
passes to the model's forward (transformers forwards extra keywords down to attention).
Without a `gsa_state` the function is plain causal SDPA: the unmodified model.

Plan-then-run: `GistState` builds the forgetting mask once per forward and reuses it in
every layer; only the chunk selection, which depends on each layer's queries and keys, is
redone per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from gsa_rag.config import GistConfig
from gsa_rag.kernels.dispatch import sparse_decode_attention
from gsa_rag.layout import GistLayout
from gsa_rag.masks import dense_gist_mask, dense_unfold_mask
from gsa_rag.selection import select_chunks, select_hierarchical


@dataclass
class GistState:
    """What one forward pass needs to know about the sequence.

    Attributes:
        layout: the whole sequence so far, including the tokens of this forward.
        q_index: long [Tq], the columns of this forward's tokens.
        config: the gist config.
        attended: filled during the forward: per layer, float [B, H] keys the last query row
            sees per head (H is 1 where all heads share the mask). For budgets and benchmarks.
        hook: optional `hook(layer_idx, query, key, value, mask)`, called in every layer once
            the mask is known and before attention: gist memory uses it to copy offloaded raw
            KV of the chunks the mask unfolds into `key`/`value` (in place), search to read
            the queries.
    """

    layout: GistLayout
    q_index: torch.Tensor
    config: GistConfig
    attended: dict[int, torch.Tensor] = field(default_factory=dict)
    hook: Callable | None = None
    _forget_mask: torch.Tensor | None = None

    @classmethod
    def for_new_tokens(cls, layout: GistLayout, num_new: int, config: GistConfig) -> GistState:
        T = layout.seq_len
        state = cls(layout, torch.arange(T - num_new, T, device=layout.input_ids.device), config)
        state._q_host = (T - num_new, T)  # q_index's range, readable without a device sync
        return state

    def forget_mask(self) -> torch.Tensor:
        """bool [B, 1, Tq, T], the same for every layer, built once."""
        if self._forget_mask is None:
            mask = dense_gist_mask(self.layout, self.config.num_previous_chunks, self.q_index)
            self._forget_mask = mask[:, None]
        return self._forget_mask

    def mask_for_layer(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """bool [B, 1 or Hkv, Tq, T]: the forgetting mask, with tail rows unfolding their
        selected chunks in layers that select."""
        mask = self.forget_mask()
        tail = self.layout.is_tail[:, self.q_index]  # [B, Tq]
        nothing_to_select = not self.config.uses_gists or int(self.layout.num_chunks.max()) == 0
        if layer_idx < self.config.first_selecting_layer or nothing_to_select or not tail.any():
            return mask
        # the tail is a suffix of every row, so rows before the earliest tail row never select
        rows = slice(int(tail.any(0).nonzero()[0]), None)
        layout = self.layout
        context_len = (layout.valid & ~layout.is_tail).sum(-1)
        if layout.levels > 1:  # H-GSA: coarse to fine, each level unfolds what it chose
            chosen = select_hierarchical(query[:, :, rows], key, layout, self.config)
            selected, sections = chosen.chunks, chosen.sections
        else:
            selected = select_chunks(query[:, :, rows], key, layout.gist_index, layout.gist_valid, context_len, self.config)
            sections = None
        unfold = dense_unfold_mask(layout, selected, self.config.num_previous_chunks, self.q_index[rows], sections)
        head_mask = mask.expand(-1, key.shape[1], -1, -1).clone()
        tail_rows = tail[:, None, rows, None]
        head_mask[:, :, rows] = torch.where(tail_rows, unfold, head_mask[:, :, rows])
        return head_mask


def gsa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    gsa_state: GistState | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention under the gist rule.

    Args:
        module: the model's attention module (gives `layer_idx`).
        query: [B, Hq, Tq, D]; key, value: [B, Hkv, T, D] (the cache included).
        attention_mask: ignored when `gsa_state` is given (the state holds the rule).
        gsa_state: the engine's per-forward state; None means plain causal attention.

    Returns:
        ([B, Tq, Hq, D], None).
    """
    Hq, Hkv = query.shape[1], key.shape[1]
    if gsa_state is None:
        mask = attention_mask if attention_mask is not None and attention_mask.dtype == torch.bool else None
        causal = mask is None and query.shape[2] > 1
        if causal and query.shape[2] != key.shape[2]:
            raise ValueError("gsa attention without a gsa_state needs a full causal forward; use GistEngine")
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=Hq != Hkv
        )
        return out.transpose(1, 2).contiguous(), None

    # the Triton decode kernels know one gist level: H-GSA layouts take the reference path
    hierarchical = getattr(getattr(gsa_state, "layout", None), "levels", 1) > 1
    fast = None if hierarchical else sparse_decode_attention(module, query, key, value, scaling, gsa_state)
    if fast is not None:  # one decode row on CUDA: key lists + sparse flash-decode (gsa_rag.kernels)
        return fast[0], None
    mask = gsa_state.mask_for_layer(module.layer_idx, query, key)
    hook = getattr(gsa_state, "hook", None)  # plug-in states (state_factory) may not have one
    if hook is not None:
        hook(module.layer_idx, query, key, value, mask)
    gsa_state.attended[module.layer_idx] = mask[:, :, -1].sum(-1)
    if mask.shape[1] > 1:
        mask = mask.repeat_interleave(Hq // Hkv, dim=1)
    if Hq != Hkv:  # SDPA's enable_gqa with a mask falls back to the memory-hungry math kernel
        key, value = key.repeat_interleave(Hq // Hkv, dim=1), value.repeat_interleave(Hq // Hkv, dim=1)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("gsa", gsa_attention)
