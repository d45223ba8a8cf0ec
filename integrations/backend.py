"""GistBackend: one GistEngine behind every framework adapter (LlamaIndex, LangChain).

A framework hands the backend a finished prompt (a string, or chat messages); the backend
finds the passages in it (`prompt_split.split_prompt`: stored GistMemory passages matched
verbatim, else the context block of LlamaIndex's standard QA templates, else nothing: the
whole prompt raw, exactly the unmodified model) and runs the engine on that split.

Threads: generation is serialised by the engine's own lock (`engine_lock`: backends sharing an
engine share it; re-entrant within a thread, releasable from another, see
gsa_rag.locking.GenerationLock), held for the whole of a `complete` call and, for `stream`,
from the first piece until the stream is exhausted or closed. So one backend used from many threads
gives exactly the answers of sequential calls; a stream left half-read holds the lock until it
is closed or garbage-collected (iterate it to the end, or call `.close()`).

Memory: an engine a backend loads itself (no `engine=`) goes into a process-wide cache keyed by
(model, adapter, config, device), so adapters built with equal arguments share one model. That
cache is never emptied: the model stays loaded for the life of the process even after every
backend using it is gone. To control its lifetime, load the engine yourself
(`GistEngine.from_pretrained(...)`) and pass `engine=` (or a GistMemory) instead.

Example:
    >>> backend = GistBackend()                       # the trained default model, loaded on first use
    >>> backend.complete("Context information is below.\\n---------------------\\n"
    ...                  "Hamlet is a tragedy by William Shakespeare.\\n---------------------\\n"
    ...                  "Given the context information and not prior knowledge, answer the query.\\n"
    ...                  "Query: Who wrote Hamlet?\\nAnswer: ", max_new_tokens=8).text
    >>> "".join(backend.stream([{"role": "user", "content": "Say hi."}], max_new_tokens=4))
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.integrations.prompt_split import ContextPattern, PromptPlan, split_prompt
from gsa_rag.layout import TOKENIZER_LOCK
from gsa_rag.locking import GenerationLock
from gsa_rag.prompt import SegmentPrompt, as_passage, build_message_segments, build_reuse_segments
from gsa_rag.validation import check_stop

_ENGINES: dict[tuple, GistEngine] = {}  # engines loaded by backends, shared by equal arguments
_LOAD_LOCK = threading.Lock()


@dataclass
class Completion:
    """One generation.

    Attributes:
        text: the generated text (cut before a stop string).
        prompt_tokens: tokens of the prompt as laid out for the model, gists not counted.
        completion_tokens: tokens of `text` (re-tokenized).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int


def default_config(model: str | None = None, adapter: str | None = "default", **overrides) -> GistConfig:
    """The GistConfig `GistEngine.from_pretrained(model, adapter=adapter)` would use, with overrides.

    Example:
        >>> default_config(top_k=2).top_k
        2
    """
    import dataclasses

    from gsa_rag.adapters import adapter_config, bundled_default_adapter

    if adapter == "default":
        adapter = bundled_default_adapter() if model is None else None
    config = adapter_config(adapter) if adapter is not None else GistConfig()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **overrides) if overrides else config


def call_sampling(kwargs: dict, *, max_new_tokens: int, temperature: float, top_p: float, seed: int | None) -> dict:
    """A framework call's sampling keywords over the model's fields: `max_new_tokens` (or
    `max_tokens`), `temperature`, `top_p`, `seed`. A keyword given as None counts as not given
    (frameworks pass their unset options as None), except `seed`, where None is unseeded. The
    engine checks what remains, with errors that name the argument."""

    def given(*names, default):
        return next((kwargs[n] for n in names if kwargs.get(n) is not None), default)

    return {"max_new_tokens": given("max_new_tokens", "max_tokens", default=max_new_tokens),
            "temperature": given("temperature", default=temperature), "top_p": given("top_p", default=top_p),
            "seed": kwargs.get("seed", seed)}


def engine_lock(engine: GistEngine) -> GenerationLock:
    """The lock every backend (and GistMemoryRetriever) over `engine` holds while it runs the
    model: the engine's own (GistEngine.generate and stream take it too)."""
    return engine._lock


