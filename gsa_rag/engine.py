"""GistEngine: model + tokenizer + GistConfig; answers questions over passages.

Example:
    >>> engine = GistEngine.from_pretrained()            # the default model
    >>> engine.generate("Who wrote Hamlet?", ["Hamlet is a tragedy by William Shakespeare."])
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from gsa_rag import validation
from gsa_rag.config import GistConfig
from gsa_rag.errors import AdapterMismatchError, ConfigError, InputError, InputTypeError
from gsa_rag.generation import SamplingParams, generate_tokens
from gsa_rag.layout import GistLayout, build_layout, encode_text
from gsa_rag.locking import GenerationLock, locked, locked_generator
from gsa_rag.prompt import DEFAULT_SYSTEM, OWN_SYSTEM, SegmentPrompt, build_segments

logger = logging.getLogger(__name__)
MERGED_ADAPTER = "_gsa_rag_merged_adapter"  # set on a model whose weights hold an adapter's merged LoRA


class GistEngine:
    """Gist Sparse Attention over a Hugging Face causal LM.

    Args:
        model: a causal LM loaded with `attn_implementation="gsa"` (see models.load_model).
        tokenizer: its tokenizer, holding the gist tokens.
        config: chunking and selection settings.

    Attributes:
        cuda_graphs: how decode steps run on CUDA (`generate_tokens`' cuda_graph): None replays
            them as one CUDA graph where `gsa_rag.graph_decode` can and at least GRAPH_MIN_STEPS
            follow the prefill, True always (an error naming why not where it cannot), False never.

    Thread safety: `generate` and `stream` hold a re-entrant lock, so threads sharing one
    engine take turns (results equal sequential runs). A stream holds the lock from its first
    piece until it is exhausted or closed: consume it (or `close()` it) in the thread that
    started it, and do not leave it half read while other threads wait on the engine.
    """

    def __init__(self, model, tokenizer, config: GistConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or GistConfig()
        if model.config._attn_implementation != "gsa":
            raise ConfigError("the model must be loaded with attn_implementation='gsa' (use GistEngine.from_pretrained)")
        from gsa_rag.models import check_supported

        check_supported(model.config)  # as load_model does: a model built elsewhere is held to the same rule
        special = [tokenizer.convert_tokens_to_ids(t) for t in self.config.special_tokens]
        if None in special or tokenizer.unk_token_id in special:
            raise ConfigError("the tokenizer lacks the gist tokens; load with gsa_rag.models.load_model")
        self._banned = torch.tensor(special, dtype=torch.long, device=self.device)
        self._lock = GenerationLock()  # a stream may be resumed from another thread
        self.adapter: dict | None = None  # the loaded adapter's gsa_adapter.json (from_pretrained sets it)
        self.fused = None  # gsa_rag.fused.FusedParts when from_pretrained(fuse=True) fused the model's kernels
        self._name: str | None = None  # the model as from_pretrained was asked for it
        self.cuda_graphs: bool | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        config: GistConfig | None = None,
        gguf_file: str | None = None,
        adapter: str | None = "default",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        fuse: bool = False,
    ) -> GistEngine:
        """Loads a model (default: SmolLM2-135M-Instruct, offline) and wraps it.

        Args:
            model: HF id, local directory, or path to a .gguf file; None for the default model.
            config: GistConfig; default: the one the adapter was trained with (or a model
                folder written by `gsa-rag train --full`), else GistConfig(). One whose layout
                (chunk_size, meta_chunks, sink, ...; not top_k and the other selection
                settings) differs from the trained one warns (UserWarning): answers get worse.
            gguf_file: GGUF file name inside `model` (a directory or repo).
            adapter: a gist adapter directory (from `gsa-rag train`); "default" uses the
                trained adapter bundled for the default model when `model` is None and the
                package carries one; None loads the base model alone (untrained gists).
            device: default CUDA when available, else CPU.
            dtype: default bf16 on CUDA, fp32 on CPU.
            fuse: CUDA: run the model's RMSNorms, rotary embedding and SiLU gates through
                Liger's fused kernels (`pip install "gsa-rag[fast]"`; gsa_rag.fused). `engine.fused`
                then lists what was fused.
        """
        from gsa_rag.adapters import bundled_default_adapter, trained_manifest_dir
        from gsa_rag.models import DEFAULT_MODEL_NAME, load_model

        if adapter == "default":
            adapter = bundled_default_adapter() if model is None else None
        trained = trained_manifest_dir(model, adapter)
        config = _trained_config(trained, config)
        lm, tokenizer = load_model(model, gguf_file=gguf_file, gist_config=config, dtype=dtype, device=device)
        engine = cls._wrap(lm, tokenizer, config, adapter, trained, fuse)
        engine._name = str(model) if model is not None else DEFAULT_MODEL_NAME
        return engine

    @classmethod
    def from_model(
        cls,
        model,
        tokenizer,
        *,
        config: GistConfig | None = None,
        adapter: str | None = None,
        fuse: bool = False,
    ) -> GistEngine:
        """Wraps a model loaded some other way than `from_pretrained` loads one (another dtype,
        a fine-tune merged in memory; a model split over devices or quantised is untested).

        The model and tokenizer are changed in place (`gsa_rag.models.prepare_model`): the
        model's attention becomes GSA's, which is plain causal attention when called without a
        gist state (so the model still answers as before outside gsa-rag), the gist tokens are
        added, and the model is put in eval mode. An adapter's LoRA is merged into the weights
        (outside gsa-rag the model then answers as the adapted one); wrapping that model again
        takes adapter=None and keeps the merged adapter's config.

        Args:
            model: a causal LM of a supported family (Llama, Qwen2/3, Mistral, ...).
            tokenizer: its tokenizer.
            config: GistConfig; default: the adapter's trained one, else GistConfig(). One whose
                layout differs from the adapter's warns, as in `from_pretrained`.
            adapter: a gist adapter directory trained on this model's base; "default": the one
                bundled for the default model (refused for any other base); None: untrained gists.
            fuse: as in `from_pretrained`.
        """
        from gsa_rag.adapters import bundled_default_adapter
        from gsa_rag.models import prepare_model

        if adapter == "default":
            adapter = bundled_default_adapter()
        merged = getattr(model, MERGED_ADAPTER, None)
        if merged is not None and adapter is not None:
            raise AdapterMismatchError(f"this model already has the adapter {merged} merged into its weights (an "
                                       "engine was made from it before): wrap it again with adapter=None")
        trained = adapter if adapter is not None else merged
        config = _trained_config(trained, config)
        prepare_model(model, tokenizer, config)
        return cls._wrap(model, tokenizer, config, adapter, trained, fuse)

    @classmethod
    def _wrap(cls, lm, tokenizer, config: GistConfig, adapter, trained, fuse: bool) -> GistEngine:
        """The engine over a prepared model: its adapter merged in (base checked first), the
        trained manifest kept, the fused kernels on request."""
        from gsa_rag.adapters import apply_adapter, base_fingerprint, read_manifest

        if adapter is not None:
            lm = apply_adapter(lm, adapter, base_fingerprint(lm))
            setattr(lm, MERGED_ADAPTER, str(adapter))  # its weights are no longer the base's
        engine = cls(lm, tokenizer, config)
        engine.adapter = read_manifest(trained) if trained is not None else None
        if fuse:
            from gsa_rag.fused import fuse_model

            engine.fused = fuse_model(lm)
        return engine

    @property
    def model_name(self) -> str:
        """The model's name, for what integrations report: as `from_pretrained` was given it (the
        default model's short name for None), so an engine passed to an integration reports what
        that integration would for the same `model`; else transformers' `name_or_path`."""
        return self._name or getattr(self.model, "name_or_path", "") or type(self.model).__name__

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stop_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def layout(self, questions: Sequence[str], passages: Sequence[Sequence], system: str | None = DEFAULT_SYSTEM) -> GistLayout:
        """Lays out a batch of RAG prompts (one passage list per question); a SegmentPrompt
        (prompt.build_message_segments) in place of a question is laid out as it is. A passage
        list is checked as `generate` checks it: None (or []) is closed book."""
        passages = [validation.check_passage_list(p, f"the passages of question {i}") for i, p in enumerate(passages)]
        segments = [_prompt_segments(self.tokenizer, q, p, system) for q, p in zip(questions, passages, strict=True)]
        return build_layout(segments, self.config, self.tokenizer, device=self.device)

    @locked
    def generate(
        self,
        question: str | Sequence[str],
        passages: Sequence | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        system: str | None | object = OWN_SYSTEM,
        observe=None,
        memory=None,
    ) -> str | list[str]:
        """Answers one question, or a batch.

        Args:
            question: a question, or a list of questions (a batch); or a prompt.SegmentPrompt
                (a prompt already split into parts, with passages=None).
            passages: for one question, a list of passages (str, dict with text/title, or
                Passage); for a batch, one such list per question. None or []: closed book.
            max_new_tokens, temperature, top_p, seed: sampling (temperature 0 is greedy).
            stop: strings that end the answer: decoding stops once one appears, and the text is cut
                before it (as `stream` ends it); one str is one stop string.
            system: the system line of the prompt; None for none. By default DEFAULT_SYSTEM, or
                with memory= the memory's own line (its passages' cached KV is encoded under it).
            observe: optional callback given the GistState of every forward (for budgets).
            memory: a GistMemory (gsa_rag.memory): passages are then ids in it or texts
                (added if missing), laid out for KV reuse, and their cached KV is used, never
                re-encoded. An unknown str without whitespace is refused as a mistyped id
                (pass a one-word text as a Passage or dict; see GistMemory.prepare). A batch
                over memory runs one question at a time.

        Returns:
            The answer, or a list of answers for a batch.

        Raises:
            InputError / InputTypeError: an empty question or passage, bytes, wrong types
                (gsa_rag.validation lists the rules).
            ContextTooLongError: the prompt plus max_new_tokens exceeds the model's window
                (unless GistConfig(overflow="drop_passages")).
        """
        questions, passage_lists, single = _as_batch(question, passages)
        stop = validation.check_stop(stop)  # a str is one stop string, not one per character
        if memory is not None and not single:
            kwargs = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                      "stop": stop, "system": system, "observe": observe, "memory": memory}
            return [self.generate(q, p, **kwargs) for q, p in zip(questions, passage_lists)]
        params = SamplingParams(max_new_tokens, temperature, top_p, seed)
        layout, cache = self._prepare(questions, passage_lists, system, memory, max_new_tokens)
        rows: list[list[int]] = [[] for _ in questions]
        stops = self.stop_ids()
        watches = [_StopWatch(lambda ids: self._decode(ids, stops), stop) for _ in rows]
        ended = [False] * len(rows)
        tokens = generate_tokens(self.model, layout, self.config, params, stops, self._banned, observe, cache=cache,
                                 cuda_graph=self.cuda_graphs)
        # closed, not left to the garbage collector: its frame holds the cache (and its KV) until then
        with contextlib.closing(tokens):
            for token in tokens:
                for r, t in enumerate(token.tolist()):
                    if not ended[r]:
                        rows[r].append(t)
                        ended[r] = t in stops or watches[r].reached(rows[r])
                if all(ended):  # an agent's stop=["\nObservation"] must not pay for the rest of max_new_tokens
                    break
        answers = [self._cut_as_streamed(r, stops, stop) for r in rows]
        return answers[0] if single else answers

    @locked_generator
    def stream(
        self,
        question: str,
        passages: Sequence | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        system: str | None | object = OWN_SYSTEM,
        memory=None,
    ) -> Iterator[str]:
        """Yields the answer to one question piece by piece; the pieces join to `generate`'s text.
        Holds the engine's lock until the stream is exhausted or closed (see the class docstring)."""
        questions, passage_lists, single = _as_batch(question, passages)
        if not single:
            raise InputError("stream answers one question; for a batch use generate")
        stop = validation.check_stop(stop)
        params = SamplingParams(max_new_tokens, temperature, top_p, seed)
        layout, cache = self._prepare(questions, passage_lists, system, memory, max_new_tokens)
        stops = self.stop_ids()
        ids: list[int] = []
        sent = ""
        for token in generate_tokens(self.model, layout, self.config, params, stops, self._banned, cache=cache,
                                     cuda_graph=self.cuda_graphs):
            t = int(token[0])
            if t in stops:
                break
            ids.append(t)
            text = self._decode(ids, stops)
            if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                continue
            cut = _cut_at_stop(text, stop)
            if len(cut) < len(text):  # a stop string: the answer ends before it
                if len(cut) > len(sent):
                    yield cut[len(sent) :]
                return
            # hold back a tail that may be the start of a stop string (it spans tokens): once
            # sent, it could not be taken back when the stop string completes
            ready = len(cut) - _stop_prefix_length(cut, stop)
            if ready > len(sent):
                yield cut[len(sent) : ready]
                sent = cut[:ready]
        rest = _cut_at_stop(self._decode_whole(ids, stops), stop)[len(sent) :]  # what was held back
        if rest:
            yield rest

    def _cut_as_streamed(self, ids: list[int], stops, stop: Sequence[str]) -> str:
        """The answer of `ids` as `stream` ends it: at the first token whose text holds a stop
        string, cut before the earliest stop string that text holds. (Cutting the whole text at
        its earliest stop string differs when a longer one starts earlier but completes later.)"""
        whole = self._decode_whole(ids, stops)  # a stop inside a cut last character is no stop
        if not any(s and s in whole for s in stop):
            return whole
        for n in range(1, len(ids) + 1):
            prefix = self._decode(ids[:n], stops)
            if prefix.endswith("\ufffd"):  # a multi-byte character is not complete yet
                continue
            cut = _cut_at_stop(prefix, stop)
            if len(cut) < len(prefix):
                return cut
        return _cut_at_stop(whole, stop)

    def _prepare(self, questions, passage_lists, system, memory, max_new_tokens: int = 0):
        """`_prepare_once`, fitted to the model's window: a prompt that does not fit (raw tokens
        + max_new_tokens) is refused, or with GistConfig(overflow="drop_passages") its last
        passages are dropped until it fits (see gsa_rag.validation)."""
        if system is OWN_SYSTEM:
            system = DEFAULT_SYSTEM if memory is None else memory.system
        window = validation.context_window(self.model)
        while True:
            layout, cache = self._prepare_once(questions, passage_lists, system, memory, max_new_tokens)
            excess = validation.overflow(layout, window, max_new_tokens)
            if not any(excess):
                return layout, cache
            positions = validation.prompt_positions(layout)
            # a SegmentPrompt holds its passages inside its segments: nothing here can drop them
            # (truncating its empty passage list would change nothing and loop forever)
            whole = [r for r, e in enumerate(excess) if e and isinstance(questions[r], SegmentPrompt)]
            if whole:
                raise validation.too_long(positions[whole[0]], max_new_tokens, window, prebuilt=True)
            keep = [validation.passages_to_keep(layout, r, e) if e else None for r, e in enumerate(excess)]
            stuck = [r for r, e in enumerate(excess) if e and keep[r] is None]  # too long even with no passage
            if stuck:
                raise validation.too_long(positions[stuck[0]], max_new_tokens, window, without_passages=True)
            if self.config.overflow == "error":
                raise validation.too_long(positions[next(r for r, e in enumerate(excess) if e)], max_new_tokens, window)
            logger.warning("prompt longer than the model's window (%d): keeping the first %s passages", window,
                           [len(p) if k is None else k for p, k in zip(passage_lists, keep)])
            passage_lists = validation.truncate_lists(passage_lists, keep)

    def _prepare_once(self, questions, passage_lists, system, memory, max_new_tokens: int = 0):
        """(layout, pre-filled cache or None): from gist memory for one question, else a fresh layout."""
        if memory is None:
            return self.layout(questions, passage_lists, system), None
        from gsa_rag.memory import encoding_config

        if isinstance(questions[0], SegmentPrompt):
            raise InputError("a SegmentPrompt is laid out as it is; it cannot be combined with memory=")
        if memory.engine is not self and (memory.engine.model is not self.model or memory.encoding != encoding_config(self.config)):
            raise ConfigError("this GistMemory belongs to another engine (model or gist config); load it with this engine")
        # room in the cache for the answer, so decoding never regrows the buffers
        return memory.prepare(questions[0], passage_lists[0], system, max_new_tokens=max_new_tokens)

    def _decode(self, ids: list[int], stops: set[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in stops], skip_special_tokens=True)

    def _decode_whole(self, ids: list[int], stops: set[int]) -> str:
        """The text of a finished answer, without the replacement character that the start of a
        multi-byte character decodes to when the answer ended inside it (budget, end of text).

        A character's start is at most three bytes, so it lies in the last three tokens: it does
        when the text of the last k of them ends in U+FFFD, joins the text before them unchanged,
        and is not what the tokenizer writes for that text (their bytes are not valid UTF-8). A
        cut character decodes to exactly one U+FFFD, which is dropped; a U+FFFD the model wrote
        itself (whole, even right before a cut character) stays."""
        ids = [i for i in ids if i not in stops]
        text = self._decode(ids, set())
        if not text.endswith("\ufffd"):
            return text
        for k in range(1, min(3, len(ids)) + 1):
            head, tail = self._decode(ids[:-k], set()), self._decode(ids[-k:], set())
            if head + tail == text and encode_text(self.tokenizer, tail) != ids[-k:]:
                return text[:-1]
        return text


