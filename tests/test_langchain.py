"""LangChain adapters on the default model (CPU): LCEL chain, chat model, text LLM, retriever.

The reference for every answer is the engine (or the backend) called directly with the same
prompt split, so a test fails when the adapter changes what the model is asked.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from langchain_core.caches import BaseCache
from langchain_core.documents import Document
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    HumanMessageChunk,
    SystemMessage,
    SystemMessageChunk,
    ToolMessage,
)
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, Generation
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from gsa_rag.integrations.langchain import (
    GistChatModel,
    GistLLM,
    GistMemoryRetriever,
    format_documents,
    remember_documents,
    to_chat_messages,
)
from gsa_rag.memory import GistMemory
from gsa_rag.models import model_fingerprint

PASSAGES = [
    "The warship Vasa sank in 1628 and was raised in 1961 after 333 years under water.",
    "Stockholm is the capital of Sweden, built on fourteen islands.",
    "The Vasa Museum opened in 1990 on the island of Djurgarden in Stockholm.",
    "Hamlet is a tragedy written by William Shakespeare around 1600.",
]
QUESTION = "When was the Vasa raised?"
SEVERAL = "Name three colours."  # the default model answers with several words


@pytest.fixture(scope="module")
def engine():
    # through the adapter's own path, so models built with the same arguments share this engine
    return GistChatModel(device="cpu").gist_backend.engine


@pytest.fixture(scope="module")
def memory(engine):
    memory = GistMemory(engine, progress=False)
    memory.add(PASSAGES)
    return memory


# ----------------------------------------------------------------------------------------------
# messages and documents (no model)


def test_messages_map_to_backend_roles_and_text():
    messages = [SystemMessage("Be brief."), HumanMessage([{"type": "text", "text": "Hi "}, "there"]), AIMessage("Hello.")]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
    ]
    # a streamed reply, collected, goes back into the history as it came (chunks subclass the messages)
    chunks = [SystemMessageChunk("Be brief."), HumanMessageChunk("Hi"), AIMessageChunk("Hel") + AIMessageChunk("lo.")]
    assert [m["role"] for m in to_chat_messages(chunks)] == ["system", "user", "assistant"]
    assert to_chat_messages(chunks)[2]["content"] == "Hello."
    with pytest.raises(ValueError, match="tool"):
        to_chat_messages([ToolMessage("3", tool_call_id="1")])
    with pytest.raises(ValueError, match="text only"):
        to_chat_messages([HumanMessage([{"type": "image", "url": "https://example.com/a.png"}])])
    assert format_documents([Document("a b"), Document("c")]) == "a b\n\nc"


def test_models_share_one_engine_per_arguments(engine, memory):
    assert GistChatModel(device="cpu").gist_backend.engine is engine
    assert GistLLM(device="cpu").gist_backend.engine is engine
    assert GistChatModel(memory=memory).gist_backend.memory is memory
    assert GistChatModel(max_tokens=7).max_new_tokens == 7 == GistChatModel(max_new_tokens=7).max_new_tokens


# ----------------------------------------------------------------------------------------------
# retriever


def test_retriever_returns_the_memory_search_as_documents(memory):
    retriever = GistMemoryRetriever(memory=memory, k=3)
    docs = retriever.invoke(QUESTION)
    hits = memory.search(QUESTION, k=3)
    assert [d.id for d in docs] == [h.id for h in hits]
    assert [d.page_content for d in docs] == [h.text for h in hits]
    first = docs[0].metadata
    assert first["passage_id"] == hits[0].id and first["score"] == pytest.approx(hits[0].score)
    assert first["chunks"] == hits[0].chunks and first["chunk_texts"] == hits[0].chunk_texts
    assert len(retriever.invoke(QUESTION, k=1)) == 1
    # the async path keeps invoke's keywords (BaseRetriever's default drops them)
    assert [d.id for d in asyncio.run(retriever.ainvoke(QUESTION, k=2))] == [h.id for h in hits[:2]]


# ----------------------------------------------------------------------------------------------
# LCEL chain


def test_lcel_chain_answers_as_the_engine_over_the_same_split(engine, memory):
    retriever = GistMemoryRetriever(memory=memory, k=2)
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{context}\n\n{question}")])
    chat = GistChatModel(memory=memory, max_tokens=12)
    chain = {"context": retriever | format_documents, "question": RunnablePassthrough()} | prompt | chat | StrOutputParser()

    encoded = memory.encoded_tokens
    answer = chain.invoke(QUESTION)
    assert memory.encoded_tokens == encoded  # the documents' cached KV was reused, nothing re-encoded

    docs = retriever.invoke(QUESTION)
    plan = chat.gist_backend.plan(to_chat_messages(prompt.invoke({"context": format_documents(docs), "question": QUESTION}).to_messages()))
    assert (plan.route, plan.passage_ids, plan.question) == ("memory", [d.id for d in docs], QUESTION)
    expected = engine.generate(QUESTION, [d.id for d in docs], memory=memory, system=memory.system, max_new_tokens=12)
    assert answer == expected and answer.strip()


def test_lcel_chain_batch_from_threads_matches_sequential(memory):
    # retrieval and generation from 3 threads over one memory: both take the engine's lock
    retriever = GistMemoryRetriever(memory=memory, k=2)
    prompt = ChatPromptTemplate.from_messages([("human", "{context}\n\n{question}")])
    chat = GistChatModel(memory=memory, max_tokens=6)
    chain = {"context": retriever | format_documents, "question": RunnablePassthrough()} | prompt | chat | StrOutputParser()
    questions = [QUESTION, "What is the capital of Sweden?", "Who wrote Hamlet?"]
    sequential = [chain.invoke(q) for q in questions]
    assert chain.batch(questions, config={"max_concurrency": 3}) == sequential


def test_remember_documents_compresses_any_retrievers_documents(engine, memory):
    new = "The Oresund Bridge between Copenhagen and Malmo opened in July 2000."
    other_retriever = RunnableLambda(lambda q: [Document(new), Document(PASSAGES[1])])
    prompt = ChatPromptTemplate.from_messages([("human", "{context}\n\n{question}")])
    chat = GistChatModel(memory=memory, max_tokens=8)
    context = other_retriever | remember_documents(memory) | format_documents
    chain = {"context": context, "question": RunnablePassthrough()} | prompt | chat | StrOutputParser()

    question = "When did the Oresund Bridge open?"
    answer = chain.invoke(question)
    ids = memory.add([new, PASSAGES[1]])  # already stored by the chain: returns their ids, encodes nothing
    assert len(memory) == len(PASSAGES) + 1
    assert answer == engine.generate(question, ids, memory=memory, system=memory.system, max_new_tokens=8)


# ----------------------------------------------------------------------------------------------
# chat model


def test_chat_model_usage_stream_and_stop(memory):
    chat = GistChatModel(device="cpu", max_tokens=24)
    messages = [HumanMessage(SEVERAL)]
    message = chat.invoke(messages)
    completion = chat.gist_backend.complete(to_chat_messages(messages), max_new_tokens=24)
    assert message.content == completion.text and len(completion.text) > 6
    assert message.usage_metadata == {
        "input_tokens": completion.prompt_tokens,
        "output_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }

    chunks = list(chat.stream(messages))
    assert len(chunks) > 2 and "".join(c.content for c in chunks) == message.content
    assert chunks[-1].usage_metadata == message.usage_metadata and chunks[-1].chunk_position == "last"

    stop = message.content[3:5]
    cut = chat.invoke(messages, stop=[stop]).content
    assert cut == message.content[: message.content.find(stop)]
    assert GistChatModel(device="cpu", max_tokens=24, stop=[stop]).invoke(messages).content == cut
    # one str is one stop string, not its characters: a string whose first character occurs earlier
    text = message.content
    i = next(i for i in range(1, len(text) - 1) if text[i] in text[:i] and text.find(text[i : i + 2]) == i)
    assert chat.invoke(messages, stop=text[i : i + 2]).content == text[:i]


def test_chat_model_async_matches_sync():
    chat = GistChatModel(device="cpu", max_tokens=16)
    expected = chat.invoke(SEVERAL).content

    async def run():
        # several streams in a row: each must release the engine lock on the thread that took it
        streams = [[c.content async for c in chat.astream(SEVERAL)] for _ in range(3)]
        return await chat.ainvoke(SEVERAL), streams

    answer, streams = asyncio.run(run())
    assert answer.content == expected
    assert all("".join(s) == expected for s in streams)

    async def first_piece_only():
        async for chunk in chat.astream(SEVERAL):
            return chunk.content

    assert expected.startswith(asyncio.run(first_piece_only()))
    # the abandoned stream released the engine lock: a call from another thread finishes
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("text", chat.invoke(SEVERAL).content), daemon=True)
    thread.start()
    thread.join(120)
    assert done.get("text") == expected


def test_chat_model_batch_from_threads_matches_sequential():
    chat = GistChatModel(device="cpu", max_tokens=8)
    questions = [SEVERAL, "Name a colour.", "Say hello.", "What is 2 + 2?"]
    sequential = [chat.invoke(q).content for q in questions]
    assert [m.content for m in chat.batch(questions, config={"max_concurrency": 4})] == sequential


# ----------------------------------------------------------------------------------------------
# text LLM


def test_llm_string_in_string_out_stream_and_stop():
    llm = GistLLM(device="cpu", max_tokens=24)
    text = llm.invoke(SEVERAL)
    assert isinstance(text, str) and text == llm.gist_backend.complete(SEVERAL, max_new_tokens=24).text
    pieces = list(llm.stream(SEVERAL))
    assert len(pieces) > 2 and "".join(pieces) == text
    stop = text[3:5]
    assert llm.invoke(SEVERAL, stop=[stop]) == text[: text.find(stop)]
    assert "".join(llm.stream(SEVERAL, stop=[stop])) == text[: text.find(stop)]

    async def run():
        return [p async for p in llm.astream(SEVERAL)]

    assert "".join(asyncio.run(run())) == text


def test_llm_empty_answer_streams_as_one_empty_chunk():
    """Regression: a stop string at the very start gave invoke() '' but stream() raised
    "No generation chunks were returned"."""
    llm = GistLLM(device="cpu", max_tokens=8)
    stop = [llm.invoke(SEVERAL)[:1]]
    assert stop[0] and llm.invoke(SEVERAL, stop=stop) == ""
    assert list(llm.stream(SEVERAL, stop=stop)) == [""]

    async def run():
        return [p async for p in llm.astream(SEVERAL, stop=stop)]

    assert asyncio.run(run()) == [""]


@pytest.mark.parametrize("cls", [GistChatModel, GistLLM])
def test_a_call_keyword_given_as_none_is_the_field(cls, engine):
    """Regression: invoke(..., temperature=None) (or top_p / max_tokens) passed None on, so float(None)
    or the engine failed; None now means the model's field."""
    from test_memory import tiny_engine

    from gsa_rag.errors import InputTypeError

    model = cls(engine=tiny_engine(engine.tokenizer), max_tokens=5, temperature=1.0, seed=3)
    text = lambda answer: getattr(answer, "content", answer)
    want = text(model.invoke(SEVERAL))
    nones = {"temperature": None, "top_p": None, "max_tokens": None, "max_new_tokens": None}
    assert text(model.invoke(SEVERAL, **nones)) == want
    assert "".join(text(c) for c in model.stream(SEVERAL, **nones)) == want
    assert text(model.invoke(SEVERAL, max_tokens=None, max_new_tokens=2)) != want  # a value given still counts
    with pytest.raises(InputTypeError, match="temperature must be a number"):
        model.invoke(SEVERAL, temperature="hot")


