"""The gist attention rule, written once, with a dense builder (CPU, reference) and a
FlexAttention BlockMask builder (GPU).

Rule: a query at column q sees key column kv iff
    kv <= q  AND  kv is not padding  AND
    (kv is a sink token  OR  kv's chunk is q's chunk or one of the `num_previous_chunks`
     before it  OR  recall(kv))
where recall(kv) is "kv is a gist" for the forgetting (context) mask, and "kv's chunk was
selected" when a question/answer token unfolds chunks (see selection.py). A query always
sees itself, so padded rows stay finite.

KV reuse adds two terms (both no-ops on ordinary layouts, where doc_id is -1 and no token is a
link): link tokens are recalled by every later token, like gists; and a token of an
independently encoded passage (doc_id >= 0) sees nothing outside its own passage but the sink:
    ... AND NOT (doc[q] >= 0 AND doc[kv] != doc[q] AND kv is not a sink token)

Hierarchy (H-GSA, L gist levels; every term is a no-op on a single-level layout):
  * the forgetting recall is `gist_recall`: a gist of the top level L-1 is seen by every later
    token; a gist of a lower level l only by tokens of the same level-(l+1) section (a level-0
    gist only inside its meta-gist section). Selection widens it (`dense_unfold_mask`).
  * the chunk window belongs to raw tokens and level-0 gists: a meta-gist (level >= 1) sees the
    sink, itself, the gists of its own section and the higher-level gists before it, no raw text.
"""

from __future__ import annotations

import torch

from gsa_rag.layout import GistLayout


def visible(layout: GistLayout, b, q, kv, num_previous_chunks: int, recall) -> torch.Tensor:
    """The rule as one predicate over (broadcastable) batch, query and key column indices.

    Works on index tensors of any broadcastable shape, including the 0-d tensors
    FlexAttention's mask_mod receives.
    """
    chunk_q, chunk_kv = layout.chunk_id[b, q], layout.chunk_id[b, kv]
    # compared, not subtracted: a dense mask's difference would be long [B, Tq, T], 8 bytes a pair
    window = (chunk_kv <= chunk_q) & (chunk_kv >= chunk_q - num_previous_chunks)
    window = window & (layout.level[b, q] <= 0)  # meta-gists: no raw window
    isolated = _isolated(layout, b, q, kv)
    sink = layout.is_sink[b, kv]
    seen = (kv <= q) & layout.valid[b, kv] & (sink | (~isolated & (window | recall | layout.is_link[b, kv])))
    return seen | (q == kv)


def _isolated(layout: GistLayout, b, q, kv) -> torch.Tensor:
    """KV reuse: a token of an independently encoded passage does not see other passages."""
    doc_q = layout.doc_id[b, q]
    return (doc_q >= 0) & (layout.doc_id[b, kv] != doc_q)


def recall_gate(layout: GistLayout, b, q, kv) -> torch.Tensor:
    """Where recall can add a key: visible(.., recall) == visible(.., False) | (gate & recall)
    for every recall (the rule is an OR of recall with terms that do not depend on it). Lets a
    forward build the recall-free part once and each layer add its own recall in two ops."""
    return (kv <= q) & layout.valid[b, kv] & ~_isolated(layout, b, q, kv)


def gist_recall(layout: GistLayout, b, q, kv) -> torch.Tensor:
    """The forgetting rule's recall: which gist keys a query sees outside its window.

    Single level: every gist. With L levels: a top-level gist always; a gist of level l < L-1
    only when it shares its level-(l+1) section with the query. Same index conventions as
    `visible` (broadcastable index tensors, 0-d ones included).
    """
    top = layout.section_id.shape[-1]  # L - 1
    if top == 0:
        return layout.is_gist[b, kv]
    level = layout.level[b, kv]
    recall = level == top
    # level by level, so that query and key are each indexed alone and only the comparison is
    # dense: indexing section_id by the key's level for every (query, key) pair broadcasts three
    # index tensors to [B, Tq, T], which CUDA's advanced indexing makes contiguous (four long
    # [B, Tq, T], 32 bytes a pair: 13 GB for a prefill of 32 prompts of 3.6K columns)
    for parent in range(top):  # section_id[..., l] is the level-(l+1) section
        same = layout.section_id[b, kv, parent] == layout.section_id[b, q, parent]
        recall = recall | ((level == parent) & same)
    return recall


