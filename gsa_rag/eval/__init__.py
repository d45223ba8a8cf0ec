"""Evaluation: answer metrics (best-subspan EM, EM, token F1, bootstrap CI) and dataset loaders."""

from gsa_rag.eval.data import Example, Passage, data_root, load_examples
from gsa_rag.eval.metrics import best_subspan_em, bootstrap_ci, exact_match, normalize_answer, token_f1

__all__ = [
    "Example",
    "Passage",
    "best_subspan_em",
    "bootstrap_ci",
    "data_root",
    "exact_match",
    "load_examples",
    "normalize_answer",
    "token_f1",
]
