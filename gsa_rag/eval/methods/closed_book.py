"""closed-book: the question alone, no passages (what the model knows by itself)."""

from dataclasses import dataclass

from gsa_rag.eval.methods.base import Method


@dataclass
class ClosedBook(Method):
    name = "closed-book"

    @property
    def label(self) -> str:
        return "closed-book"

    def passages(self, example) -> list:
        return []
