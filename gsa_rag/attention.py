"""The "gsa" attention function, registered with transformers' AttentionInterface.

A model loaded with `attn_implementation="gsa"` runs its own modeling code unchanged; each
attention layer calls `gsa_attention`, which reads the `gsa_state` keyword that the engine
passes to the model's forward (transformers forwards extra keywords down to attention).
Without a `gsa_state` the function is plain causal SDPA: the unmodified model.

Plan-then-run: `GistState` builds the forgetting mask and finds the rows that select once per
forward and reuses them in every layer; only the chunk selection, which depends on each layer's
queries and keys, is redone per layer. No layer reads a tensor value back to the host (on a GPU
that is a device sync): the branches read host-side facts of the layout
(`GistLayout.host_facts`). Only the tail rows (question, answer) select, so a layer's mask stays
split (`LayerMask`): one mask shared by all heads for the rows before the tail, per-head masks
for the tail rows alone. A [B, H, Tq, T] mask is never built for the attention itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from gsa_rag import selection
from gsa_rag.config import GistConfig
from gsa_rag.errors import UnsupportedModelError
from gsa_rag.kernels.dispatch import sparse_decode_attention
from gsa_rag.kernels.gist_keys8 import quantize_gist_keys
from gsa_rag.layout import GistLayout
from gsa_rag.masks import (
    UnfoldRecall,
    dense_gist_mask,
    dense_gist_mask_fused,
    dense_index,
    recall_gate,
    visible,
)
from gsa_rag.models import SUPPORTED_FAMILIES
from gsa_rag.selection import ChunkSelector, select_hierarchical


@dataclass
class LayerMask:
    """One layer's mask, kept split by query rows.

    Only the tail rows (question and answer tokens: tens of rows) unfold chunks, and they may
    unfold different chunks per KV head; every earlier row sees the forgetting mask, the same
    for every head. Keeping the two apart means no [B, H, Tq, T] mask is ever built for a
    prefill or training forward: the shared rows go to SDPA as one [B, 1, rows, T] mask that it
    broadcasts over heads, only the tail rows as a per-head mask.

    Attributes:
        shared: bool [B, 1, Tq, T], the forgetting mask (rows before `start` use it); None when
            `rows` makes it a band of rows at a time (a long prefill through FlexAttention never
            holds all of it: `shared_rows`).
        start: the first row of `tail`; Tq when no row selects.
        tail: bool [B, 1 or Hkv, Tq - start, T], the mask of rows `start`..; None when none.
        rows: rows(lo, hi) -> bool [B, 1, hi - lo, T], rows of the forgetting mask (GistState.forget_rows).
    """

    shared: torch.Tensor | None
    start: int
    tail: torch.Tensor | None = None
    # dtype -> `shared` as an additive bias; GistState hands every layer of a forward the same dict
    biases: dict = field(default_factory=dict, repr=False)
    rows: Callable[[int, int], torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def whole(cls, mask: torch.Tensor) -> LayerMask:
        """A mask given whole (bool [B, 1 or H, Tq, T]), e.g. by a plug-in state's mask_for_layer."""
        if mask.shape[1] == 1:
            return cls(mask, mask.shape[2])
        return cls(mask[:, :1], 0, mask)

    @property
    def num_rows(self) -> int:
        """Tq, the forward's query rows."""
        return self.start + (0 if self.tail is None else self.tail.shape[2])

    def shared_rows(self, lo: int, hi: int) -> torch.Tensor:
        """bool [B, 1, hi - lo, T]: rows lo..hi-1 of `shared`, made by `rows` when it is not held."""
        return self.shared[:, :, lo:hi] if self.shared is not None else self.rows(lo, hi)

    def full(self) -> torch.Tensor:
        """bool [B, 1 or Hkv, Tq, T], the mask materialised (what `mask_for_layer` returns)."""
        if self.tail is None:
            return self.shared_rows(0, self.start)
        shared = self.shared_rows(0, self.start).expand(-1, self.tail.shape[1], -1, -1)
        return torch.cat([shared, self.tail], dim=2)

    def last_row(self) -> torch.Tensor:
        """bool [B, 1 or Hkv, T]: the keys the last query row sees."""
        if self.tail is not None:
            return self.tail[:, :, -1]
        return self.shared_rows(self.start - 1, self.start)[:, :, -1]

    def shared_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """`shared` as SDPA's additive float bias (0 or -inf), built once per forward.

        SDPA turns a bool mask into exactly this bias on every call, and autograd keeps each
        layer's copy for backward; one bias handed to every layer is kept once. On CUDA its rows
        are padded to a multiple of 8 columns: the memory-efficient kernel copies a bias whose
        row stride is not aligned.
        """
        bias = self.biases.get(dtype)
        if bias is None:
            shared = self.shared_rows(0, self.num_rows)
            B, H, Tq, T = shared.shape
            width = -(-T // 8) * 8 if shared.is_cuda else T
            bias = torch.zeros(B, H, Tq, width, dtype=dtype, device=shared.device)[..., :T]
            bias.masked_fill_(~shared, float("-inf"))
            self.biases[dtype] = bias
        return bias


@dataclass
class TailRows:
    """The query rows of one forward that select chunks: the same in every layer.

    Attributes:
        start: the first of them (LayerMask.start): no earlier row is a tail row.
        q_index: long [Tq - start], their columns.
        base, gate: bool [B, 1, Tq - start, T], the rows' mask is base | (gate & the layer's
            recall) (masks.recall_gate): base is what they see without recall (the forgetting
            mask on rows that are not tail rows), gate where recall may add a key (nowhere on
            those rows). Built once per forward, so a layer adds its recall in two ops.
        select: single-level layouts: the chunk selection with its per-forward parts (k, the
            gist columns) worked out once (selection.ChunkSelector); None with H-GSA.
        recall: the columns each chosen chunk unfolds, worked out once (masks.UnfoldRecall).
    """

    start: int
    q_index: torch.Tensor
    base: torch.Tensor
    gate: torch.Tensor
    select: ChunkSelector | None
    recall: UnfoldRecall
    # the select and recall mask kernels' per-forward inputs (`_kernel_union`), made by the first layer that runs them
    kernel_inputs: tuple | None = None


_UNKNOWN = object()  # GistState._tail_rows before tail_rows() has run (None means "no row selects")


def layer_mask(state, layer_idx: int, query: torch.Tensor, key: torch.Tensor, lazy: bool = False) -> LayerMask:
    """`state.layer_mask(...)`, or a plug-in state's `mask_for_layer` taken whole. `lazy`: a state
    whose layer_mask takes it (GistState, the eval harness's recorder) leaves the forgetting rows
    to be made a band at a time; any other is asked as before."""
    split = getattr(state, "layer_mask", None)
    if split is not None:
        return split(layer_idx, query, key, lazy=True) if lazy and _takes_lazy(split) else split(layer_idx, query, key)
    return LayerMask.whole(state.mask_for_layer(layer_idx, query, key))


def _takes_lazy(method) -> bool:
    import inspect

    try:
        return "lazy" in inspect.signature(method).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return False


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
            the queries. `mask` is what `mask_for_layer` returns; a hook with a false
            `reads_mask` attribute gets None instead (building the full mask costs memory).
    """

    layout: GistLayout
    q_index: torch.Tensor
    config: GistConfig
    attended: dict[int, torch.Tensor] = field(default_factory=dict)
    hook: Callable | None = None
    _forget_mask: torch.Tensor | None = None
    _biases: dict = field(default_factory=dict)  # LayerMask.shared_bias, shared by the layers
    _few_rows: dict = field(default_factory=dict)  # forget_rows of a few rows, shared by the layers
    _tail_rows: TailRows | None | object = _UNKNOWN  # tail_rows(), once per forward
    # q_index's columns readable on the host without a device sync (a range, or a GistCache's
    # open columns); None: read q_index once per forward
    _q_host: Sequence[int] | None = None

    @classmethod
    def for_new_tokens(cls, layout: GistLayout, num_new: int, config: GistConfig) -> GistState:
        T = layout.seq_len
        state = cls(layout, torch.arange(T - num_new, T, device=layout.input_ids.device), config)
        state._q_host = range(T - num_new, T)
        return state

    def forget_mask(self) -> torch.Tensor:
        """bool [B, 1, Tq, T], the same for every layer, built once."""
        if self._forget_mask is None:
            mask = dense_gist_mask(self.layout, self.config.num_previous_chunks, self.q_index)
            self._forget_mask = mask[:, None]
        return self._forget_mask

    def forget_rows(self, lo: int, hi: int) -> torch.Tensor:
        """bool [B, 1, hi - lo, T]: rows lo..hi-1 of `forget_mask()`, only those rows built unless
        it is (a FlexAttention prefill makes its plan a band of rows at a time). A few rows (the
        tail's, the last row) are kept for the forward's other layers."""
        if self._forget_mask is not None or (lo, hi) == (0, self.q_index.shape[0]):
            return self.forget_mask()[:, :, lo:hi]
        rows = self._few_rows.get((lo, hi))
        if rows is None:
            few = hi - lo <= FOLD_MAX_ROWS
            make = dense_gist_mask if few else dense_gist_mask_fused  # a band: one fused pass on CUDA
            rows = make(self.layout, self.config.num_previous_chunks, self.q_index[lo:hi])[:, None]
            if few:
                self._few_rows[(lo, hi)] = rows
        return rows

    def mask_for_layer(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """bool [B, 1 or Hkv, Tq, T]: the forgetting mask, with tail rows unfolding their
        selected chunks in layers that select (`layer_mask`, materialised)."""
        return self.layer_mask(layer_idx, query, key).full()

    def tail_rows(self) -> TailRows | None:
        """The rows that select, worked out once per forward (every layer reuses them), or None
        where no row can select. The `if`s here read the layout's host-side facts and the query
        columns on the host: no layer waits on the device to decide (see layout.HostFacts)."""
        if self._tail_rows is _UNKNOWN:
            self._tail_rows = self._find_tail_rows()
        return self._tail_rows

    def _find_tail_rows(self) -> TailRows | None:
        layout = self.layout
        if not self.config.uses_gists:
            return None
        facts = layout.host_facts()
        if facts.max_chunks == 0:
            return None
        # rows whose column is before every sequence's tail never select; the tail is a suffix of
        # every sequence, so `start` is the earliest tail row (rows past it that are not (yet) tail
        # in some batch row are masked by `tail` below)
        q_host = self.q_index.tolist() if self._q_host is None else self._q_host  # the tolist waits on the device
        if isinstance(q_host, range):  # for_new_tokens
            start = max(facts.first_tail, q_host.start) - q_host.start
        else:
            start = next((i for i, q in enumerate(q_host) if q >= facts.first_tail), len(q_host))
        if start >= len(q_host):
            return None
        q_index = self.q_index[start:]
        tail = layout.is_tail[:, q_index][:, None, :, None]  # rows past `start` may not be tail in every sequence
        b, q, kv = dense_index(layout, q_index)
        unfolded = visible(layout, b, q, kv, self.config.num_previous_chunks, False)[:, None]
        select = None
        if layout.levels == 1:
            context_len = (layout.valid & ~layout.is_tail).sum(-1)
            select = ChunkSelector(layout.gist_index, layout.gist_valid, context_len, self.config)
        return TailRows(
            start=start,
            q_index=q_index,
            base=torch.where(tail, unfolded, self.forget_rows(start, self.q_index.shape[0])),
            gate=recall_gate(layout, b, q, kv)[:, None] & tail,
            select=select,
            recall=UnfoldRecall(layout),
        )

    def layer_mask(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, lazy: bool = False) -> LayerMask:
        """The layer's mask, split: the forgetting mask for every row, and per KV head the rows
        from the earliest tail row on, which unfold their selected chunks in layers that select.
        `lazy`: the forgetting mask is not built whole; its rows come from `forget_rows`."""
        mask = None if lazy else self.forget_mask()
        start, tail = self._tail_mask(layer_idx, query, key)
        return LayerMask(mask, start, tail, self._biases, rows=self.forget_rows)

    def _tail_mask(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """(start, the tail rows' mask) of `layer_mask`; (Tq, None) where no row selects in the layer."""
        rows = self.tail_rows() if layer_idx >= self.config.first_selecting_layer else None
        if rows is None:
            return query.shape[2], None
        layout, start = self.layout, rows.start
        if rows.select is None:  # H-GSA: coarse to fine, each level unfolds what it chose
            chosen = select_hierarchical(query[:, :, start:], key, layout, self.config)
            selected, sections = chosen.chunks, chosen.sections
        else:
            union = _kernel_union(rows, layout, query[:, :, start:], key)
            if union is not None:  # the select kernels' union straight into the mask kernel
                return start, _kernel_tail_mask(rows, union)
            selected, sections = rows.select(query[:, :, start:], key), None
        # = dense_unfold_mask on the tail rows; rows not (yet) tail in a batch row keep the forgetting mask
        return start, rows.base | (rows.gate & rows.recall(selected, sections))


# On CUDA the tail rows of one sequence choose their chunks through the decode path's scores and
# select kernels (gsa_rag.kernels.gist_select.select_rows_triton) instead of the reference's
# matmul, sort and scatter. False restores the reference (benchmarks/memory_ttft.py --no-select-kernel).
SELECT_KERNEL = True


def _kernel_union(rows: TailRows, layout: GistLayout, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """`rows.select(query, key)` through the select kernels where they serve (CUDA, one sequence,
    a top-k policy, at least one chunk), as their int32 [R, Hkv, C] union (nonzero where
    chosen); None where they do not."""
    select = rows.select
    C = layout.gist_index.shape[1]
    # selection.ChunkSelector itself, not a name bound here: a selector swapped in (tests) keeps its own choice
    if not (SELECT_KERNEL and C > 0 and query.shape[0] == 1 and type(select) is selection.ChunkSelector
            and select.config.k_policy != "top_p" and _rows_kernel_fits(query)):
        return None
    from gsa_rag.kernels.gist_select import select_rows_triton

    if rows.kernel_inputs is None:
        k = select.chunks_per_head(query.shape[1] // key.shape[1])
        chunk_ptr = torch.arange(C + 1, dtype=torch.int32, device=query.device)
        # the recall mask kernel's: the gate where a column can unfold at all, each column's chunk
        gate = rows.gate & rows.recall.closed
        chunk_of = rows.recall.chunk_of.flatten().to(torch.int32)
        rows.kernel_inputs = (k.expand(query.shape[2]).contiguous(), chunk_ptr, gate, chunk_of)
    k, chunk_ptr = rows.kernel_inputs[:2]
    keys8 = None
    if select.config.score_dtype == "int8":
        keys8 = quantize_gist_keys(key, layout.gist_index, layout.gist_valid)
    return select_rows_triton(query, key, layout.gist_index, layout.num_chunks, k, chunk_ptr, sizes=True, keys8=keys8)


def _kernel_tail_mask(rows: TailRows, union: torch.Tensor) -> torch.Tensor:
    """The tail rows' mask (rows.base | (rows.gate & rows.recall(chosen))) from the select kernels'
    union, in one launch (`gsa_rag.kernels.recall_mask`) instead of five per layer."""
    from gsa_rag.kernels.recall_mask import tail_mask_triton

    _, _, gate, chunk_of = rows.kernel_inputs
    return tail_mask_triton(union, rows.base, gate, chunk_of)


def _sdpa_rows(query, key, value, mask: LayerMask, scaling, dropout, gqa: bool) -> torch.Tensor:
    """SDPA of the shared rows and of the tail rows, each under its own mask -> [B, Tq, Hq, D]."""
    Hq = query.shape[1]
    parts = []
    if mask.start > 0:  # one mask for every head: SDPA broadcasts it, and one bias serves every layer
        rows = query[:, :, : mask.start]
        bias = mask.shared_bias(query.dtype)[:, :, : mask.start]
        parts.append(F.scaled_dot_product_attention(rows, key, value, attn_mask=bias, dropout_p=dropout,
                                                    scale=scaling, enable_gqa=gqa))
    if mask.tail is not None:  # per KV head: repeated to the query heads (SDPA wants Hq or 1)
        tail = mask.tail.repeat_interleave(Hq // mask.tail.shape[1], dim=1)
        parts.append(F.scaled_dot_product_attention(query[:, :, mask.start :], key, value, attn_mask=tail,
                                                    dropout_p=dropout, scale=scaling, enable_gqa=gqa))
    # [B, Hq, rows, D] -> [B, rows, Hq, D]: the concatenation is the contiguous output
    return torch.cat([p.transpose(1, 2) for p in parts], dim=1)


# On CUDA, forwards of at most this many query rows (a question over gist memory, a fallback
# decode step) fold each KV head's query heads into its rows instead of repeating K/V: the masks,
# repeated over the group instead, are the smaller copy there (benchmarks/question_attention.py).
FOLD_MAX_ROWS = 256
# Those rows through the split-K kernel of gsa_rag.kernels.masked_rows instead of SDPA (`_kernel_rows`)
# when Triton serves the device: on an H200 it ran a layer of 20 passages' question in 54 us against the
# folded SDPA's 150 (218 against 357 at 50; benchmarks/results/question_attention/). False restores SDPA.
ROWS_KERNEL = True


def _sdpa_rows_folded(query, key, value, mask: LayerMask, scaling, dropout) -> torch.Tensor:
    """`_sdpa_rows` with GQA and without repeating K/V: the G query heads of each KV head become
    G blocks of rows ([B, Hkv, G * rows, D]; head h = kv * G + g), each part's mask repeated over
    those blocks -> [B, Tq, Hq, D]."""
    G = query.shape[1] // key.shape[1]
    parts = []
    if mask.start > 0:
        # built once per forward, as shared_bias; the rows it covers differ between layers that
        # select (up to the first tail row) and those that do not (every row)
        cache_key = ("folded", query.dtype, G, mask.start)
        bias = mask.biases.get(cache_key)
        if bias is None:
            bias = mask.biases[cache_key] = _repeat_rows(mask.shared_bias(query.dtype)[:, :, : mask.start], G)
        parts.append(_folded_part(query[:, :, : mask.start], key, value, bias, scaling, dropout))
    if mask.tail is not None:
        tail = mask.tail.repeat(1, 1, G, 1)
        parts.append(_folded_part(query[:, :, mask.start :], key, value, tail, scaling, dropout))
    return torch.cat(parts, dim=1)


def _rows_kernel_fits(query: torch.Tensor) -> bool:
    """Whether the Triton kernels can serve these rows: they are on for the device and take its
    head dim."""
    from gsa_rag.kernels.dispatch import head_dim_fits, use_kernels

    return head_dim_fits(query.shape[-1]) and use_kernels(query.device)


def _rows_kernel_serves(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Whether `_kernel_rows` runs this attention: it is on, fits, and nothing needs its
    gradient (the kernel has no backward; a training forward of few rows takes SDPA)."""
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return ROWS_KERNEL and not dropout and not needs_grad and _rows_kernel_fits(query)


def _kernel_rows(query, key, value, mask: LayerMask, scaling) -> torch.Tensor:
    """`_sdpa_rows` through gsa_rag.kernels.masked_rows (no dropout) -> [B, Tq, Hq, D]: the shared
    rows under their one mask row per query row, the tail rows under their per-KV-head masks, in
    one launch (in an H200 profile a second launch and combine per layer were mostly fixed
    latency)."""
    from gsa_rag.kernels.masked_rows import masked_rows_triton

    B, Hq, Tq, D = query.shape
    # the kernel finds the tail's first row from its row count: a mask (a plug-in state's) that
    # says otherwise would have rows read from the wrong part
    if mask.tail is not None and mask.start != Tq - mask.tail.shape[2]:
        raise ValueError(f"LayerMask.start is {mask.start} but its tail holds the last {mask.tail.shape[2]} of {Tq} rows")
    out = query.new_empty(B, Tq, Hq, D)
    shared = mask.shared_rows(0, Tq)
    masked_rows_triton(query, key, value, shared, scaling, out=out.transpose(1, 2), tail_mask=mask.tail)
    return out


def _repeat_rows(bias: torch.Tensor, G: int) -> torch.Tensor:
    """[B, 1, r, T] -> [B, 1, G * r, T], G copies of the rows, keeping `bias`'s row stride (on CUDA
    padded to 8 columns by shared_bias: an unaligned bias costs SDPA a copy of it per call)."""
    B, _, r, T = bias.shape
    width = bias.stride(2)
    out = bias.new_empty(B, 1, G, r, width)[..., :T]
    out.copy_(bias[:, :, None].expand(B, 1, G, r, T))
    return out.flatten(2, 3)


def _folded_part(rows, key, value, mask, scaling, dropout) -> torch.Tensor:
    """SDPA of query rows [B, Hq, r, D] folded onto the KV heads, under mask [B, 1 or Hkv, G * r, T]
    -> [B, r, Hq, D]."""
    B, Hq, r, D = rows.shape
    Hkv = key.shape[1]
    folded = rows.reshape(B, Hkv, (Hq // Hkv) * r, D)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(B, Hq, r, D).transpose(1, 2)  # an SDPA kernel may return its output strided


# what a model's attention layer can ask of the attention function beyond q, k, v, the mask, the
# scale and dropout; GSA's masks and kernels implement none of them, and dropping one in **kwargs
# would give other numbers without a word (Gemma 2's logit soft-capping, gpt-oss's sink logits,
# a sliding window on a model check_supported did not see)
_NOT_IMPLEMENTED = {"softcap": "logit soft-capping", "s_aux": "attention sink logits",
                    "sliding_window": "a sliding window", "sinks": "attention sink logits"}


def _refuse_what_it_cannot_honour(module: torch.nn.Module, kwargs: dict) -> None:
    for name, what in _NOT_IMPLEMENTED.items():
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(
                f"{type(module).__name__} asks its attention for {what} ({name}={kwargs[name]!r:.40}); GSA's "
                f"attention does not implement it, so this model cannot run under GSA. Models that work: "
                f"{SUPPORTED_FAMILIES}.")


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
    _refuse_what_it_cannot_honour(module, kwargs)
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

    fast = sparse_decode_attention(module, query, key, value, scaling, gsa_state)
    if fast is not None:  # one decode row on CUDA: key lists + sparse flash-decode (gsa_rag.kernels)
        return fast[0], None
    hook = getattr(gsa_state, "hook", None)  # plug-in states (state_factory) may not have one
    reads_mask = hook is not None and getattr(hook, "reads_mask", True)
    flex = _flex_serves(query, key, value, dropout)
    # a hook that reads the mask is handed it whole: built once then, not row by row in every layer
    mask = layer_mask(gsa_state, module.layer_idx, query, key, lazy=flex and not reads_mask)
    if hook is not None:
        hook(module.layer_idx, query, key, value, mask.full() if reads_mask else None)
    gsa_state.attended[module.layer_idx] = mask.last_row().sum(-1)
    if flex:
        return _flex_rows(query, key, value, mask, scaling, gsa_state), None
    return _masked_attention(query, key, value, mask, scaling, dropout), None


def _masked_attention(query, key, value, mask: LayerMask, scaling, dropout) -> torch.Tensor:
    """Attention of the rows under their LayerMask through SDPA or the rows kernel -> [B, Tq, Hq, D]."""
    Hq, Hkv = query.shape[1], key.shape[1]
    gqa = Hq != Hkv
    if gqa and query.device.type != "cpu":
        # on CUDA, SDPA's enable_gqa with a mask falls back to the math kernel, which builds the
        # [B, Hq, Tq, T] score matrix: for a few rows the query heads fold onto their KV head, else
        # repeated K/V (Hq x T x D) are far cheaper. CPU's flash kernel takes GQA and a mask, so
        # there either would only cost memory.
        if query.shape[2] <= FOLD_MAX_ROWS:
            if _rows_kernel_serves(query, key, value, dropout):
                return _kernel_rows(query, key, value, mask, scaling)
            return _sdpa_rows_folded(query, key, value, mask, scaling, dropout)
        key, value = key.repeat_interleave(Hq // Hkv, dim=1), value.repeat_interleave(Hq // Hkv, dim=1)
        gqa = False
    return _sdpa_rows(query, key, value, mask, scaling, dropout, gqa)


# Prefill forwards of at least this many query rows run their forgetting-mask rows through
# FlexAttention (gsa_rag.kernels.prefill.masked_prefill) on these devices: blocks the mask leaves
# empty are skipped, K/V are not repeated per query head, no float bias is built, and the mask is
# made a band of rows at a time (`LayerMask.rows`), never whole, where SDPA under a mask computes
# every pair. On an H200 a whole prefill forward of the default model's shapes took 0.61x / 0.29x /
# 0.18x the time at 16K / 32K / 64K (0.93x HF's dense causal at 32K), its peak memory 1.2 GB
# against 6.3 at 32K (HF's 1.2); Llama-3-8B's shapes 0.58x / 0.39x at 16K / 32K. Below 16K it was
# slower for the default model (a plan per forward, a compiled call per layer): benchmarks/engine_prefill.py,
# benchmarks/results/engine_prefill/. The tail rows (question, answer) keep their own path.
# False restores SDPA.
FLEX_PREFILL = True
FLEX_MIN_ROWS = 16384
FLEX_DEVICES = ("cuda",)  # the CPU runs FlexAttention eagerly (every pair): tests only
# why FlexAttention failed in this process (its compile, typically), after which prefills take SDPA
_FLEX_FAILED: str | None = None


def _flex_serves(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Whether `_flex_rows` runs this attention: on, enough rows, a device it serves with the
    kernels on (GSA_RAG_KERNELS=0 keeps SDPA), a head dim the kernels take, nothing needs its
    gradient (training forwards keep SDPA), and it has not failed in this process."""
    from gsa_rag.kernels.dispatch import head_dim_fits, kernels_off

    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return (FLEX_PREFILL and _FLEX_FAILED is None and query.shape[2] >= FLEX_MIN_ROWS
            and query.device.type in FLEX_DEVICES and not kernels_off() and head_dim_fits(query.shape[-1])
            and not dropout and not needs_grad)


def _flex_rows(query, key, value, mask: LayerMask, scaling, state) -> torch.Tensor:
    """The forward's rows before its first tail row through FlexAttention under the shared mask,
    the rest (tail rows; in layers that do not select, the same rows under the shared mask)
    through `_masked_attention` -> [B, Tq, Hq, D]. Every layer thus runs the same rows through
    one plan, built once per forward (keys moved sink/gist/link-first when the layout is known)."""
    global _FLEX_FAILED
    from gsa_rag.kernels import prefill

    split = mask.start
    tail_rows = getattr(state, "tail_rows", None)  # GistState's (a wrapper's, through it); a plug-in may have none
    rows = tail_rows() if callable(tail_rows) else None
    if rows is not None:
        split = min(split, rows.start)
    parts = []
    if split > 0:
        cache_key = ("flex", split)
        try:
            plan = mask.biases.get(cache_key)
            if plan is None:
                layout, recall = getattr(state, "layout", None), None
                if layout is not None and layout.seq_len == key.shape[2]:
                    recall = prefill.front_columns(layout)
                plan = mask.biases[cache_key] = prefill.masked_prefill_plan(
                    lambda lo, hi: mask.shared_rows(lo, hi)[:, 0], recall, size=(key.shape[0], split, key.shape[2]))
            out = prefill.masked_prefill(query[:, :, :split], key, value, plan, scaling)
        except torch.OutOfMemoryError:
            raise  # SDPA under the same mask needs more memory, not less
        except Exception as err:  # noqa: BLE001  (a compile that cannot run here: Inductor, Triton, a C compiler)
            _FLEX_FAILED = f"{type(err).__name__}: {err}"
            warnings.warn(f"FlexAttention prefill failed ({_FLEX_FAILED[:300]}); prefills take SDPA from now on "
                          "(gsa_rag.attention.FLEX_PREFILL = False skips the attempt)", RuntimeWarning, stacklevel=2)
            return _masked_attention(query, key, value, mask, scaling, 0.0)
        parts.append(out.transpose(1, 2))
    if split < mask.num_rows:
        rest = LayerMask(mask.shared_rows(split, mask.num_rows), mask.start - split, mask.tail)
        parts.append(_masked_attention(query[:, :, split:], key, value, rest, scaling, 0.0))
    return torch.cat(parts, dim=1)


def _padding_mask(*args, attention_mask=None, **kwargs):
    """transformers' mask for the "gsa" function: SDPA's when the caller gave a padding mask (a
    user calling the model without a gsa_state, where the function is plain SDPA), else none, so
    the engine's forwards (which give none, the state holds the rule) never build a [Tq, T] mask."""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register("gsa", gsa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("gsa", _padding_mask)