# ----------------------------------------------------------------------------------------------
# cache key, and looking at a model without loading it


class KeyCache(BaseCache):
    """Records the keys LangChain's LLM cache is asked for, and answers every lookup (nothing generates)."""

    def __init__(self, generation):
        self.generation, self.keys = generation, []

    def lookup(self, prompt, llm_string):
        self.keys.append(llm_string)
        return [self.generation]

    def update(self, prompt, llm_string, return_val):
        raise AssertionError("every lookup is a hit: nothing is generated, nothing stored")

    def clear(self, **kwargs):
        self.keys.clear()


def cache_key(cls, **fields) -> str:
    """The key an answer of `cls(**fields)` is cached under, built by LangChain's own cache lookup."""
    generation = ChatGeneration(message=AIMessage("cached")) if cls is GistChatModel else Generation(text="cached")
    cache = KeyCache(generation)
    answer = cls(cache=cache, **fields).invoke("Hi")
    assert getattr(answer, "content", answer) == "cached"
    (key,) = cache.keys
    return key


@pytest.mark.parametrize("cls", [GistChatModel, GistLLM])
def test_cache_key_covers_everything_that_changes_an_answer(cls, engine):
    """Regression: LangChain's LLM cache key left out the stop field, the seed, the device and which
    engine answers, so a cached answer came back for another model."""
    from test_memory import tiny_engine

    tiny = tiny_engine(engine.tokenizer)

    def key(**fields):
        fields.setdefault("engine", tiny)
        return cache_key(cls, max_tokens=8, **fields)

    base = key()
    assert model_fingerprint(tiny.model) in base
    json.dumps(cls(engine=tiny)._dict_for_compat())  # tracers serialise the invocation params
    # equal settings over equal weights: one key, whichever engine object holds them
    assert key(engine=tiny_engine(engine.tokenizer)) == base

    other_config = tiny_engine(engine.tokenizer, top_k=tiny.config.top_k + 1)  # the same weights
    with_adapter = tiny_engine(engine.tokenizer)
    with_adapter.adapter = {"base_model": "tiny", "gist_config": tiny.config.to_dict()}
    differing = {
        # LangChain sets "stop" to the call's own stop: the field must not hide under that key
        "stop field": key(stop=["x"]),
        "seed": key(seed=1),
        "device": key(device="cpu"),
        # the engine's identity: the fields alone are equal in these
        "weights": key(engine=tiny_engine(engine.tokenizer, seed=1)),
        "gist config": key(engine=other_config),
        "adapter": key(engine=with_adapter),
        "memory": key(engine=None, memory=GistMemory(tiny, progress=False)),
    }
    assert {what: k == base for what, k in differing.items()} == dict.fromkeys(differing, False)