def dense_index(layout: GistLayout, q_index: torch.Tensor | None):
    """(b [B, 1, 1], q [1, Tq, 1], kv [1, 1, T]) index tensors for `visible` over the query
    columns q_index (default every column) and every key column."""
    device = layout.input_ids.device
    if q_index is None:
        q_index = torch.arange(layout.seq_len, device=device)
    b = torch.arange(layout.batch_size, device=device)[:, None, None]
    return b, q_index[None, :, None], torch.arange(layout.seq_len, device=device)[None, None, :]


def dense_gist_mask(layout: GistLayout, num_previous_chunks: int, q_index: torch.Tensor | None = None) -> torch.Tensor:
    """The forgetting mask, materialised.

    Args:
        layout: the whole sequence so far (keys are all its columns).
        num_previous_chunks: local window in chunks.
        q_index: long [Tq], the query columns (default: every column).

    Returns:
        bool [B, Tq, T].
    """
    b, q, kv = dense_index(layout, q_index)
    return visible(layout, b, q, kv, num_previous_chunks, gist_recall(layout, b, q, kv))


# dense_gist_mask through torch.compile (dynamic shapes), for the FlexAttention prefill's bands on
# CUDA: eagerly the rule is about a dozen passes over a [Tq, T] band (compares, ands, ors), 23 of
# a 32K prefill's 137 ms on an H200 for the default model's shapes; compiled, one fused pass.
# None: not compiled yet; False: its compile failed in this process (eager from then on).
_compiled_mask = None
FUSED_MASK_DEVICES = ("cuda",)  # the CPU's Inductor is not used by the engine (tests trace it with Dynamo)


def dense_gist_mask_fused(layout: GistLayout, num_previous_chunks: int, q_index: torch.Tensor) -> torch.Tensor:
    """`dense_gist_mask` of the rows `q_index`, compiled into one kernel on CUDA (eager elsewhere,
    with GSA_RAG_KERNELS=0, or once its compile has failed in this process, with a warning)."""
    from gsa_rag.kernels.dispatch import kernels_off

    global _compiled_mask
    if layout.input_ids.device.type not in FUSED_MASK_DEVICES or _compiled_mask is False or kernels_off():
        return dense_gist_mask(layout, num_previous_chunks, q_index)
    if _compiled_mask is None:
        _compiled_mask = torch.compile(dense_gist_mask, dynamic=True)
    try:
        # the levels are a loop bound, so their size is fixed in the graph; with sizes of equal
        # value sharing a symbol (duck sizing) the batch, when it equals them, would be fixed too
        with _no_duck_sizing():
            return _compiled_mask(layout, num_previous_chunks, q_index)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001  (Inductor, Triton or a C compiler that cannot run here)
        import warnings

        _compiled_mask = False
        warnings.warn(f"compiling the forgetting mask failed ({type(err).__name__}: {str(err)[:300]}); "
                      "it is built eagerly from now on", RuntimeWarning, stacklevel=2)
        return dense_gist_mask(layout, num_previous_chunks, q_index)


def _no_duck_sizing():
    """torch.compile's sizes of equal value not sharing a symbol, where the installed torch has
    the switch."""
    from torch.fx.experimental import _config

    from gsa_rag.kernels.dispatch import config_patch

    return config_patch(_config, use_duck_shape=False)


