"""full: every given passage in the prompt, full causal attention (no gists)."""

from dataclasses import dataclass

from gsa_rag.eval.methods.base import Method


@dataclass
class Full(Method):
    name = "full"

    @property
    def label(self) -> str:
        return "full attention, all passages"

    def compression_ratio(self) -> float:
        return 1.0
