"""LangChain adapters over one GistEngine: `GistChatModel`, `GistLLM`, `GistMemoryRetriever`.

Needs `pip install 'gsa-rag[langchain]'` (langchain-core 1.x). All three are thin: generation
goes through `gsa_rag.integrations.backend.GistBackend` (the same backend the LlamaIndex
adapter uses), retrieval through `GistMemory.search`.

Example:
    >>> from langchain_core.output_parsers import StrOutputParser
    >>> from langchain_core.prompts import ChatPromptTemplate
    >>> from langchain_core.runnables import RunnablePassthrough
    >>> from gsa_rag import GistEngine
    >>> from gsa_rag.memory import GistMemory
    >>> from gsa_rag.integrations.langchain import GistChatModel, GistMemoryRetriever, format_documents
    >>> memory = GistMemory(GistEngine.from_pretrained(device="cpu"), progress=False)
    >>> _ = memory.add(["Hamlet is a tragedy by William Shakespeare.", "Paris is in France."])
    >>> retriever = GistMemoryRetriever(memory=memory, k=1)
    >>> prompt = ChatPromptTemplate.from_messages([("human", "{context}\\n\\n{question}")])
    >>> chain = ({"context": retriever | format_documents, "question": RunnablePassthrough()}
    ...          | prompt | GistChatModel(memory=memory, max_tokens=16) | StrOutputParser())
    >>> chain.invoke("Who wrote Hamlet?")  # doctest: +SKIP
    'William Shakespeare'

How a chain's prompt gets compressed. The chat model hands the rendered messages to its
GistBackend, which splits them into passages (compressed with gists) and raw text; the exact
rule is `gsa_rag.integrations.prompt_split`. In an LCEL chain, give the chat model the
retriever's GistMemory (`GistChatModel(memory=memory)`): every document the retriever returns is
a passage of that memory, `format_documents` writes each one's text verbatim, so the backend
finds them in the last message that quotes any, reuses their cached KV (never re-encoded), and
asks the rest of that message, raw, as the question (after `Question: `, which the engine's
prompt supplies: leave it out of your template), under the memory's system line (the prompt's
own system messages are replaced by it). Documents from any other retriever get the same
treatment through `remember_documents(memory)` (`retriever | remember_documents(memory) |
format_documents`), which stores them in the memory first (encoded once, then cached). A prompt
quoting no memory passage (and not one of LlamaIndex's QA templates) is answered with
everything raw: full attention, exactly the unmodified model, correct for any prompt.

Threads: generation is serialised per engine by the backend's lock (the retriever's search takes
it too), so models and retrievers can be shared between threads. `ainvoke` runs in LangChain's
default executor; `astream` runs each stream on one worker thread (the engine's lock is held
across a stream and is re-entrant by thread: a stream that hopped between executor threads
would let a pooled thread re-enter it while the stream is paused).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import closing
from typing import Any, Literal

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
        CallbackManagerForRetrieverRun,
    )
    from langchain_core.documents import Document
    from langchain_core.language_models import BaseChatModel, LangSmithParams
    from langchain_core.language_models.llms import LLM
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        SystemMessage,
    )
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnableLambda
    from langchain_core.runnables.config import run_in_executor
    from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("gsa_rag.integrations.langchain needs langchain-core 1.x: pip install 'gsa-rag[langchain]'") from error

from gsa_rag.errors import InputError
from gsa_rag.integrations.backend import call_sampling, iterate_in_thread
from gsa_rag.validation import check_stop

__all__ = ["GistChatModel", "GistLLM", "GistMemoryRetriever", "format_documents", "remember_documents", "to_chat_messages"]

# by class, not `message.type`: the chunks a stream yields (AIMessageChunk, ...) subclass these, and
# a reply collected from a stream goes back into the history as one
_ROLES = ((SystemMessage, "system"), (HumanMessage, "user"), (AIMessage, "assistant"))


# ----------------------------------------------------------------------------------------------
# messages and documents


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> the backend's `[{"role": ..., "content": str}]`.

    System, human and AI messages (and `ChatMessage` with one of those roles) map to
    system/user/assistant. Tool messages, tool calls and non-text content blocks are refused:
    the model takes text only and has no tool calling.

    Example:
        >>> from langchain_core.messages import HumanMessage, SystemMessage
        >>> to_chat_messages([SystemMessage("Be brief."), HumanMessage("Hi")])
        [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    """
    out = []
    for message in messages:
        if isinstance(message, ChatMessage):
            role = {"human": "user", "ai": "assistant"}.get(message.role, message.role)
        else:
            role = next((r for cls, r in _ROLES if isinstance(message, cls)), None)
        if role not in ("system", "user", "assistant"):
            raise InputError(f"GistChatModel takes system, user and assistant messages, not {message.type!r} (no tool calling)")
        if getattr(message, "tool_calls", None):
            raise InputError("GistChatModel has no tool calling: drop the AI message's tool calls or use a tool-calling model")
        out.append({"role": role, "content": _text(message.content)})
    return out


