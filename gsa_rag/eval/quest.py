"""Quest: training-free, query-aware chunk selection over raw KV, as a plug-in of the "gsa"
attention function. The inference-time sparse baseline for GSA (Tang et al., "Quest:
Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024).

No gists. The context is cut into chunks ("pages") of `chunk_size` raw tokens; a passage ends
its chunk, as in GSA. Context tokens attend causally to everything (Quest sparsifies the
question and the decoding only). A question/answer token scores every closed chunk by an upper
bound of q.k over the chunk, from the per-channel minimum and maximum of its keys:

    score(q, chunk) = sum_d max(q_d * kmin_d, q_d * kmax_d) = q+ . kmax + q- . kmin

keeps the top-k chunks per query head, takes the union over the heads of a GQA group, and
attends to the sink, the selected chunks, the `num_previous_chunks` local chunks and the tail:
GSA's unfolding rule (masks.visible) without the gists. The chunks are GSA's own (the same
layout with the gist columns dropped), so at the same chunk size and k both attend to the same
number of keys: GSA's selecting layers do not see the gists of unselected chunks either.

Usage (what benchmarks/rag_eval.py does):

    layout = quest_layout(segments_batch, config, tokenizer, device=...)
    plan = QuestPlan(config)
    for token in generate_tokens(model, layout, config, params, stops, state_factory=plan.state): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gsa_rag.config import GistConfig
from gsa_rag.layout import PAD_CHUNK, GistLayout, Segment, build_layout
from gsa_rag.masks import dense_unfold_mask, visible
from gsa_rag.selection import adaptive_k, choose_chunks, union_over_groups


def quest_layout(segments_batch: list[list[Segment]], config: GistConfig, tokenizer, *,
                 device: torch.device | str = "cpu") -> GistLayout:
    """Lays out a batch of prompts in GSA's chunks, without the gist tokens (left-padded).

    The chunks are exactly GSA's at the same config (layout.build_layout, word-aware cuts, a
    passage ends its chunk); only the gist columns are dropped. Chunk ids keep GistLayout's
    convention (sink -1, context chunk c, tail `num_chunks`, padding PAD_CHUNK); RoPE positions
    are unchanged (raw tokens never counted the gists); `is_gist` is all False and `gist_index`
    holds zeros (its width is the chunk count, so `gist_valid` says which chunks exist).

    Args:
        segments_batch: one list of segments per sequence (prompt.build_segments).
        config: chunk_size (> 0), sink, word_aware.
        tokenizer: the model's tokenizer (holding the gist token, as for GSA).
        device: where the tensors go.
    """
    if config.chunk_size < 1:
        raise ValueError(f"quest needs chunk_size >= 1, got {config.chunk_size}")
    gisted = build_layout(segments_batch, config, tokenizer)
    keep = gisted.valid & ~gisted.is_gist
    B, T = gisted.batch_size, int(keep.sum(-1).max())
    out = {
        "input_ids": torch.full((B, T), tokenizer.pad_token_id or 0, dtype=torch.long),
        "chunk_id": torch.full((B, T), PAD_CHUNK, dtype=torch.long),
        "passage_id": torch.full((B, T), -1, dtype=torch.long),
        "position_ids": torch.zeros(B, T, dtype=torch.long),
        "valid": torch.zeros(B, T, dtype=torch.bool),
        "is_sink": torch.zeros(B, T, dtype=torch.bool),
    }
    for b in range(B):
        cols = keep[b].nonzero().flatten()
        pad = T - len(cols)
        for name in ("input_ids", "chunk_id", "passage_id", "position_ids", "is_sink"):
            out[name][b, pad:] = getattr(gisted, name)[b, cols]
        out["valid"][b, pad:] = True
    return GistLayout(**out, is_gist=torch.zeros(B, T, dtype=torch.bool), num_chunks=gisted.num_chunks,
                      gist_index=torch.zeros_like(gisted.gist_index)).to(device)


def quest_scores(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, chunk_valid: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q.k per chunk.

    Args:
        query: [B, Hq, Tq, D].
        kmin, kmax: [B, Hkv, C, D], per-channel bounds of each chunk's keys (finite).
        chunk_valid: bool [B, C].

    Returns:
        float32 [B, Hq, Tq, C], -inf for missing chunks.
    """
    G = query.shape[1] // kmin.shape[1]
    q = query.float()
    kmin = kmin.float().repeat_interleave(G, dim=1)
    kmax = kmax.float().repeat_interleave(G, dim=1)
    scores = q.clamp(min=0) @ kmax.transpose(-1, -2) + q.clamp(max=0) @ kmin.transpose(-1, -2)
    return scores.masked_fill(~chunk_valid[:, None, None, :], float("-inf"))


