"""Decode steps replayed as one CUDA graph: the model's forward captured once, then one launch a token.

An eager decode step launches a dozen kernels per layer from Python (the key-list kernels and the
model's own ops), so on a GPU the host, not the device, sets the decode speed
(benchmarks/decode_latency.py). A `GraphDecoder` captures one step, the model's forward over the
engine's `DecodeCache` with the key-list kernels, and replays it for every later token. A replay
does the same device work at the same addresses with the same host values each time, so nothing
that changes from step to step may live on the host:

- the cache is pinned (`DecodeCache.pin_columns`): a step writes its K/V at a column read from the
  device, and every layer sees the same W columns (the prefill and every step's);
- the state's layout is the whole generation's W columns, the tokens to come as placeholders; the
  plan's key lists are at their full width, their lengths read at the step number on the device
  (`gist_select._PlanCache.plan_at`), so no step reads a column that is not written yet;
- the step number and the token are device tensors, written before each replay.

Every selection the kernels serve replays: top-k, adaptive k, top-p and H-GSA's coarse-to-fine
levels (whose plan above the chunks is fixed while tail tokens are appended).

The first step runs eagerly (it compiles the kernels and warms the allocator) and the capture
follows it. `graph_decode_refusal` names what a graph cannot serve; the engine decodes eagerly then.

Example:
    >>> decoder = GraphDecoder(model, layout, cache, config, steps=32)   # after the prefill
    >>> logits = decoder.step(token)   # [B, V], the token's forward
    >>> decoder.close()                 # the cache appends again, holding the decoded columns
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref

import torch

from gsa_rag.attention import GistState
from gsa_rag.config import GistConfig
from gsa_rag.decode_cache import DecodeCache
from gsa_rag.layout import GistLayout
from gsa_rag.models import attention_heads, text_config

# fewer decode steps than this run eagerly: a capture costs about what a few eager steps do
GRAPH_MIN_STEPS = 8


@dataclasses.dataclass
class _SideStreams:
    """A decoder's warm-up and capture streams. The caching allocator reuses a freed block only on
    the stream that freed it, so they are handed on with the decoder's graph when it closes: the
    next decoder's warm-up and capture then reuse this one's memory."""

    warm: torch.cuda.Stream
    capture: torch.cuda.Stream


# per CUDA device, the graph of the last closed decoder and its streams: kept (with the graph's
# memory pool) until the next capture on the device takes them over, so generation after
# generation reuses one pool's memory. A pool whose graphs are all gone cannot be captured into
# again, and its memory would stay reserved until the allocator empties its cache. A retired
# graph never replays, so sharing its pool is safe; live decoders (interleaved generations) never
# share one. `reset_graphs` drops them.
_RETIRED: dict[int, tuple[torch.cuda.CUDAGraph, _SideStreams]] = {}
# models whose capture failed, and why: PyTorch never releases a failed capture's memory pool, so
# a model that cannot be captured is not tried again (each generation would leak a pool)
_CAPTURE_FAILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _capture_generator() -> torch.Generator:
    """The generator a capture on the current CUDA device registers: that device's default one."""
    return torch.cuda.default_generators[torch.cuda.current_device()]


@contextlib.contextmanager
def rng_kept_on_failed_capture():
    """Around a CUDA graph capture: where it fails, the device's default generator gets back its
    state from before. PyTorch's capture_end raises before it takes the generator out of capture
    mode, and then every random op on the device fails ("Offset increment outside graph capture
    encountered unexpectedly", torch 2.11 at least): sampling after a decode that fell back to
    eager steps would. The failed capture's draws never ran, so its state before is the right one."""
    rng = _capture_generator()
    before = rng.clone_state()
    try:
        yield
    except BaseException:
        rng.graphsafe_set_state(before)
        raise


def reset_graphs() -> None:
    """Drops the retired decoders' graphs (`torch.cuda.empty_cache()` can then free their memory
    pools) and forgets failed captures, so their models are captured again."""
    _RETIRED.clear()
    _CAPTURE_FAILED.clear()


@dataclasses.dataclass
class GraphStepState(GistState):
    """The state of a replayed step: the kernel path (gsa_rag.kernels.dispatch) serves every layer,
    with the plan `GraphDecoder` sets before each forward. The dense mask path would read the
    placeholder columns, so it is refused instead."""

    graph_step = True  # a class attribute, not a field: dispatch reads it

    def layer_mask(self, layer_idx, query, key):
        raise RuntimeError(
            f"layer {layer_idx} of a CUDA-graph decode step did not take the key-list kernels "
            "(gsa_rag.graph_decode_refusal should have refused this model or config); decode with cuda_graph=False"
        )


