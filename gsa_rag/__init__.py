"""gsa-rag: Gist Sparse Attention for retrieval-augmented generation.

    from gsa_rag import GistEngine, GistConfig
    engine = GistEngine.from_pretrained()  # SmolLM2-135M-Instruct, offline
    engine.generate("Who wrote Hamlet?", ["Hamlet is a tragedy by William Shakespeare."])
"""

from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine

__all__ = ["GistConfig", "GistEngine"]
__version__ = "0.1.0"