def chunk_key_bounds(key: torch.Tensor, layout: GistLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of the keys of every closed chunk.

    Args:
        key: [B, Hkv, T, D] (T >= the context; tail columns are ignored).
        layout: chunk ids of the columns.

    Returns:
        (kmin, kmax), each float32 [B, Hkv, C, D]; zeros for chunks a row does not have.
    """
    B, Hkv, T, D = key.shape
    C = layout.gist_index.shape[1]
    chunk_id = layout.chunk_id[:, :T]
    closed = (chunk_id >= 0) & (chunk_id < layout.num_chunks[:, None])
    index = torch.where(closed, chunk_id, C)[:, None, :, None].expand(B, Hkv, T, D)
    key = key.float()
    kmax = key.new_full((B, Hkv, C + 1, D), float("-inf")).scatter_reduce(2, index, key, "amax")[:, :, :C]
    kmin = key.new_full((B, Hkv, C + 1, D), float("inf")).scatter_reduce(2, index, key, "amin")[:, :, :C]
    return kmin.nan_to_num(0.0, 0.0, 0.0), kmax.nan_to_num(0.0, 0.0, 0.0)


@dataclass
class QuestPlan:
    """Per-generation bookkeeping: the chunk key bounds of each layer, computed once (the
    context keys never change while decoding), and the k of each row.

    Args:
        config: chunk_size, sink, num_previous_chunks, k_policy ("fixed" or "adaptive"), top_k.
        first_selecting_layer: layers below it attend fully (Quest leaves its first layers
            dense); default 0: every layer selects.
    """

    config: GistConfig
    first_selecting_layer: int = 0
    _bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def state(self, layout: GistLayout, num_new: int, config: GistConfig) -> QuestState:
        """A state factory for generation.forward / generate_tokens."""
        T = layout.seq_len
        return QuestState(layout, torch.arange(T - num_new, T, device=layout.input_ids.device), config, plan=self)

    def bounds(self, layer_idx: int, key: torch.Tensor, layout: GistLayout) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self._bounds:
            self._bounds[layer_idx] = chunk_key_bounds(key, layout)
        return self._bounds[layer_idx]

    def k(self, layout: GistLayout, group_size: int) -> torch.Tensor:
        """long [B]: chunks each query head keeps."""
        num_chunks = layout.num_chunks
        if self.config.k_policy == "adaptive":
            # GSA's context length counts its gists (one per chunk): the same k as GSA's
            context_len = (layout.valid & ~layout.is_tail).sum(-1) + num_chunks
            k = adaptive_k(context_len, num_chunks, group_size, self.config)
        elif self.config.k_policy == "fixed":
            k = torch.full_like(num_chunks, self.config.top_k)
        else:
            raise ValueError(f"quest supports k_policy 'fixed' or 'adaptive', not {self.config.k_policy!r}")
        return k


@dataclass
class QuestState:
    """What one forward pass needs (the same interface as attention.GistState).

    Attributes:
        layout: the whole sequence so far (quest_layout, extended by generation).
        q_index: long [Tq], the columns of this forward's tokens.
        config: the chunking/selection config.
        plan: the per-generation QuestPlan (bounds cache, k).
        attended: filled during the forward: per layer, float [B, H] keys the last query row sees.
    """

    layout: GistLayout
    q_index: torch.Tensor
    config: GistConfig
    plan: QuestPlan
    attended: dict[int, torch.Tensor] = field(default_factory=dict)
    _causal: torch.Tensor | None = None

    def causal_mask(self) -> torch.Tensor:
        """bool [B, 1, Tq, T]: plain causal attention over the valid columns, built once."""
        if self._causal is None:
            layout = self.layout
            device = layout.input_ids.device
            b = torch.arange(layout.batch_size, device=device)[:, None, None]
            q = self.q_index[None, :, None]
            kv = torch.arange(layout.seq_len, device=device)[None, None, :]
            everything = torch.ones((), dtype=torch.bool, device=device)
            self._causal = visible(layout, b, q, kv, self.config.num_previous_chunks, everything)[:, None]
        return self._causal

    def mask_for_layer(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """bool [B, 1 or Hkv, Tq, T]: causal for context rows; tail rows see what they selected."""
        mask = self.causal_mask()
        layout = self.layout
        tail = layout.is_tail[:, self.q_index]  # [B, Tq]
        if layer_idx < self.plan.first_selecting_layer or not tail.any() or int(layout.num_chunks.max()) == 0:
            return mask
        rows = slice(int(tail.any(0).nonzero()[0]), None)
        Hkv = key.shape[1]
        kmin, kmax = self.plan.bounds(layer_idx, key, layout)
        scores = quest_scores(query[:, :, rows], kmin, kmax, layout.gist_valid)
        chosen = choose_chunks(scores, k=self.plan.k(layout, query.shape[1] // Hkv))
        selected = union_over_groups(chosen, Hkv)
        unfold = dense_unfold_mask(layout, selected, self.config.num_previous_chunks, self.q_index[rows])
        head_mask = mask.expand(-1, Hkv, -1, -1).clone()
        head_mask[:, :, rows] = torch.where(tail[:, None, rows, None], unfold, head_mask[:, :, rows])
        return head_mask

