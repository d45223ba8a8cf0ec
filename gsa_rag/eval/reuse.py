"""KV reuse for rag_eval's `gsa:reuse=1`: one GistMemory serves every question of a run.

Each passage is encoded once, alone, from position 0 with its gists (gsa_rag.memory); a question
over it re-rotates the cached keys to the passage's place and runs only the link tokens and the
question. Passages are content-addressed, so a passage that several questions share (HotpotQA
distractors, a corpus retriever's favourites) is encoded once for the whole run, and `report`
counts how often that saved an encoding.

The memory has a byte budget (least recently used passages are evicted past it, and encoded again
when a later question brings them back), so a long run cannot fill the GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from gsa_rag.errors import ConfigError
from gsa_rag.memory import GistMemory
from gsa_rag.prompt import DEFAULT_SYSTEM

CPU_BUDGET_BYTES = 4 << 30  # host RAM is shared with the run's other methods and the data
CUDA_BUDGET_SHARE = 0.25  # of the device memory free when the memory is made: room left for decoding


def default_budget(device: torch.device) -> int:
    """Bytes of KV the run's memory may hold when the spec names no budget."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_BUDGET_SHARE)
    return CPU_BUDGET_BYTES


@dataclass
class ReuseMemory:
    """The run's GistMemory and what it did: made at the first question (it needs the engine).

    Attributes:
        budget_mb: byte budget in MiB; 0: `default_budget`.
        memory: the GistMemory (None before the first question).
        encoded: passage encodings (a passage evicted and brought back again counts twice).
        used: passages answered over, summed over questions (repeats counted).
        seen: every distinct passage id the run used.
        encode_seconds: time spent adding passages (encoding what was missing).
    """

    budget_mb: int = 0
    memory: GistMemory | None = None
    encoded: int = 0
    used: int = 0
    seen: set[str] = field(default_factory=set)
    encode_seconds: float = 0.0

    def _memory_for(self, engine) -> GistMemory:
        if not engine.config.uses_gists:
            raise ConfigError(
                "gsa:reuse=1 answers from gist memory, and this engine has no gists (chunk_size 0): "
                "give the gsa method a chunk size >= 1 (e.g. gsa:chunk=8:reuse=1)"
            )
        if self.memory is None or self.memory.engine is not engine:
            budget = self.budget_mb << 20 if self.budget_mb > 0 else default_budget(engine.device)
            # the default system line, as the plain gsa method's engine.layout uses; num_links
            # comes from the engine's adapter (trained with `train sft --reuse`), else every link token
            self.memory = GistMemory(engine, max_bytes=budget, system=DEFAULT_SYSTEM, progress=False)
        return self.memory

    def prepare(self, engine, question: str, passages: list):
        """(layout [1, T], GistCache) of one question: its passages added to the memory (those
        not held yet are encoded), then laid out by id for KV reuse, exactly as
        `engine.generate(question, ids, memory=memory)` lays them out."""
        memory = self._memory_for(engine)
        start = time.perf_counter()
        held = set(memory.ids)
        ids = memory.add(passages)  # content-addressed: a passage held already costs nothing
        self.encode_seconds += time.perf_counter() - start
        self.encoded += len(set(ids) - held)
        self.used += len(ids)
        self.seen.update(ids)
        return memory.prepare(question, ids, DEFAULT_SYSTEM)

    def report(self) -> dict:
        """Run-level fields for the method's summary."""
        out = {"passages_used": self.used, "passages_unique": len(self.seen), "passages_encoded": self.encoded,
               "encode_seconds": self.encode_seconds}
        if self.memory is not None:
            memory = self.memory
            out.update({"num_links": memory.num_links, "memory_budget_bytes": memory.max_bytes,
                        "encoded_tokens": memory.encoded_tokens,
                        "link_tokens_trained": bool((getattr(memory.engine, "adapter", None) or {}).get("kv_reuse")),
                        "memory_stats": memory.stats().as_dict()})
        return out
