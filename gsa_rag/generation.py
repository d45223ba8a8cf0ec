"""The decode loop, gpt-fast style: `prefill`, `decode_one_token`, `sample`, `generate_tokens`.

The engine owns this loop because `model.generate()` rejects the `gsa_state` keyword that
every forward must carry. Selection is redone at every step, in every selecting layer.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from gsa_rag.attention import GistState
from gsa_rag.cache import GistCache
from gsa_rag.config import GistConfig
from gsa_rag.decode_cache import DecodeCache
from gsa_rag.errors import InputError, InputTypeError, UnsupportedModelError
from gsa_rag.layout import GistLayout

# (layout, num_new, config) -> the state the attention function reads (GistState or a plug-in's)
StateFactory = Callable[[GistLayout, int, GistConfig], GistState]


@dataclass
class SamplingParams:
    """How the next token is picked.

    Attributes:
        max_new_tokens: stop after this many tokens.
        temperature: 0 is greedy; any finite value > 0 samples (a tiny one picks like greedy, a
            huge one uniformly among the tokens that may be produced).
        top_p: nucleus sampling mass (with temperature > 0).
        seed: None or an int torch takes, [-2**63, 2**64 - 1]; seeds the sampling generator
            (ignored when greedy, but checked: a seed that cannot work is refused either way).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, numbers.Integral):
            raise InputTypeError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.temperature = _number("temperature", self.temperature, "a number >= 0 (0 is greedy)")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        self.top_p = _number("top_p", self.top_p, "a number in (0, 1] (1 turns nucleus sampling off)")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1] (1 turns nucleus sampling off), got {self.top_p}")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
                raise InputTypeError(f"seed must be None or an int, got {type(self.seed).__name__} {self.seed!r}")
            self.seed = int(self.seed)  # torch's generator takes a Python int only (not numpy's)
            if not -(2**63) <= self.seed < 2**64:
                raise InputError(f"seed must be in [-2**63, 2**64 - 1] (what torch's generator takes), got {self.seed}")


def _number(name: str, value, rule: str) -> float:
    """`value` as a float, or InputTypeError naming `name` (a bool is refused: True is a slip, not 1.0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be {rule}, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int past float's range: refused as not finite
        return math.inf


def _cache_keyword(model) -> str:
    # transformers renamed past_key_values to cache (5.2x); support both
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def forward(model, layout: GistLayout, num_new: int, cache: DynamicCache, config: GistConfig, *,
            state_factory: StateFactory | None = None, **kwargs):
    """Runs the model on the last `num_new` columns of `layout`, appending to `cache`.

    With a `GistCache` (gist memory) that still has open columns, those columns run instead
    (their count must be `num_new`); every layer's mask goes through the cache's hook when the cache
    has work for it (`GistCache.has_work`: offloaded raw KV to fetch, queries or observers).

    `state_factory(layout, num_new, config)` makes the per-forward state the attention function
    reads (default `GistState.for_new_tokens`); a plug-in (e.g. gsa_rag.eval.quest) passes its
    own object with the same `mask_for_layer` / `attended` interface.

    Returns:
        (CausalLMOutput, GistState) — the state holds per-layer attended-key counts.
    """
    if isinstance(cache, GistCache) and cache.pending is not None:
        # gist memory: run the cache's open columns (link tokens between passages, the question)
        columns = cache.pending
        if len(columns) != num_new:
            raise ValueError(f"this GistCache has {len(columns)} open columns, not {num_new}")
        state = GistState(layout, columns, config)
        state._q_host = cache.pending_host  # no device read to find the question's rows
    else:
        columns = slice(layout.seq_len - num_new, None)
        state = (state_factory or GistState.for_new_tokens)(layout, num_new, config)
    if isinstance(cache, GistCache) and cache.has_work():
        state.hook = cache.hook  # fetches offloaded raw KV of the chunks each layer unfolds
    out = model(
        input_ids=layout.input_ids[:, columns],
        position_ids=layout.position_ids[:, columns],
        use_cache=True,
        gsa_state=state,
        **{_cache_keyword(model): cache},
        **kwargs,
    )
    if num_new > 1:  # (one decode row on CUDA may take the kernel path, which records nothing)
        check_state_reached(model, state)
    return out, state


def check_state_reached(model, state) -> None:
    """Raises unless the forward's attention saw `state`: some architectures' decoder layers drop
    the keywords they do not know, and the attention then runs plain causal, silently."""
    if isinstance(getattr(state, "attended", None), dict) and not state.attended:
        raise UnsupportedModelError(
            f"{type(model).__name__}'s decoder layers do not pass attention keywords (gsa_state) down to their "
            "attention, so gist attention cannot run in this architecture (Llama, Qwen2/3 and Mistral families can)"
        )


def sample(logits: torch.Tensor, params: SamplingParams, banned: torch.Tensor | None, generator=None) -> torch.Tensor:
    """[B, V] logits -> [B] next ids. Banned ids (gist and link tokens) are never produced."""
    logits = logits.float()
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned, float("-inf"))
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(_scale(logits, params.temperature), dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, for every finite temperature > 0. Each row is shifted to a max of 0
    first, and kept exact where float32 division cannot be: 0 stays 0 (a temperature below float32's
    range divides it to NaN) and -inf (banned) stays -inf (one above it gives -inf / inf = NaN).
    So a tiny temperature picks among the row's best logits, a huge one uniformly among the
    finite ones."""
    shifted = logits - logits.amax(-1, keepdim=True)
    scaled = (shifted / temperature).masked_fill(shifted == 0, 0.0)
    return scaled.masked_fill(shifted == float("-inf"), float("-inf"))