def graph_decode_refusal(model, layout: GistLayout, cache, config: GistConfig, steps: int) -> str | None:
    """Why a `GraphDecoder` cannot decode `steps` tokens after this prefill, or None when it can."""
    from gsa_rag.cache import GistCache
    from gsa_rag.kernels.dispatch import head_dim_fits, use_kernels

    if steps < 1:
        return "no steps to decode"
    failed = _CAPTURE_FAILED.get(model)
    if failed is not None:
        return f"this model's CUDA graph capture failed before ({failed}; gsa_rag.graph_decode.reset_graphs() retries)"
    head_dim = attention_heads(model.config)[2]
    if not head_dim_fits(head_dim):
        return f"head dim {head_dim} is not one the kernels take (a power of two >= 16)"
    if getattr(model.config, "_attn_implementation", None) != "gsa":
        return "the model does not run gist attention (attn_implementation='gsa')"
    text = text_config(model.config)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "dynamic":
        return "dynamic NTK RoPE picks its frequencies on the host from the length so far"
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        return f"the model is spread over {len(devices)} devices"
    if not isinstance(cache, DecodeCache):
        return f"a {type(cache).__name__} cannot pin its columns (the engine's DecodeCache can)"
    if isinstance(cache, GistCache) and (cache.pending is not None or cache.has_work()):
        return "gist memory's cache fetches offloaded KV or records queries on the host at every step"
    if not cache.pinnable():
        return "the cache's layers are not all filled buffers of the DecodeCache (replaced or unfilled)"
    room = min((layer.capacity - layer.get_seq_length() for layer in cache.layers), default=0)
    if room < steps:
        return f"the cache has room for {room} more columns, not {steps}"
    device = layout.input_ids.device
    if not use_kernels(device):
        return "the key-list kernels are off (GSA_RAG_KERNELS or no Triton)"
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