def _text(content: str | list) -> str:
    if isinstance(content, str):
        return content
    pieces = []
    for block in content:
        if isinstance(block, str):
            pieces.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            pieces.append(str(block.get("text", "")))
        else:  # silently dropping an image would answer a different question
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise InputError(f"GistChatModel takes text only, got a {kind!r} content block: pass its text, or drop it")
    return "".join(pieces)


def format_documents(documents: Sequence[Document]) -> str:
    """Joins documents' texts with blank lines, verbatim: the context form the backend finds by text.

    Example:
        >>> format_documents([Document("Paris is in France."), Document("Rome is in Italy.")])
        'Paris is in France.\\n\\nRome is in Italy.'
    """
    return "\n\n".join(doc.page_content for doc in documents)


def remember_documents(memory) -> RunnableLambda:
    """A runnable that stores documents' texts in `memory` (encoding the new ones) and passes
    the documents on, so that `GistChatModel(memory=memory)` finds them in the prompt and
    answers from their cached KV. For retrievers other than GistMemoryRetriever; the memory
    grows with every new document (bound it with `GistMemory(max_bytes=...)`).

    Example:
        >>> context = vector_retriever | remember_documents(memory) | format_documents  # doctest: +SKIP
    """

    def store(documents: list[Document]) -> list[Document]:
        from gsa_rag.integrations.backend import engine_lock

        with engine_lock(memory.engine):  # encoding runs the model: not beside a generation
            memory.add([doc.page_content for doc in documents])
        return documents

    return RunnableLambda(store, name="remember_documents")


# ----------------------------------------------------------------------------------------------
# shared settings, and running a stream on one thread for asyncio


