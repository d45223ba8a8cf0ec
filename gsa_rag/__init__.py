"""gsa-rag: Gist Sparse Attention for retrieval-augmented generation.

    from gsa_rag import GistEngine, GistConfig
    engine = GistEngine.from_pretrained()  # SmolLM2-135M-Instruct, offline
    engine.generate("Who wrote Hamlet?", ["Hamlet is a tragedy by William Shakespeare."])

    from gsa_rag import GistLLM            # LlamaIndex LLM (needs: pip install "gsa-rag[llama-index]")
    Settings.llm = GistLLM()
"""

import importlib.util
from typing import TYPE_CHECKING

from gsa_rag.config import GistConfig

if TYPE_CHECKING:
    from gsa_rag.engine import GistEngine


def _has_llama_index() -> bool:
    try:
        return importlib.util.find_spec("llama_index.core") is not None  # imports only the namespace package
    except (ImportError, ValueError):
        return False


# `from gsa_rag import *` fetches every listed name: GistLLM only where its extra is installed
__all__ = ["GistConfig", "GistEngine"]
if _has_llama_index():
    __all__.append("GistLLM")
__version__ = "0.1.0"


def __getattr__(name: str):
    # GistEngine imports torch and transformers (seconds): only when asked for, so that
    # `import gsa_rag` (the CLI's argument parsing, gsa_rag.config) stays fast
    if name == "GistEngine":
        from gsa_rag.engine import GistEngine

        return GistEngine
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


def __dir__() -> list[str]:
    return sorted({*globals(), "GistEngine"})
