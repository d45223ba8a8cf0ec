"""LangChain's standard test suites (langchain-tests, pinned in the `test` extra) on the adapters.

`ChatModelUnitTests` never generates, so GistChatModel is built with no backend at all (the
model loads on first use); `RetrieversIntegrationTests` searches a small GistMemory on the
default model, built once for the module.
"""

from __future__ import annotations

import functools

from langchain_tests.integration_tests import RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from gsa_rag.integrations.langchain import GistChatModel, GistMemoryRetriever

PASSAGES = [
    {"title": "Vasa", "text": "The warship Vasa sank in 1628 and was raised in 1961 after 333 years under water."},
    "Stockholm is the capital of Sweden, built on fourteen islands.",
    {"title": "Vasa Museum", "text": "The Vasa Museum opened in 1990 on the island of Djurgarden in Stockholm."},
    "Hamlet is a tragedy written by William Shakespeare around 1600.",
    "The Danube flows through ten countries and four capital cities.",
]


@functools.cache
def small_memory():
    from gsa_rag.memory import GistMemory

    # the engine GistChatModel(device="cpu") loads: one engine for both langchain test modules
    memory = GistMemory(GistChatModel(device="cpu").gist_backend.engine, progress=False)
    memory.add(PASSAGES)
    return memory


class TestGistChatModelUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[GistChatModel]:
        return GistChatModel

    @property
    def chat_model_params(self) -> dict:
        return {"device": "cpu", "chunk_size": 8, "top_k": 4}


class TestGistMemoryRetrieverIntegration(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[GistMemoryRetriever]:
        return GistMemoryRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"memory": small_memory(), "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "When was the Vasa raised?"