class _GistSettings(BaseModel):
    """Fields and backend resolution shared by GistChatModel and GistLLM."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    model: str | None = None
    """HF id, local directory or .gguf path; None: the default model (SmolLM2-135M-Instruct, offline)."""
    adapter: str | None = "default"
    """Gist adapter directory; "default": the bundled one for the default model; None: none."""
    chunk_size: int | None = None
    """Raw tokens per gist; None: the adapter's (what it was trained with)."""
    top_k: int | None = None
    """Chunks each head unfolds; None: the adapter's."""
    device: str | None = None
    """Where the model runs ("cpu", "cuda", ...); None: CUDA when available."""
    max_new_tokens: int = Field(default=256, alias="max_tokens")
    """Most tokens to generate (LangChain's standard `max_tokens` is accepted too)."""
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    """Strings that end the answer (cut before them); merged with a call's `stop`."""
    streaming: bool = False
    """`invoke` streams internally (LangChain convention; the result is the same)."""
    memory: Any = Field(default=None, exclude=True)
    """A GistMemory: passages in it are recognised in prompts and their cached KV reused (its
    engine is used; `model`, `adapter`, `chunk_size`, `top_k`, `device` are then ignored)."""
    engine: Any = Field(default=None, exclude=True)
    """A ready GistEngine (instead of `model`/`adapter`/...)."""
    backend: Any = Field(default=None, exclude=True)
    """A ready GistBackend (instead of everything above)."""

    _resolved: Any = PrivateAttr(default=None)

    @property
    def gist_backend(self):
        """The GistBackend this model generates with (built on first use; the model loads on the
        first generation, once per process for equal arguments: backends share loaded engines)."""
        if self._resolved is None:
            from gsa_rag.integrations.backend import GistBackend, default_config

            if self.backend is not None:
                self._resolved = self.backend
            elif self.engine is not None or self.memory is not None:
                self._resolved = GistBackend(self.engine, memory=self.memory)
            else:
                # no overrides: config None, so the engine is the one other adapters load by default
                overrides = self.chunk_size is not None or self.top_k is not None
                config = default_config(self.model, self.adapter, chunk_size=self.chunk_size, top_k=self.top_k) if overrides else None
                self._resolved = GistBackend(model=self.model, adapter=self.adapter, config=config, device=self.device)
        return self._resolved

    def _model_name(self) -> str:
        from gsa_rag.models import DEFAULT_MODEL_NAME

        if self.backend is not None or self.engine is not None or self.memory is not None:
            # `model` says nothing about these; a backend over them is built without loading anything
            return self.gist_backend.model_name or DEFAULT_MODEL_NAME
        return self.model or DEFAULT_MODEL_NAME

    def _sampling(self, stop: list[str] | None, kwargs: dict) -> dict:
        """Backend keywords for one call: the fields, overridden by the call's keywords. A keyword
        given as None counts as not given (the field's value); the engine checks what remains, with
        errors that name the argument (`backend.call_sampling`)."""
        stops = [*check_stop(self.stop), *check_stop(stop)]  # one str is one stop string, not its characters
        return {
            **call_sampling(kwargs, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                            top_p=self.top_p, seed=self.seed),
            "stop": tuple(dict.fromkeys(s for s in stops if s)),
        }

    def _params(self) -> dict[str, Any]:
        # `_identifying_params`, which str() (GistLLM), asdict() and dict() show: fields only, so that
        # looking at a model never loads it; the engine's identity goes into the cache key below.
        return {
            "model": self._model_name(), "adapter": self.adapter, "chunk_size": self.chunk_size, "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "seed": self.seed, "default_stop": list(check_stop(self.stop)), "device": self.device,
        }

    def _dict_for_compat(self) -> dict[str, Any]:
        # LangChain's LLM cache keys answers by this (BaseLLM.generate directly, BaseChatModel through
        # `_get_invocation_params`), so everything that can change an answer belongs here, the
        # identity of the engine included (`model`/`adapter`/... say nothing about a ready engine,
        # memory or backend). Resolving it loads the model, which the call about to be cached does
        # anyway. "stop" is LangChain's own key for a call's stop (it overwrites ours).
        backend = self.gist_backend
        engine = backend.engine
        return {
            **super()._dict_for_compat(),
            "engine": {
                "model_fingerprint": _fingerprint(engine.model), "device": str(engine.device),
                "adapter": _adapter_identity(engine), "gist_config": engine.config.to_dict(),
            },
            # a prompt quoting memory passages is answered under the memory's system line
            "memory": None if backend.memory is None else {"system": backend.memory.system},
        }

    def _ls(self, model_type: str, stop: list[str] | None, kwargs: dict) -> LangSmithParams:
        sampling = self._sampling(stop, kwargs)
        params = LangSmithParams(
            ls_provider="gsa_rag", ls_model_name=str(kwargs.get("model") or self._model_name()),
            ls_model_type=model_type, ls_temperature=sampling["temperature"], ls_max_tokens=sampling["max_new_tokens"],
        )
        if sampling["stop"]:
            params["ls_stop"] = list(sampling["stop"])
        return params


# model -> its fingerprint: the cache key is built on every call, and hashing a large model's
# parameters costs a device->host copy per parameter. A model changed in place keeps its first fingerprint,
# as a GistMemory over it does.
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(model) -> str:
    if model not in _FINGERPRINTS:
        from gsa_rag.models import model_fingerprint

        _FINGERPRINTS[model] = model_fingerprint(model)
    return _FINGERPRINTS[model]


def _adapter_identity(engine) -> str | None:
    """Which adapter the engine loaded, as a digest of its manifest (None without one): an engine
    keeps the manifest, not the path. Its merged weights move the fingerprint too; this names it."""
    manifest = getattr(engine, "adapter", None)
    if manifest is None:
        return None
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"input_tokens": prompt_tokens, "output_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _count_tokens(backend, text: str) -> int:
    """Tokens of generated text, re-tokenized (the backend's Completion.completion_tokens rule)."""
    return len(backend.engine.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


# ----------------------------------------------------------------------------------------------
# chat model


class GistChatModel(_GistSettings, BaseChatModel):
    """A LangChain chat model answering with Gist Sparse Attention.

    Messages are rendered through the model's chat template; the context part of the prompt
    (passages of `memory`, or a context block the backend recognises) is compressed with gists,
    the rest stays raw. Text only; no tool calling or structured output.

    Example:
        >>> chat = GistChatModel(max_tokens=32)  # the default model, loaded on first use
        >>> chat.invoke("Hamlet is a tragedy by William Shakespeare.\\n\\nWho wrote Hamlet?").content  # doctest: +SKIP
        'William Shakespeare'
        >>> [m.content for m in chat.stream("Who wrote Hamlet?")]  # doctest: +SKIP
    """

    @property
    def _llm_type(self) -> str:
        return "gsa-rag-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls("chat", stop, kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        completion = self.gist_backend.complete(to_chat_messages(messages), **self._sampling(stop, kwargs))
        message = AIMessage(
            content=completion.text, usage_metadata=_usage(completion.prompt_tokens, completion.completion_tokens),
            response_metadata={"model_name": self._model_name(), "model_provider": "gsa_rag"},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        backend = self.gist_backend
        prompt = to_chat_messages(messages)
        text = []
        with closing(backend.stream(prompt, **self._sampling(stop, kwargs))) as pieces:
            for piece in pieces:
                text.append(piece)
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
        # the last chunk carries the usage, counted as the backend counts for `complete`
        usage = _usage(backend.count_prompt_tokens(prompt), _count_tokens(backend, "".join(text)))
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="", usage_metadata=usage, chunk_position="last",
                response_metadata={"model_name": self._model_name(), "model_provider": "gsa_rag"},
            )
        )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        sync_manager = run_manager.get_sync() if run_manager else None
        async for chunk in iterate_in_thread(lambda: self._stream(messages, stop, sync_manager, **kwargs)):
            yield chunk