class GraphDecoder:
    """Decodes up to `steps` tokens after a prefill, the second and later as replays of one graph.

    Args:
        model: the model (attn_implementation "gsa", or any for `full_attention`).
        layout: the sequence after the prefill; `cache` holds its columns.
        cache: the prefill's DecodeCache, with room for `steps` more columns (pinned until `close`).
        config: the gist config.
        steps: the most tokens `step` is called with.
        full_attention: attend to every written column (a bool mask, no gist rule): the dense
            baseline of benchmarks/decode_latency.py, under the same graph.
        capture: replay a CUDA graph (default on CUDA); False runs every step eagerly through the
            same pinned code (what the CPU tests check against the engine's loop).
    """

    def __init__(self, model, layout: GistLayout, cache: DecodeCache, config: GistConfig, steps: int, *,
                 full_attention: bool = False, capture: bool | None = None):
        from gsa_rag.generation import _cache_keyword

        device = self.device = layout.input_ids.device
        self.model, self.cache, self.steps = model, cache, steps
        self.batch, self.start, self.width = layout.batch_size, layout.seq_len, layout.seq_len + steps
        self.capture = device.type == "cuda" if capture is None else capture
        self.taken = 0
        self._cache_kw = _cache_keyword(model)
        self._n = torch.zeros(1, dtype=torch.long, device=device)  # the step number
        self._ids = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        self._column = torch.full((1,), self.start, dtype=torch.long, device=device)
        self._first_position = layout.position_ids[:, -1:] + 1
        self._graph = self._graph_logits = self._graph_attended = None
        self.state = None
        if full_attention:
            self._columns = torch.arange(self.width, device=device)
        else:
            from gsa_rag.kernels.gist_select import DecodePlan, _PlanCache
            from gsa_rag.kernels.hier_select import HierPlan

            heads, kv_heads, _ = attention_heads(model.config)
            group = heads // kv_heads
            first = layout.append(torch.zeros(self.batch, 1, dtype=torch.long, device=device))
            whole = first.append(torch.zeros(self.batch, steps - 1, dtype=torch.long, device=device))
            flat = DecodePlan.build_full(first, config, group)
            self._plans = _PlanCache(first, flat, group, room=steps - 1)
            # H-GSA: the levels above the chunks depend only on the closed part of the layout (tail
            # tokens are never gists), so one hierarchical plan serves every step around its flat plan
            self._hier = HierPlan.build(first, config, group, flat) if layout.levels > 1 else None
            self.state = GraphStepState(whole, torch.arange(self.width - 1, self.width, device=device), config)
        cache.pin_columns(self._column, self.width)

    def _forward(self) -> torch.Tensor:
        """One step at column start + n, every value read from the device: [B, V] logits."""
        torch.add(self._n, self.start, out=self._column)
        kwargs = {}
        if self.state is None:
            visible = self._columns <= self._column
            kwargs["attention_mask"] = visible.expand(self.batch, 1, 1, self.width)
        else:
            plan = self._plans.plan_at(self._n)
            self.state._decode_plan = plan if self._hier is None else dataclasses.replace(self._hier, flat=plan)
            self.state.attended = {}
            kwargs["gsa_state"] = self.state
        out = self.model(input_ids=self._ids, position_ids=self._first_position + self._n, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: self.cache}, **kwargs)
        return out.logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """The forward of `token` (long [B] or [B, 1]), appended after the tokens before it: [B, V]
        logits. A replay's logits are the graph's output tensor, overwritten by the next step."""
        if self.taken >= self.steps:
            raise RuntimeError(f"this GraphDecoder was made for {self.steps} steps")
        if self.cache is None:
            raise RuntimeError("this GraphDecoder is closed")
        self._ids.copy_(token.reshape(self.batch, 1))
        self._n.fill_(self.taken)
        if not self.capture:
            logits = self._forward()
        elif self._graph is None:
            logits = self._warm_then_capture()
        else:
            self._graph.replay()
            logits = self._graph_logits
            if self.state is not None:
                self.state.attended = self._graph_attended
        self.taken += 1
        return logits

    def _warm_then_capture(self) -> torch.Tensor:
        """This step eagerly on a side stream (kernel compiles, allocator and cuBLAS warm-up stay out
        of the capture, as torch.cuda.graph asks), then the capture for the steps after it. Streams
        are made on the model's device (a capture on another device's stream would record nothing
        and replay nothing). Where the capture fails, the later steps run eagerly."""
        with torch.cuda.device(self.device):
            retired = _RETIRED.pop(self.device.index, None)
            pool_of, self._streams = retired or (None, _SideStreams(torch.cuda.Stream(), torch.cuda.Stream()))
            side = self._streams.warm
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._forward().clone()  # the captured forward's outputs would alias these
                attended = dict(self.state.attended) if self.state is not None else None
            torch.cuda.current_stream().wait_stream(side)
            captured = self.taken + 1 < self.steps and self._capture(pool_of)
            if not captured and retired is not None:  # its pool and streams serve a later capture
                _RETIRED.setdefault(self.device.index, retired)
        if attended is not None:
            self.state.attended = attended  # this step's counts (the capture ran nothing)
        return logits

    def _capture(self, pool_of: torch.cuda.CUDAGraph | None) -> bool:
        """The capture of one step, in the memory pool of `pool_of` (a retired graph) or a new one;
        False where it failed (the later steps then run eagerly). Not through `torch.cuda.graph`:
        before every capture it synchronises and empties the device's and the pinned host memory's
        caches, so each generation's prefill and transfers paid cudaMalloc and cudaHostAlloc again
        (at batch 1 on the default model, a question took longer with graphs than without)."""
        graph = torch.cuda.CUDAGraph()
        pool = () if pool_of is None else (pool_of.pool(),)
        try:
            with rng_kept_on_failed_capture(), torch.cuda.stream(self._streams.capture):
                # thread_local: CUDA calls of the application's other threads neither break the capture nor fail
                graph.capture_begin(*pool, capture_error_mode="thread_local")
                try:
                    logits = self._forward()
                except BaseException:
                    with contextlib.suppress(RuntimeError):  # the capture is invalid: the forward's error is the cause
                        graph.capture_end()
                    raise
                graph.capture_end()
        except RuntimeError as err:  # e.g. a forward that reads the device on the host (CUDA errors are RuntimeErrors)
            reason = f"{type(err).__name__}: {err}"
            _CAPTURE_FAILED[self.model] = reason
            warnings.warn(f"decode steps run eagerly: their CUDA graph capture failed ({reason})", RuntimeWarning, stacklevel=4)
            self.capture = False
            return False
        self._graph, self._graph_logits = graph, logits
        self._graph_attended = self.state.attended if self.state is not None else None
        return True

    def observed_state(self) -> GistState | None:
        """The last step's state with its attended counts copied (a replay overwrites them in place).
        Its layout is the whole generation's (W columns, the tokens still to come as placeholders)."""
        if self.state is None:
            return None
        return dataclasses.replace(self.state, attended={i: t.clone() for i, t in self.state.attended.items()})

    def close(self) -> None:
        """Unpins the cache: it holds the prefill and the decoded columns, and appends again. The
        graph retires: the next decoder on the device captures into its memory pool (`_RETIRED`;
        `reset_graphs` drops it)."""
        if self.cache is not None:
            self.cache.unpin(self.start + self.taken)
            self.cache = None
            if self._graph is not None:
                _RETIRED[self.device.index] = (self._graph, self._streams)  # the previous retired graph goes
            self._graph = self._graph_logits = self._graph_attended = None
