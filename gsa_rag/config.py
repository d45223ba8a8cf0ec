"""GistConfig: every knob of Gist Sparse Attention in one dataclass, saved as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Literal

from gsa_rag.errors import ConfigError

GIST_TOKEN = "<gist>"
MGIST_TOKEN = "<mgist>"  # reserved for the hierarchy (gist-of-gist)
NUM_LINK_TOKENS = 4  # reserved for KV reuse: <link1>..<link4> bridge independently encoded passages


def link_tokens(n: int = NUM_LINK_TOKENS) -> list[str]:
    return [f"<link{i}>" for i in range(1, n + 1)]


@dataclass
class GistConfig:
    """How context is compressed into gists and how a question unfolds it.

    Example:
        >>> GistConfig(chunk_size=8, top_k=4).compression_ratio
        8
        >>> GistConfig(chunk_size=8, meta_chunks=(4,)).compression_ratio  # H-GSA, two levels
        32
    """

    # raw tokens per chunk; each chunk is followed by one <gist>. 0 inserts no gists at all
    # (plain causal attention: the "full attention" baseline over the same prompt).
    chunk_size: int = 8
    # hierarchy (gist-of-gist, H-GSA): how many gists of the level below one <mgist> closes, per
    # level above the first. () is single-level GSA; (4,) after chunk_size 8 puts a <mgist> after
    # every 4 gists (32x); (4, 4) adds a third level (a level-2 <mgist> after every 4 level-1 ones).
    # A passage always closes its open sections, as it closes its last chunk.
    meta_chunks: tuple[int, ...] = ()
    # the first `sink` tokens get no gist and stay visible to every later token
    sink: int = 4
    # a raw token also sees this many chunks before its own (the local window)
    num_previous_chunks: int = 1
    # shift a chunk cut forward (at most chunk_size // 2 tokens) so it falls before a word start
    word_aware: bool = True
    # how many chunks each query head unfolds: "fixed" top_k, "adaptive" (from context
    # length, see selection.adaptive_k), or "top_p" (smallest set with softmax mass >= top_p)
    k_policy: Literal["fixed", "adaptive", "top_p"] = "fixed"
    top_k: int = 4
    # H-GSA: sections each query head keeps at every level above the chunks (the beam of the
    # coarse-to-fine search); None keeps top_k there too. A wider beam scores more gists
    # (beam x meta_chunks per level and head) but unfolds no more raw tokens: each head still
    # unfolds top_k chunks, now chosen among the children of more sections.
    section_top_k: int | None = None
    top_p: float = 0.9
    # adaptive k aims at attending ~ context_length / adaptive_ratio raw tokens per KV head
    adaptive_ratio: float = 8.0
    # layers below this never select: their gist keys carry little but position (layer 0's
    # gist inputs are all the same embedding); their question tokens see the gists only
    first_selecting_layer: int = 1
    # the gist keys that scoring reads: "cache", as the KV cache holds them; "int8", a copy
    # quantized per channel (gsa_rag.kernels.gist_keys8): half the bytes of bf16 keys at every
    # decode step, and picks that can differ from "cache"'s where chunks score within its rounding.
    # Single-level GSA only; an inference option (training refuses it). GistMemory.search ranks
    # passages by the cached keys either way.
    score_dtype: Literal["cache", "int8"] = "cache"
    gist_token: str = GIST_TOKEN
    mgist_token: str = MGIST_TOKEN
    link_tokens: list[str] = field(default_factory=link_tokens)
    # a prompt longer than the model's window (raw tokens + max_new_tokens): "error" refuses it
    # (ContextTooLongError); "drop_passages" drops the last passages until it fits
    overflow: Literal["error", "drop_passages"] = "error"

    def __post_init__(self) -> None:
        self._check_meta_chunks()
        for name in ("chunk_size", "sink", "num_previous_chunks", "top_k", "first_selecting_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints are fine
                raise ConfigError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if self.chunk_size < 0:
            raise ConfigError(f"chunk_size must be >= 0 (0 disables gists), got {self.chunk_size}")
        if self.sink < 0 or self.num_previous_chunks < 0:
            raise ConfigError(f"sink and num_previous_chunks must be >= 0, got {self.sink} and {self.num_previous_chunks}")
        if self.k_policy not in ("fixed", "adaptive", "top_p"):
            raise ConfigError(f"k_policy must be 'fixed', 'adaptive' or 'top_p', got {self.k_policy!r}")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1 (chunks each head unfolds; more than exist selects all), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.adaptive_ratio <= 0:
            raise ConfigError(f"adaptive_ratio must be > 0, got {self.adaptive_ratio}")
        if self.score_dtype not in ("cache", "int8"):
            raise ConfigError(f"score_dtype must be 'cache' or 'int8', got {self.score_dtype!r}")
        if self.score_dtype != "cache" and self.meta_chunks:
            raise ConfigError(f"score_dtype {self.score_dtype!r} is single-level only; use 'cache' with meta_chunks")
        if self.overflow not in ("error", "drop_passages"):
            raise ConfigError(f"overflow must be 'error' or 'drop_passages', got {self.overflow!r}")
        if self.meta_chunks and self.chunk_size == 0:
            raise ConfigError(f"meta_chunks {self.meta_chunks} needs gists to group: set chunk_size > 0 or meta_chunks=()")
        if self.meta_chunks and self.k_policy == "adaptive":
            raise ConfigError("k_policy 'adaptive' is single-level only; use 'fixed' or 'top_p' with meta_chunks")
        self._check_section_top_k()

    def _check_section_top_k(self) -> None:
        k = self.section_top_k
        if k is None:
            return
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ConfigError(f"section_top_k must be None (= top_k) or an int >= 1, got {k!r}")
        if not self.meta_chunks:
            raise ConfigError(f"section_top_k={k} is the H-GSA beam over sections: it needs meta_chunks (or leave it None)")
        if self.k_policy != "fixed":
            raise ConfigError(f"section_top_k (the beam over sections) needs k_policy 'fixed' "
                              f"(with {self.k_policy!r} that policy applies at every level)")
        self.section_top_k = int(k)

    def _check_meta_chunks(self) -> None:
        # JSON (adapters, memories) stores the tuple as a list: accept any sequence, keep a tuple
        if isinstance(self.meta_chunks, (str, bytes)) or not hasattr(self.meta_chunks, "__iter__"):
            raise ConfigError(f"meta_chunks must be a tuple of ints (gists per meta-gist per level), got {self.meta_chunks!r}")
        self.meta_chunks = tuple(self.meta_chunks)
        for value in self.meta_chunks:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"meta_chunks entries must be ints >= 1, got {self.meta_chunks!r}")
        self.meta_chunks = tuple(int(v) for v in self.meta_chunks)

    @property
    def uses_gists(self) -> bool:
        return self.chunk_size > 0

    @property
    def levels(self) -> int:
        """Gist levels: 1 for single-level GSA, 1 + len(meta_chunks) with the hierarchy."""
        return 1 + len(self.meta_chunks)

    @property
    def hierarchical(self) -> bool:
        return self.uses_gists and bool(self.meta_chunks)

    def level_top_k(self, level: int) -> int:
        """Units each query head keeps at gist level `level` (policy "fixed"): top_k chunks at
        level 0, section_top_k (default top_k) sections above."""
        return self.top_k if level == 0 or self.section_top_k is None else self.section_top_k

    @property
    def compression_ratio(self) -> int:
        """Raw tokens behind one top-level gist: chunk_size times every meta_chunks entry."""
        return math.prod((self.chunk_size, *self.meta_chunks))

    @property
    def special_tokens(self) -> list[str]:
        """Every token string the layout owns; user text can never produce them."""
        return [self.gist_token, self.mgist_token, *self.link_tokens]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        # at their defaults, fields added later are left out, so gsa-rag versions before them still read the file
        if data["section_top_k"] is None:
            del data["section_top_k"]
        if data["score_dtype"] == "cache":
            del data["score_dtype"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> GistConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown GistConfig fields {sorted(unknown)}; was it saved by a newer gsa-rag?")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GistConfig:
        return cls.from_dict(json.loads(text))