# ----------------------------------------------------------------------------------------------
# text-completion LLM


class GistLLM(_GistSettings, LLM):
    """A LangChain text LLM (string in, string out) answering with Gist Sparse Attention.

    The prompt string goes to the backend as is (rendered as one user message through the
    chat template); its context part is compressed as in `GistChatModel`.

    Example:
        >>> llm = GistLLM(max_tokens=16)
        >>> llm.invoke("Hamlet is a tragedy by William Shakespeare.\\n\\nWho wrote Hamlet?")  # doctest: +SKIP
        'William Shakespeare'
    """

    @property
    def _llm_type(self) -> str:
        return "gsa-rag"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls("llm", stop, kwargs)

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return self.gist_backend.complete(prompt, **self._sampling(stop, kwargs)).text

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        empty = True
        with closing(self.gist_backend.stream(prompt, **self._sampling(stop, kwargs))) as pieces:
            for piece in pieces:
                empty = False
                chunk = GenerationChunk(text=piece)
                if run_manager:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
        if empty:  # an empty answer (EOS or a stop string first): LangChain's stream raises on no chunks at all
            yield GenerationChunk(text="")

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        sync_manager = run_manager.get_sync() if run_manager else None
        async for chunk in iterate_in_thread(lambda: self._stream(prompt, stop, sync_manager, **kwargs)):
            yield chunk


# ----------------------------------------------------------------------------------------------
# retriever


class GistMemoryRetriever(BaseRetriever):
    """Retrieves passages of a GistMemory by the model's own gist attention (`GistMemory.search`).

    Each Document holds the passage text; its metadata: `passage_id`, `title`, `score` (the
    aggregate gist score), `chunks` (indices of the passage's chunks the question would unfold,
    most voted first), `chunk_votes` and `chunk_texts`.

    Args (fields):
        memory: the GistMemory to search.
        k: documents returned; `retriever.invoke(query, k=2)` overrides it for one call.
        prefilter: first keep this many candidates by vector similarity (FAISS; call
            `memory.use_vector_index()` first); None scores every passage.
        aggregate: "max" or "mass" (see gsa_rag.memory).

    Example:
        >>> retriever = GistMemoryRetriever(memory=memory, k=3)  # doctest: +SKIP
        >>> [d.metadata["passage_id"] for d in retriever.invoke("Who wrote Hamlet?", k=1)]  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    memory: Any
    k: int = 4
    prefilter: int | None = None
    aggregate: Literal["max", "mass"] = "max"

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None, **kwargs: Any
    ) -> list[Document]:
        from gsa_rag.integrations.backend import engine_lock

        # the engine's generation lock: a search runs the model and reorders the memory's LRU,
        # so it must not interleave with a chat model answering over the same memory
        with engine_lock(self.memory.engine):
            hits = self.memory.search(
                query, k=self.k if k is None else int(k), prefilter=kwargs.get("prefilter", self.prefilter),
                aggregate=kwargs.get("aggregate", self.aggregate),
            )
        return [
            Document(
                page_content=hit.text, id=hit.id,
                metadata={
                    "passage_id": hit.id, "title": hit.title, "score": hit.score, "chunks": list(hit.chunks),
                    "chunk_votes": list(hit.chunk_votes), "chunk_texts": list(hit.chunk_texts),
                },
            )
            for hit in hits
        ]

    async def _aget_relevant_documents(self, query: str, *, run_manager, **kwargs: Any) -> list[Document]:
        # BaseRetriever's default drops invoke's keywords (k) on the async path
        return await run_in_executor(None, self._get_relevant_documents, query, run_manager=run_manager.get_sync(), **kwargs)
