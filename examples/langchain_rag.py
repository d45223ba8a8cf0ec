"""RAG with LangChain over a gist memory: retriever | prompt | GistChatModel | StrOutputParser.

Encodes a few hundred passages of the shared Wikipedia corpus once into a GistMemory (gist KV,
content-addressed), retrieves with the model's own gist attention (optionally behind a FAISS
prefilter), and answers through an LCEL chain whose chat model reuses the passages' cached KV.

    python examples/langchain_rag.py
    python examples/langchain_rag.py --question "Who wrote Hamlet?" --passages 500 --prefilter 0
    python examples/langchain_rag.py --memory-dir /tmp/gsa-mem   # encode once, load on later runs

The corpus is `$GSA_RAG_DATA/corpus/wiki_passages.jsonl` (default `../shared/data`, as
gsa_rag.eval.data resolves it). Needs `pip install 'gsa-rag[langchain,faiss]'` (faiss: the
vector prefilter; `--prefilter 0` goes without). Encoding 300 passages takes a few minutes on
a laptop CPU, once: `--memory-dir` keeps them for the next run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough

from gsa_rag import GistEngine
from gsa_rag.eval.data import load_corpus
from gsa_rag.integrations.langchain import GistChatModel, GistMemoryRetriever, format_documents
from gsa_rag.memory import GistMemory, MemoryFormatError

# the engine's memory prompt supplies "Question: " and the system line itself: the template
# holds only the documents (verbatim, so the chat model finds them in its memory) and the question
PROMPT = ChatPromptTemplate.from_messages([("human", "{context}\n\n{question}")])


def build_memory(engine: GistEngine, passages: int, directory: str | None) -> GistMemory:
    """The first `passages` corpus passages in a GistMemory, loaded from `directory` when it holds them."""
    if directory and (Path(directory) / "manifest.json").is_file():
        try:
            memory = GistMemory.load(directory, engine)
            if len(memory) >= passages:
                return memory
        except MemoryFormatError as error:  # another model or gist config: rebuild
            print(f"rebuilding the memory: {error}")
    memory = GistMemory(engine)
    memory.add([{"title": p.title, "text": p.text} for p in load_corpus(limit=passages)])
    if directory:
        memory.save(directory)
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default="When is Deadpool 2 released in the United States?")
    parser.add_argument("--passages", type=int, default=300, help="corpus passages to store")
    parser.add_argument("--k", type=int, default=4, help="documents retrieved")
    # gist-attention search alone is weak with the bundled 8x adapter; a vector prefilter helps it
    parser.add_argument("--prefilter", type=int, default=20,
                        help="FAISS candidates scored by gist attention (0: score every passage)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default=None, help="default: CUDA when available, else CPU")
    parser.add_argument("--memory-dir", default=None, help="save the memory here / load it from here")
    args = parser.parse_args()

    start = time.perf_counter()
    engine = GistEngine.from_pretrained(device=args.device)  # the default model and its trained gist adapter
    print(f"model loaded in {time.perf_counter() - start:.1f} s on {engine.device}")

    start = time.perf_counter()
    memory = build_memory(engine, args.passages, args.memory_dir)
    if args.prefilter:
        memory.use_vector_index()  # MiniLM sentence embeddings + FAISS, from PyPI packages
    stats = memory.stats()
    print(f"memory: {len(memory)} passages, {stats.gists} gists, gist KV {stats.gist_bytes / 2**20:.1f} MiB "
          f"of {stats.full_bytes / 2**20:.1f} MiB, ready in {time.perf_counter() - start:.1f} s")

    retriever = GistMemoryRetriever(memory=memory, k=args.k, prefilter=args.prefilter or None)
    chat = GistChatModel(memory=memory, max_tokens=args.max_tokens)
    chain = {"context": retriever | format_documents, "question": RunnablePassthrough()} | PROMPT | chat | StrOutputParser()

    start = time.perf_counter()
    for doc in retriever.invoke(args.question):
        print(f"  {doc.metadata['score']:8.3f}  {doc.metadata['title'] or doc.id}: {doc.page_content[:80]}...")
    print(f"retrieved in {time.perf_counter() - start:.2f} s")

    start = time.perf_counter()
    answer = chain.invoke(args.question)
    print(f"Q: {args.question}\nA: {answer}\n(chain: retrieve + answer in {time.perf_counter() - start:.2f} s)")


if __name__ == "__main__":
    main()
