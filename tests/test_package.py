"""The package's top level: what `from gsa_rag import *` gives, with and without the optional extras."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import gsa_rag


def star_import() -> dict:
    names = {}
    exec("from gsa_rag import *", names)  # noqa: S102 - the star import is what is tested
    return {k: v for k, v in names.items() if not k.startswith("__")}


def test_star_import_without_llama_index(monkeypatch):
    """Regression: `__all__` listed the lazily imported GistLLM, so without llama-index-core the star
    import raised ImportError."""
    # an install without the [llama-index] extra: its modules cannot be found or imported. The
    # package reads that when it is imported, so it is re-imported (in place: a fresh interpreter
    # costs seconds of torch import) and re-imported again afterwards, with llama_index back.
    monkeypatch.delitem(sys.modules, "gsa_rag.integrations.llama_index", raising=False)
    for name in ["llama_index.core", *(m for m in sys.modules if m.startswith("llama_index.core."))]:
        monkeypatch.setitem(sys.modules, name, None)
    try:
        importlib.reload(gsa_rag)
        assert star_import() == {"GistConfig": gsa_rag.GistConfig, "GistEngine": gsa_rag.GistEngine}
        with pytest.raises(ImportError, match="llama-index"):  # asked for by name, it still says what to install
            _ = gsa_rag.GistLLM
    finally:
        monkeypatch.undo()
        importlib.reload(gsa_rag)


def test_star_import_with_llama_index():
    pytest.importorskip("llama_index.core")
    from gsa_rag.integrations.llama_index import GistLLM

    assert star_import() == {"GistConfig": gsa_rag.GistConfig, "GistEngine": gsa_rag.GistEngine, "GistLLM": GistLLM}


def test_import_leaves_torch_and_transformers_out():
    """Regression: `import gsa_rag` imported the engine, torch and transformers (~7 s), so every
    `gsa-rag` usage error and --help waited for them."""
    code = "import gsa_rag, sys; print(gsa_rag.__file__, 'torch' in sys.modules, 'transformers' in sys.modules)"
    # run beside this tree's package, and check that it is the one imported (not another install)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(gsa_rag.__file__).parents[1]).stdout
    assert out.split() == [gsa_rag.__file__, "False", "False"]


def test_engine_is_still_a_package_name():
    from gsa_rag import GistConfig, GistEngine
    from gsa_rag.config import GistConfig as config_class
    from gsa_rag.engine import GistEngine as engine_class

    assert (GistEngine, GistConfig, gsa_rag.GistEngine) == (engine_class, config_class, engine_class)
    assert {"GistConfig", "GistEngine", "__version__"} <= set(dir(gsa_rag))