def _gather_units(selected: torch.Tensor, unit_of_kv: torch.Tensor) -> torch.Tensor:
    """bool [B, H, Tq, N] per-unit choice, long [B, T] unit of each column -> bool [B, H, Tq, T]."""
    B, H, Tq, N = selected.shape
    index = unit_of_kv.clamp(0, N - 1)[:, None, None, :].expand(B, H, Tq, -1)
    return torch.gather(selected, 3, index)


def dense_unfold_mask(
    layout: GistLayout,
    selected: torch.Tensor,
    num_previous_chunks: int,
    q_index: torch.Tensor,
    sections: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The mask of tail tokens that unfold the chunks they selected.

    Recall is: the raw tokens and gist of a selected closed chunk; with the hierarchy, also the
    gist closing a selected section of each level (selection unfolds level by level: see
    selection.select_hierarchical). Nothing else outside the window and sink.

    Args:
        layout: the whole sequence so far.
        selected: bool [B, H, Tq, C], chunk c selected for query row (per KV head).
        num_previous_chunks: local window in chunks.
        q_index: long [Tq], the query columns.
        sections: hierarchical layouts only: per level l = 1..L-1, bool [B, H, Tq, S_l], the
            level-l sections selected.

    Returns:
        bool [B, H, Tq, T].
    """
    b, q, kv = dense_index(layout, q_index)
    recall = unfold_recall(layout, selected, sections)
    return visible(layout, b[:, None], q[:, None], kv[:, None], num_previous_chunks, recall)


def unfold_recall(layout: GistLayout, selected: torch.Tensor, sections: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`dense_unfold_mask`'s recall term alone: bool [B, H, Tq, T] (same arguments); the mask is
    visible(.., False) | (recall_gate & this)."""
    return UnfoldRecall(layout)(selected, sections)


class UnfoldRecall:
    """`unfold_recall` for every layer of one forward: the closed columns and their chunks are
    worked out once (they do not depend on the layer), so a layer pays one gather and one AND."""

    def __init__(self, layout: GistLayout):
        self.layout = layout
        C = max(1, layout.gist_index.shape[1])
        closed = (layout.chunk_id >= 0) & (layout.chunk_id < layout.num_chunks[:, None])
        if layout.levels > 1:
            closed &= layout.level <= 0  # a chunk unfolds its raw tokens and its gist
        self.closed = closed[:, None, None, :]
        self.chunk_of = layout.chunk_id.clamp(0, C - 1)[:, None, None, :]

    def __call__(self, selected: torch.Tensor, sections: list[torch.Tensor] | None = None) -> torch.Tensor:
        layout = self.layout
        recall = torch.gather(selected, 3, self.chunk_of.expand(*selected.shape[:3], -1)) & self.closed
        if layout.levels > 1:
            if sections is None or len(sections) != layout.levels - 1:
                raise ValueError(f"a layout of {layout.levels} gist levels needs the selected sections of levels 1..{layout.levels - 1}")
            for level, chosen in enumerate(sections, start=1):
                is_level = (layout.level == level)[:, None, None, :]  # a section unfolds its closing gist
                recall |= _gather_units(chosen, layout.section_id[..., level - 1]) & is_level
        return recall


def gist_block_mask(layout: GistLayout, num_previous_chunks: int, q_offset: int = 0, block_size: int = 128):
    """The forgetting mask as a FlexAttention BlockMask (queries are columns q_offset..T-1).

    Blocks that the rule leaves empty are skipped by flex_attention; use it on CUDA, where
    flex_attention compiles. On the CPU the dense builder is the reference.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx + q_offset
        return visible(layout, b, q, kv_idx, num_previous_chunks, gist_recall(layout, b, q, kv_idx))

    return create_block_mask(
        mask_mod,
        B=layout.batch_size,
        H=None,
        Q_LEN=layout.seq_len - q_offset,
        KV_LEN=layout.seq_len,
        device=layout.input_ids.device,
        BLOCK_SIZE=block_size,
    )