class GistBackend:
    """A GistEngine (and optional GistMemory) that answers framework prompts.

    Args:
        engine: an engine to use; None loads one on first use from the arguments below
            (backends given equal arguments share one loaded engine).
        model: HF id, directory or .gguf; None for the default model.
        adapter: gist adapter directory; "default": the bundled trained adapter of the
            default model; None: none.
        config: GistConfig (default: the adapter's).
        device: where the model runs (default: CUDA if available, else CPU).
        memory: a GistMemory; prompts quoting its passages reuse their cached KV.
        patterns: context patterns for prompts without memory passages (default: LlamaIndex's
            standard QA templates, when llama-index-core is installed).
    """

    def __init__(
        self,
        engine: GistEngine | None = None,
        *,
        model: str | None = None,
        adapter: str | None = "default",
        config: GistConfig | None = None,
        device=None,
        memory=None,
        patterns: Sequence[ContextPattern] | None = None,
    ):
        if engine is None and memory is not None:
            engine = memory.engine  # the memory's passages were encoded by its engine
        self._engine = engine
        self._given = engine is not None
        self._load_args = (model, adapter, config, device)
        self._load_lock = threading.Lock()
        self.memory = memory
        self.patterns = None if patterns is None else tuple(patterns)

    @property
    def engine(self) -> GistEngine:
        """The engine (loaded on first access)."""
        if self._engine is None:
            with self._load_lock:
                if self._engine is None:
                    self._engine = _shared_engine(*self._load_args)
        return self._engine

    @property
    def model_name(self) -> str | None:
        """The name of the model this backend answers with, found without loading it: a given
        engine's (or its memory's; `GistEngine.model_name`), else the `model` it loads (None: the
        default model, which each framework names its own way). Frameworks ask for it in str() and
        tracing, which must not load a model."""
        if self._given:
            return self._engine.model_name
        model = self._load_args[0]
        return None if model is None else str(model)

    def plan(self, prompt: str | Sequence[dict]) -> PromptPlan:
        """How `prompt` is split (route, passages); see `prompt_split`."""
        return split_prompt(prompt, self.memory, self.patterns)

    def complete(
        self,
        prompt: str | Sequence[dict],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Completion:
        """Generates a completion for a prompt string or chat messages.

        Args:
            prompt: a string, or messages `[{"role": "system"|"user"|"assistant", "content": str}]`.
            max_new_tokens, temperature, top_p, seed: sampling (temperature 0: greedy).
            stop: strings that end the text (cut before them); one str is one stop string.
        """
        kwargs = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                  "stop": check_stop(stop)}
        engine = self.engine
        with engine_lock(engine):
            question, passages, extra, prompt_tokens = self._engine_call(prompt)
            text = engine.generate(question, passages, **kwargs, **extra)
        return Completion(text, prompt_tokens, self._count(text))

    def stream(
        self,
        prompt: str | Sequence[dict],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Yields the completion piece by piece; the pieces join to `complete(...).text`.
        The engine lock is held from the first piece until the stream ends or is closed."""
        kwargs = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                  "stop": check_stop(stop)}
        engine = self.engine
        with engine_lock(engine):
            question, passages, extra, _ = self._engine_call(prompt)
            yield from engine.stream(question, passages, **kwargs, **extra)

    def count_prompt_tokens(self, prompt: str | Sequence[dict]) -> int:
        """Tokens of the prompt as laid out for the model (gists not counted)."""
        return self._engine_call(prompt)[3]

    def _engine_call(self, prompt):
        """(question, passages, extra engine kwargs, prompt tokens) for engine.generate/stream."""
        plan = self.plan(prompt)
        tokenizer = self.engine.tokenizer
        if plan.route == "memory":
            memory = self.memory
            passages = [memory.passage(pid) for pid in plan.passage_ids]
            segments = build_reuse_segments(tokenizer, plan.question, [as_passage(p) for p in passages],
                                            memory.link_ids, memory.system)
            extra = {"memory": memory, "system": memory.system}
            return plan.question, plan.passage_ids, extra, sum(len(s.ids) for s in segments)
        segments = build_message_segments(tokenizer, plan.messages)
        return SegmentPrompt(tuple(segments)), None, {}, sum(len(s.ids) for s in segments)

    def _count(self, text: str) -> int:
        if not text:
            return 0
        with TOKENIZER_LOCK:  # a fast tokenizer's special-token flag is shared state (see layout.TOKENIZER_LOCK)
            return len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])


def _shared_engine(model, adapter, config, device) -> GistEngine:
    key = (model, str(adapter), None if config is None else json.dumps(config.to_dict(), sort_keys=True), str(device))
    with _LOAD_LOCK:  # one load per key, even when several threads ask at once
        if key not in _ENGINES:
            _ENGINES[key] = GistEngine.from_pretrained(model, config=config, adapter=adapter, device=device)
        return _ENGINES[key]


async def iterate_in_thread(make: Callable[[], Iterator]) -> AsyncIterator:
    """Runs a synchronous iterator to the end on one worker thread and yields its items.

    For the frameworks' async streams (LangChain `_astream`, LlamaIndex `astream_*`): the event
    loop never blocks on the model, and the stream stays on one thread (the engine's lock, held
    across a stream, is re-entrant by thread id, so a stream hopping between pool threads would
    let a pooled thread re-enter it while the stream is paused). When the consumer stops early,
    the worker closes the iterator (releasing the lock) at its next item.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    end = object()

    def work() -> None:
        error = None
        try:
            with closing(make()) as items:
                for item in items:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, (item, None))
        except BaseException as raised:  # noqa: BLE001 - handed to the consumer and raised there
            error = raised
        finally:  # always, so the consumer never waits for an item that cannot come
            loop.call_soon_threadsafe(queue.put_nowait, (end, error))

    worker = loop.run_in_executor(None, contextvars.copy_context().run, work)  # callbacks and tracing see the caller's context
    try:
        while True:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is end:
                break
            yield item
    finally:
        stop.set()
        await worker
