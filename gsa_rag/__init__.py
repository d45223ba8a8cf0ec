"""gsa-rag: Gist Sparse Attention for retrieval-augmented generation.

    from gsa_rag import GistEngine, GistConfig
    engine = GistEngine.from_pretrained()  # SmolLM2-135M-Instruct, offline
    engine.generate("Who wrote Hamlet?", ["Hamlet is a tragedy by William Shakespeare."])

    from gsa_rag import GistLLM            # LlamaIndex LLM (needs: pip install "gsa-rag[llama-index]")
    Settings.llm = GistLLM()
"""

from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine

__all__ = ["GistConfig", "GistEngine", "GistLLM"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # GistLLM needs llama-index-core, an optional extra: import it only when asked for
    if name == "GistLLM":
        try:
            from gsa_rag.integrations.llama_index import GistLLM
        except ImportError as error:
            if "llama_index" not in str(getattr(error, "name", "") or error):
                raise
            raise ImportError(
                'gsa_rag.GistLLM needs llama-index-core: pip install "gsa-rag[llama-index]"'
            ) from error
        return GistLLM
    raise AttributeError(f"module 'gsa_rag' has no attribute {name!r}")