@pytest.mark.parametrize("cls", [GistChatModel, GistLLM])
def test_looking_at_a_model_never_loads_it(cls, monkeypatch):
    """Regression: str(), repr(), .dict() and `_identifying_params` (tracing metadata) resolved the
    engine for its identity, loading the model (seconds to minutes, GPU memory) unasked."""
    from gsa_rag.integrations import backend as backend_module
    from gsa_rag.integrations.backend import GistBackend

    def refuse(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(backend_module, "_shared_engine", refuse)
    by_name = cls(model="no/such-model", max_tokens=4)
    for model in (by_name, cls(backend=GistBackend(model="no/such-model"))):
        str(model), repr(model), model._identifying_params, model.asdict(), model.dict(), model._get_ls_params()
        with pytest.raises(AssertionError, match="was loaded"):  # a call loads it (the patch is live)
            model.invoke("Hi")
    assert by_name._identifying_params["model"] == by_name.asdict()["model"] == "no/such-model"
    given = cls(backend=GistBackend(model="no/such-model"))  # a backend's own model, not the default one
    assert given._identifying_params["model"] == given._get_ls_params()["ls_model_name"] == "no/such-model"


@pytest.mark.parametrize("cls", [GistChatModel, GistLLM])
def test_the_reported_model_is_the_one_given(cls, engine):
    """Regression: a model given an engine, a memory or a backend named the default model (in
    tracing, str() and the answer's metadata) whatever model that engine held."""
    from gsa_rag.integrations.backend import GistBackend
    from test_memory import tiny_engine

    tiny = tiny_engine(engine.tokenizer)
    tiny.model.name_or_path = "tiny/llama"  # what from_pretrained/from_config records as the model's name
    for model in (cls(engine=tiny, max_tokens=2), cls(memory=GistMemory(tiny, progress=False), max_tokens=2),
                  cls(backend=GistBackend(tiny), max_tokens=2)):
        assert model._identifying_params["model"] == model._get_ls_params()["ls_model_name"] == "tiny/llama"
    if cls is GistLLM:
        assert "tiny/llama" in str(cls(engine=tiny))  # str() shows the identifying params
    else:
        assert cls(engine=tiny, max_tokens=2).invoke("Hi").response_metadata["model_name"] == "tiny/llama"
        chunks = list(cls(engine=tiny, max_tokens=2).stream("Hi"))
        assert chunks[-1].response_metadata["model_name"] == "tiny/llama"
    # the default model has one name, given as an engine or loaded by the model itself
    assert cls(engine=engine)._model_name() == cls()._model_name() == "smollm2-135m-instruct"