def _trained_config(trained, config: GistConfig | None) -> GistConfig:
    """The config a model whose training manifest is in `trained` (None: untrained) runs with:
    the given one (a warning when its layout is not the trained one), else the trained one."""
    from gsa_rag.adapters import adapter_config, warn_if_untrained_layout

    if config is None:
        return adapter_config(trained) if trained is not None else GistConfig()
    if trained is not None:
        warn_if_untrained_layout(trained, config, stacklevel=4)  # the caller of from_pretrained / from_model
    return config


def _prompt_segments(tokenizer, question, passages, system):
    if isinstance(question, SegmentPrompt):  # pre-built (integrations: a prompt split into parts)
        if passages:
            raise InputError("a SegmentPrompt already holds its passages; pass passages=None")
        return list(question.segments)
    return build_segments(tokenizer, question, passages, system)


def _as_batch(question, passages) -> tuple[list[str], list[list], bool]:
    """(questions, passage lists, single), every question and passage checked (gsa_rag.validation)."""
    if isinstance(question, SegmentPrompt):
        return [question], [validation.check_passage_list(passages)], True
    if isinstance(question, (str, bytes, bytearray, memoryview)):
        return [validation.check_question(question)], [validation.check_passage_list(passages)], True
    if not isinstance(question, Sequence):
        raise InputTypeError(f"question must be a str or a list of str (a batch), got {type(question).__name__}")
    questions = [q if isinstance(q, SegmentPrompt) else validation.check_question(q, f"question {i}")
                 for i, q in enumerate(question)]
    if not questions:
        raise InputError("the batch of questions is empty: pass at least one question")
    if passages is None:
        passages = [[] for _ in questions]
    if isinstance(passages, str) or len(passages) != len(questions):
        raise InputError(f"a batch of {len(questions)} questions needs as many passage lists, got {len(passages)}")
    lists = [validation.check_passage_list(p, f"the passages of question {i}") for i, p in enumerate(passages)]
    return questions, lists, False