@torch.inference_mode()
def generate_tokens(
    model,
    layout: GistLayout,
    config: GistConfig,
    params: SamplingParams,
    stop_ids: set[int],
    banned: torch.Tensor | None = None,
    observe: Callable[[GistState], None] | None = None,
    state_factory: StateFactory | None = None,
    cache: DynamicCache | None = None,
    cuda_graph: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Yields [B] next-token ids, one step at a time, until every row hit a stop id or the
    budget. Rows that finished keep receiving their stop id (callers ignore them).
    `observe` sees the GistState of every forward (prefill, then each decode step);
    `state_factory` is passed to `forward` (default: GistState).
    `cache`: a pre-filled cache whose columns are the first columns of `layout` (e.g. a
    `GistCache` from gist memory); the prefill then runs only the rest. Default: a
    `DecodeCache` with room for the whole answer (a decode step writes its one column; a
    DynamicCache would copy every layer's KV each step).
    `cuda_graph`: decode steps replayed as one CUDA graph (`gsa_rag.graph_decode`; the logits are
    the eager steps' up to rounding). None: where `graph_decode_refusal` allows it and at least
    GRAPH_MIN_STEPS steps follow the prefill; True: always (ValueError naming why it cannot);
    False: never. Under a graph, `observe` gets a copy of each step's state.
    """
    device = layout.input_ids.device
    generator = None
    if params.temperature > 0 and params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    if cache is None:
        cache = DecodeCache(reserve=params.max_new_tokens)
    num_new = layout.seq_len - cache.get_seq_length()
    out, state = forward(model, layout, num_new, cache, config, state_factory=state_factory, logits_to_keep=1)
    logits = out.logits[:, -1]
    stops = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
    done = torch.zeros(layout.batch_size, dtype=torch.bool, device=device)
    decoder = None
    try:
        decoder = _graph_decoder(model, layout, cache, config, params.max_new_tokens - 1, state_factory, cuda_graph)
        for step in range(params.max_new_tokens):
            if observe is not None:
                observe(state)
            token = sample(logits, params, banned, generator)
            if stops.numel():
                token = torch.where(done, stops[0], token)
                done |= torch.isin(token, stops)
            yield token
            if bool(done.all()) or step == params.max_new_tokens - 1:
                return
            if decoder is not None:
                logits = decoder.step(token)
                state = decoder.observed_state() if observe is not None else None
                continue
            layout = layout.append(token[:, None])
            out, state = forward(model, layout, 1, cache, config, state_factory=state_factory)
            logits = out.logits[:, -1]
    finally:
        if decoder is not None:
            decoder.close()


def _graph_decoder(model, layout: GistLayout, cache, config: GistConfig, steps: int, state_factory,
                   cuda_graph: bool | None):
    """The GraphDecoder of `generate_tokens`' decode steps, or None to decode eagerly."""
    from gsa_rag.graph_decode import GRAPH_MIN_STEPS, GraphDecoder, graph_decode_refusal

    if cuda_graph is False or steps < 1 or (cuda_graph is None and steps < GRAPH_MIN_STEPS):
        return None
    reason = "a state_factory's states take their own path" if state_factory is not None else None
    reason = reason or graph_decode_refusal(model, layout, cache, config, steps)
    if reason is not None:
        if cuda_graph:
            raise ValueError(f"cuda_graph=True cannot decode here: {reason}; pass cuda_graph=None or False")
        return None
    return GraphDecoder(model, layout, cache, config, steps)
