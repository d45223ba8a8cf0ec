"""Test doubles shared by the CPU tests."""

from __future__ import annotations

import random

from gsa_rag.config import GistConfig
from gsa_rag.layout import Segment

GIST_ID = 999
MGIST_ID = 998


class FakeTokenizer:
    """Ids 0..999; `<mgist>` is 998, every other token string (`<gist>`, links) 999. Word starts
    are fixed by `starts` (default: every third id)."""

    pad_token_id = 0
    unk_token_id = None

    def __init__(self, starts=None):
        self.starts = starts or (lambda i: i % 3 == 0)

    def __len__(self) -> int:
        return 1000

    def convert_tokens_to_ids(self, token: str) -> int:
        return MGIST_ID if token == "<mgist>" else GIST_ID

    def convert_ids_to_tokens(self, ids):
        return ["Ġw" if self.starts(i) else "x" for i in ids]


def random_segments(rng: random.Random, max_passages: int = 4, max_len: int = 30) -> list[Segment]:
    """Random context segments (possibly none) followed by one raw tail segment."""
    segments = [
        Segment(tuple(rng.randrange(1, 990) for _ in range(rng.randrange(1, max_len))), True, passage_id=p)
        for p in range(rng.randrange(0, max_passages + 1))
    ]
    segments.append(Segment(tuple(rng.randrange(1, 990) for _ in range(rng.randrange(1, 8))), False))
    return segments


def random_config(rng: random.Random) -> GistConfig:
    return GistConfig(
        chunk_size=rng.randrange(0, 7),
        sink=rng.randrange(0, 6),
        num_previous_chunks=rng.randrange(0, 3),
        word_aware=rng.random() < 0.5,
        top_k=rng.randrange(1, 5),
    )


def random_hierarchical_config(rng: random.Random, max_levels: int = 3) -> GistConfig:
    """A random H-GSA config: 2..max_levels gist levels, small chunks and sections."""
    return GistConfig(
        chunk_size=rng.randrange(1, 6),
        meta_chunks=tuple(rng.randrange(1, 5) for _ in range(rng.randrange(1, max_levels))),
        sink=rng.randrange(0, 6),
        num_previous_chunks=rng.randrange(0, 3),
        word_aware=rng.random() < 0.5,
        top_k=rng.randrange(1, 5),
    )