class _StopWatch:
    """Tells, token by token, when a growing answer reaches the point where `stream` ends it: its
    text holds a stop string and does not end inside a multi-byte character. Ending a row there
    (or later) leaves `_cut_as_streamed` the same text as decoding on to max_new_tokens would.

    Each step decodes only the tokens since the last whole-character check plus a margin that
    holds the longest stop string (a character is at most 4 byte tokens), so a long answer costs
    no quadratic re-decoding. A hit in that tail is confirmed on the whole text: a tail cut inside
    a character, or decoded without the text before it, could show a stop string that is not there.
    A stop string the tail misses (zero-width special tokens) only means decoding on, as before.
    """

    def __init__(self, decode, stop: Sequence[str]):
        self.decode, self.stop = decode, stop
        longest = max((len(s) for s in stop), default=0)
        self.margin = 4 * longest + 4 if longest else 0
        self.settled = 0  # tokens whose text ends on a whole character and holds no stop string

    def reached(self, ids: list[int]) -> bool:
        if not self.margin:
            return False
        tail = self.decode(ids[max(0, self.settled - self.margin) :])
        if tail.endswith("\ufffd"):  # stream waits for the character to complete; the tail keeps growing meanwhile
            return False
        if any(s and s in tail for s in self.stop):
            text = self.decode(ids)
            if text.endswith("\ufffd"):
                return False
            if any(s and s in text for s in self.stop):
                return True
        self.settled = len(ids)
        return False


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def _stop_prefix_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a stop string."""
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
