"""Benchmark methods for benchmarks/rag_eval.py, one file each (see base.py).

    >>> from gsa_rag.eval.methods import parse_spec
    >>> parse_spec("gsa:chunk=16:policy=adaptive").label
    'GSA 16x, adaptive k'
"""

from gsa_rag.eval.methods.base import Method, RunContext, available, parse_spec

__all__ = ["Method", "RunContext", "available", "parse_spec"]
