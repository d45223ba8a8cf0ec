"""Token layout: ids with gists inserted, and the per-token metadata every later room reads.

A prompt is a list of `Segment`s. Context segments (the template prefix, each passage) are
cut into chunks of about `chunk_size` raw tokens, each followed by one gist; the question
and everything generated after it stay raw. The metadata is computed here once and carried
forward; nothing downstream re-derives it from token ids.

Chunk ids: sink tokens get -1 (always visible), chunk c's raw tokens *and its gist* get c,
and every token after the last gist (question, answer) belongs to the open chunk
`num_chunks`, so "previous chunk" for the question is the last context chunk.
Left padding (for batches) gets chunk id PAD_CHUNK and `valid == False`.

KV reuse (gist memory, training `--reuse`): a segment marked `independent` is a passage encoded
on its own; its tokens get `doc_id = passage_id` (every other token -1) and, under the mask
rule, see only their own passage and the sink. A `link` segment holds link tokens placed right
after a passage's closing gist: raw (no gist), in that passage's last chunk, `is_link` True,
seen by every later token. See gsa_rag.memory for the whole rule.

Hierarchy (H-GSA, `config.meta_chunks`): after the level-0 gists are in place, each higher level
l puts one `<mgist>` after every `meta_chunks[l-1]` gists of level l-1, and closes its open
section at the end of every segment (as a passage closes its last chunk). A level-l gist costs no
position either (`is_gist` is True for every level; `level` says which) and belongs to the chunk
of the token before it. A token's level-l section is the section of its chunk, so sections, like
chunks, are -1 for the sink, PAD_CHUNK for padding and `num_sections` (the open one) for the tail.
A single-level config never runs this pass: its layout is the level-0 layout, bit for bit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from functools import lru_cache

import torch

from gsa_rag.config import GistConfig

SINK_CHUNK = -1
PAD_CHUNK = -2

# A fast (Rust) tokenizer keeps `split_special_tokens` as a flag on the shared object and sets it
# on every call. Two threads tokenizing user text (flag on) and template text (flag off) at once
# can interleave set and encode, so a passage gets tokenized with special-token parsing on: an
# injection (measured: 9 of 1,200 concurrent calls). Every gsa-rag call that tokenizes takes this
# lock (tests/test_reliability.py::test_concurrent_tokenization_cannot_inject).
TOKENIZER_LOCK = threading.RLock()

# Markers byte-level BPE (GPT-2: Ġ space, Ċ newline, ĉ tab) and SentencePiece (▁) put at
# the start of a token that begins a new word.
_WORD_START_MARKERS = frozenset("ĠĊĉ▁ \n\t")


@dataclass(frozen=True)
class Segment:
    """A run of token ids of one kind.

    Attributes:
        ids: token ids (already injection-safe: see `encode_text`).
        compress: True for context (chunked, gists inserted), False for the raw tail.
        passage_id: which passage the tokens belong to; -1 for template text.
        independent: KV reuse: the passage is encoded on its own (its tokens see only
            themselves and the sink); needs `compress` and `passage_id >= 0`.
        link: link tokens (KV reuse): raw, placed after the previous passage's closing gist,
            in that passage's last chunk, visible to every later token.
    """

    ids: tuple[int, ...]
    compress: bool
    passage_id: int = -1
    independent: bool = False
    link: bool = False


def encode_text(tokenizer, text: str) -> list[int]:
    """Tokenizes user text so that special-token strings in it ("<gist>", "<|im_start|>")
    stay plain text: only the layout and the chat template create special tokens."""
    with TOKENIZER_LOCK:  # see TOKENIZER_LOCK: the flag and the encode must not interleave
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@lru_cache(maxsize=8)
def _word_start_table(tokenizer) -> tuple[bool, ...]:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return tuple(not t or t[0] in _WORD_START_MARKERS or not t[0].isalnum() for t in tokens)


def word_starts(tokenizer, ids: list[int]) -> list[bool]:
    """For each id, whether that token begins a word (so a chunk may end just before it)."""
    table = _word_start_table(tokenizer)
    return [table[i] if 0 <= i < len(table) else True for i in ids]


@dataclass(frozen=True)
class HostFacts:
    """The layout facts that attention branches on in every layer, as Python ints.

    Reading a value out of a device tensor (`int(t)`, `if t.any()`) waits for the device to
    finish all queued work; doing it in each of 30 layers stalls the launch queue 30 times per
    forward. These facts depend on the layout only, so they are read once (for free where the
    layout is still on the host) and carried along by `to` and `append`.

    Attributes:
        max_chunks: the most closed chunks of any sequence (0: nothing can be selected).
        first_tail: the earliest column of any sequence's tail (see `GistLayout.is_tail`); the
            sequence length at the time if no sequence has a tail yet (appended tokens start
            there). Appending tail tokens changes neither.
    """

    max_chunks: int
    first_tail: int


@dataclass
class GistLayout:
    """A left-padded batch of laid-out sequences. Every tensor is [B, T] on one device.

    Attributes:
        input_ids: long, token ids with gists inserted.
        is_gist: bool, True at gist tokens of every level (all cost no position, none is a
            label); `level` tells a gist from a meta-gist.
        is_sink: bool, True for the first `sink` tokens of each sequence.
        chunk_id: long, see the module docstring.
        passage_id: long, passage of each token, -1 for template/question/answer/padding.
        position_ids: long, RoPE positions `pos - cumsum(is_gist)` (a gist shares the position
            of the raw token before it; raw tokens keep the positions they would have without
            gists).
        valid: bool, False for left padding.
        num_chunks: long [B], closed chunks per sequence (the tail is chunk `num_chunks`).
        gist_index: long [B, C], column of chunk c's gist (0 where c >= num_chunks).
        doc_id: long [B, T], KV reuse: the independently encoded passage of each token, -1
            elsewhere (default: all -1, the rule is then a no-op).
        is_link: bool [B, T], KV reuse: link tokens (default: none).
        level: long [B, T], -1 for every non-gist token (padding included), l for a level-l
            gist (0: `<gist>`, 1 and up: `<mgist>`). Default: 0 where is_gist, else -1.
        section_id: long [B, T, L-1], the level-l section of each token at [..., l-1] (L gist
            levels; width 0 for a single-level layout): the section of the token's chunk, the
            one a level-l gist closes; -1 sink, PAD_CHUNK padding, num_sections[l-1] the tail.
        num_sections: long [B, L-1], closed level-l sections per sequence.
        section_index: long [B, L-1, S], column of the gist closing each level-l section (0 where
            the section does not exist).
    """

    input_ids: torch.Tensor
    is_gist: torch.Tensor
    is_sink: torch.Tensor
    chunk_id: torch.Tensor
    passage_id: torch.Tensor
    position_ids: torch.Tensor
    valid: torch.Tensor
    num_chunks: torch.Tensor
    gist_index: torch.Tensor
    doc_id: torch.Tensor | None = None
    is_link: torch.Tensor | None = None
    level: torch.Tensor | None = None
    section_id: torch.Tensor | None = None
    num_sections: torch.Tensor | None = None
    section_index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.doc_id is None:
            self.doc_id = torch.full_like(self.input_ids, -1)
        if self.is_link is None:
            self.is_link = torch.zeros_like(self.is_gist)
        if self.level is None:  # a single-level layout: every gist is level 0
            self.level = torch.where(self.is_gist, 0, -1)
        B, T = self.input_ids.shape
        if self.section_id is None:
            self.section_id = self.input_ids.new_zeros(B, T, 0)
        if self.num_sections is None:
            self.num_sections = self.input_ids.new_zeros(B, self.section_id.shape[-1])
        if self.section_index is None:
            self.section_index = self.input_ids.new_zeros(B, self.section_id.shape[-1], 0)

    @property
    def levels(self) -> int:
        """Gist levels L (1: single-level GSA)."""
        return 1 + self.section_id.shape[-1]

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def gist_valid(self) -> torch.Tensor:
        """bool [B, C]: which entries of gist_index are real chunks."""
        c = torch.arange(self.gist_index.shape[1], device=self.gist_index.device)
        return c[None, :] < self.num_chunks[:, None]

    @property
    def is_tail(self) -> torch.Tensor:
        """bool [B, T]: tokens after the last gist (question, answer): these select chunks."""
        return self.valid & (self.chunk_id == self.num_chunks[:, None])

    def units(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The gists of one level as selection sees them.

        Returns:
            (long [B, N] gist columns, bool [B, N] which exist): chunks for level 0
            (gist_index, gist_valid), level-`level` sections above it.
        """
        if level == 0:
            return self.gist_index, self.gist_valid
        index = self.section_index[:, level - 1]
        s = torch.arange(index.shape[1], device=index.device)
        return index, s[None, :] < self.num_sections[:, level - 1, None]

    def parents(self, level: int) -> torch.Tensor:
        """long [B, N]: the level-(level+1) section of each unit of `level` (see `units`).
        Entries of units that do not exist are clamped garbage: mask them with `units`' valid."""
        index, _ = self.units(level)
        return torch.gather(self.section_id[:, :, level], 1, index)

    def host_facts(self) -> HostFacts:
        """The layout's HostFacts: carried from the host layout it was moved or grown from, else
        read once (one device sync for a layout on an accelerator) and kept."""
        facts = self.__dict__.get("_host_facts")
        if facts is None:
            tail = self.is_tail
            first = torch.where(tail.any(-1), tail.int().argmax(-1), self.seq_len).min()
            max_chunks, first_tail = torch.stack([self.num_chunks.max(), first]).tolist()
            facts = self.__dict__["_host_facts"] = HostFacts(max_chunks, first_tail)
        return facts

    def _keep_host_facts(self, facts: HostFacts | None) -> None:
        # beside the dataclass fields (like append's `_lineage`): `fields(layout)` lists the tensors
        if facts is not None:
            self.__dict__.setdefault("_host_facts", facts)

    def _free_host_facts(self) -> HostFacts | None:
        """The HostFacts if they cost no device sync (already known, or the layout is on the host)."""
        if "_host_facts" in self.__dict__ or self.num_chunks.device.type == "cpu":
            return self.host_facts()
        return None

    def to(self, device) -> GistLayout:
        out = GistLayout(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
        out._keep_host_facts(self._free_host_facts())  # read here, on the host, before the move
        return out

    def append(self, ids: torch.Tensor) -> GistLayout:
        """Extends every sequence with raw tail tokens (generated answer tokens).

        Args:
            ids: long [B, n] new token ids.
        """
        n = ids.shape[1]
        steps = torch.arange(1, n + 1, device=ids.device)
        bn = (self.batch_size, n)
        out = GistLayout(
            input_ids=torch.cat([self.input_ids, ids], 1),
            is_gist=torch.cat([self.is_gist, self.is_gist.new_zeros(bn)], 1),
            is_sink=torch.cat([self.is_sink, self.is_sink.new_zeros(bn)], 1),
            chunk_id=torch.cat([self.chunk_id, self.num_chunks[:, None].expand(bn)], 1),
            passage_id=torch.cat([self.passage_id, self.passage_id.new_full(bn, -1)], 1),
            position_ids=torch.cat([self.position_ids, self.position_ids[:, -1:] + steps], 1),
            valid=torch.cat([self.valid, self.valid.new_ones(bn)], 1),
            num_chunks=self.num_chunks,
            gist_index=self.gist_index,
            doc_id=torch.cat([self.doc_id, self.doc_id.new_full(bn, -1)], 1),
            is_link=torch.cat([self.is_link, self.is_link.new_zeros(bn)], 1),
            level=torch.cat([self.level, self.level.new_full(bn, -1)], 1),
            # the tail sits in the open section of every level, as it sits in the open chunk
            section_id=torch.cat([self.section_id, self.num_sections[:, None, :].expand(*bn, -1)], 1),
            num_sections=self.num_sections,
            section_index=self.section_index,
        )
        # layouts grown by append share a cache of what stays fixed while tail tokens are appended
        # (gsa_rag.kernels.gist_select.DecodePlan.build); it is keyed by what it depends on
        out.__dict__["_lineage"] = self.__dict__.get("_lineage", {})
        out._keep_host_facts(self._free_host_facts())  # appended tail tokens change neither fact
        return out


@dataclass
class _Row:
    ids: list[int]
    is_gist: list[bool]
    chunk_id: list[int]
    passage_id: list[int]
    doc_id: list[int]
    is_link: list[bool]
    level: list[int] = field(default_factory=list)  # filled by the hierarchy pass
    boundaries: list[int] = field(default_factory=list)  # column where each segment starts, then the end


def _lay_out_row(segments: list[Segment], config: GistConfig, gist_id: int, starts) -> _Row:
    row = _Row([], [], [], [], [], [])
    chunk, in_chunk = 0, 0  # current chunk id, raw tokens in it so far
    seen_raw_segment = False
    max_extra = config.chunk_size // 2 if config.word_aware else 0
    doc = -1  # doc_id of the tokens being pushed (KV reuse)

    def push(token: int, gist: bool, chunk_of: int, passage: int, link: bool = False) -> None:
        row.ids.append(token)
        row.is_gist.append(gist)
        row.chunk_id.append(chunk_of)
        row.passage_id.append(passage)
        row.doc_id.append(doc)
        row.is_link.append(link)

    for seg in segments:
        row.boundaries.append(len(row.ids))
        if seg.independent and (not seg.compress or seg.passage_id < 0):
            raise ValueError("an independent (KV reuse) segment must be a compressed passage with passage_id >= 0")
        doc = seg.passage_id if seg.independent else -1
        if seg.link:
            if seen_raw_segment:
                raise ValueError("link segments must come before raw ones (question/answer)")
            for t in seg.ids:  # after the previous passage's closing gist, in its last chunk
                sink = len(row.ids) < config.sink
                push(t, False, SINK_CHUNK if sink else max(chunk - 1, 0), seg.passage_id, link=not sink)
            continue
        if not seg.compress or not config.uses_gists:
            seen_raw_segment = seen_raw_segment or not seg.compress
            for t in seg.ids:
                push(t, False, SINK_CHUNK if len(row.ids) < config.sink else chunk, seg.passage_id)
            continue
        if seen_raw_segment:
            raise ValueError("compressed (context) segments must come before raw ones (question/answer)")
        seg_starts = starts(list(seg.ids))
        for i, t in enumerate(seg.ids):
            if len(row.ids) < config.sink:
                push(t, False, SINK_CHUNK, seg.passage_id)
                continue
            push(t, False, chunk, seg.passage_id)
            in_chunk += 1
            last_in_segment = i == len(seg.ids) - 1
            at_word_start = last_in_segment or seg_starts[i + 1]
            if in_chunk >= config.chunk_size + max_extra or (in_chunk >= config.chunk_size and at_word_start):
                push(gist_id, True, chunk, seg.passage_id)
                chunk, in_chunk = chunk + 1, 0
        if in_chunk > 0:  # the closing gist of this passage
            push(gist_id, True, chunk, seg.passage_id)
            chunk, in_chunk = chunk + 1, 0
    # tokens after the last gist belong to the open chunk `chunk`
    row.boundaries.append(len(row.ids))
    return row


def _add_level(row: _Row, level: int, per_section: int, mgist_id: int) -> _Row:
    """Inserts a level-`level` gist after every `per_section` gists of level `level - 1`, and at
    every segment boundary that leaves a section open (a passage closes its sections).

    The new gist copies the chunk, passage and doc of the token before it (the gist it follows),
    so it stays inside its passage for the KV-reuse rule and chunk ids never move backwards.
    """
    out = _Row([], [], [], [], [], [], [], [])
    closes = set(row.boundaries)  # a section open at one of these columns closes before it
    open_units = 0  # gists of level - 1 in the open section

    def close_section(after: int) -> None:
        for name in ("chunk_id", "passage_id", "doc_id"):
            getattr(out, name).append(getattr(row, name)[after])
        out.ids.append(mgist_id)
        out.is_gist.append(True)
        out.is_link.append(False)
        out.level.append(level)

    for i in range(len(row.ids) + 1):
        if i in closes:
            if open_units:
                close_section(i - 1)
                open_units = 0
            out.boundaries.append(len(out.ids))
        if i == len(row.ids):
            break
        for name in ("ids", "is_gist", "chunk_id", "passage_id", "doc_id", "is_link", "level"):
            getattr(out, name).append(getattr(row, name)[i])
        if row.level[i] == level - 1:
            open_units += 1
            if open_units == per_section:
                close_section(i)
                open_units = 0
    return out


def _lay_out_levels(row: _Row, config: GistConfig, mgist_id: int) -> _Row:
    """The level-0 row with every higher level of `config.meta_chunks` inserted (H-GSA)."""
    row.level = [0 if g else -1 for g in row.is_gist]
    for level, per_section in enumerate(config.meta_chunks, start=1):
        row = _add_level(row, level, per_section, mgist_id)
    return row


def _section_tables(level: torch.Tensor, chunk_id: torch.Tensor, num_levels: int):
    """Per-token section ids of one row, from its levels and chunk ids.

    A token's level-l section is the section of its chunk (the tail's: the open one), so the
    ids follow from where the gists of each level sit: the section of chunk c is the number of
    level-l gists before chunk c's gist.

    Args:
        level: long [n]; chunk_id: long [n] (SINK_CHUNK for the sink).
        num_levels: L.

    Returns:
        (section_id long [n, L-1], section_index list of L-1 long [S_l] gist columns).
    """
    gist0 = torch.nonzero(level == 0).flatten()
    section_id, section_index = [], []
    for l in range(1, num_levels):
        is_l = level == l
        before = torch.cumsum(is_l.long(), 0) - is_l.long()  # level-l gists strictly before each column
        chunk_section = torch.cat([before[gist0], is_l.sum()[None]])  # closed chunks, then the tail
        section_id.append(torch.where(chunk_id >= 0, chunk_section[chunk_id.clamp(min=0)], chunk_id))
        section_index.append(torch.nonzero(is_l).flatten())
    return torch.stack(section_id, -1) if section_id else level.new_zeros(len(level), 0), section_index


def build_layout(
    segments_batch: list[list[Segment]],
    config: GistConfig,
    tokenizer,
    *,
    pad_id: int | None = None,
    device: torch.device | str = "cpu",
) -> GistLayout:
    """Lays out a batch of prompts, left-padded to one length.

    Args:
        segments_batch: one list of segments per sequence; compressed segments first.
        config: chunk size, sink, word awareness.
        tokenizer: must already hold `config.gist_token` (see models.add_gist_tokens).
        pad_id: id for left padding (default: tokenizer.pad_token_id or 0).
        device: where the tensors go.
    """
    gist_id = tokenizer.convert_tokens_to_ids(config.gist_token)
    if config.uses_gists and (gist_id is None or gist_id == tokenizer.unk_token_id):
        raise ValueError(f"tokenizer has no {config.gist_token!r} token: load the model with gsa_rag.models.load_model")
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    starts = (lambda ids: word_starts(tokenizer, ids)) if config.word_aware else (lambda ids: [True] * len(ids))
    rows = [_lay_out_row(segs, config, gist_id, starts) for segs in segments_batch]
    if any(not r.ids for r in rows):
        raise ValueError("empty prompt: every sequence needs at least one token")
    if config.hierarchical:
        mgist_id = tokenizer.convert_tokens_to_ids(config.mgist_token)
        if mgist_id is None or mgist_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {config.mgist_token!r} token: load the model with gsa_rag.models.load_model")
        rows = [_lay_out_levels(r, config, mgist_id) for r in rows]

    B, T = len(rows), max(len(r.ids) for r in rows)
    C = max(1, max(sum(r.is_gist) - sum(lv > 0 for lv in r.level) for r in rows))  # level-0 gists
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "is_gist": torch.zeros(B, T, dtype=torch.bool),
        "is_sink": torch.zeros(B, T, dtype=torch.bool),
        "chunk_id": torch.full((B, T), PAD_CHUNK, dtype=torch.long),
        "passage_id": torch.full((B, T), -1, dtype=torch.long),
        "position_ids": torch.zeros(B, T, dtype=torch.long),
        "valid": torch.zeros(B, T, dtype=torch.bool),
        "num_chunks": torch.zeros(B, dtype=torch.long),
        "gist_index": torch.zeros(B, C, dtype=torch.long),
        "doc_id": torch.full((B, T), -1, dtype=torch.long),
        "is_link": torch.zeros(B, T, dtype=torch.bool),
    }
    for b, r in enumerate(rows):
        n, pad = len(r.ids), T - len(r.ids)
        is_gist = torch.tensor(r.is_gist, dtype=torch.bool)
        out["input_ids"][b, pad:] = torch.tensor(r.ids)
        out["is_gist"][b, pad:] = is_gist
        out["is_sink"][b, pad : pad + min(config.sink, n)] = True
        out["chunk_id"][b, pad:] = torch.tensor(r.chunk_id)
        out["passage_id"][b, pad:] = torch.tensor(r.passage_id)
        out["doc_id"][b, pad:] = torch.tensor(r.doc_id)
        out["is_link"][b, pad:] = torch.tensor(r.is_link)
        out["position_ids"][b, pad:] = torch.arange(n) - torch.cumsum(is_gist.long(), 0)
        out["valid"][b, pad:] = True
        level0 = torch.tensor(r.level) == 0 if r.level else is_gist  # chunks are closed by level-0 gists only
        gists = torch.nonzero(level0).flatten() + pad
        out["num_chunks"][b] = len(gists)
        out["gist_index"][b, : len(gists)] = gists
    if config.hierarchical:
        out.update(_hierarchy_tensors(rows, T, config.levels))
    return GistLayout(**out).to(device)


def _hierarchy_tensors(rows: list[_Row], T: int, num_levels: int) -> dict[str, torch.Tensor]:
    """level [B, T], section_id [B, T, L-1], num_sections [B, L-1], section_index [B, L-1, S]
    of left-padded hierarchical rows (see GistLayout)."""
    B = len(rows)
    level = torch.full((B, T), -1, dtype=torch.long)
    section_id = torch.full((B, T, num_levels - 1), PAD_CHUNK, dtype=torch.long)
    tables = []
    for b, r in enumerate(rows):
        pad = T - len(r.ids)
        level[b, pad:] = torch.tensor(r.level)
        ids, index = _section_tables(level[b, pad:], torch.tensor(r.chunk_id), num_levels)
        section_id[b, pad:] = ids
        tables.append([i + pad for i in index])
    S = max(1, max(len(i) for t in tables for i in t))
    section_index = torch.zeros(B, num_levels - 1, S, dtype=torch.long)
    num_sections = torch.zeros(B, num_levels - 1, dtype=torch.long)
    for b, t in enumerate(tables):
        for l, index in enumerate(t):
            section_index[b, l, : len(index)] = index
            num_sections[b, l] = len(index)
    return {"level": level, "section_id": section_id, "num_sections": num_sections, "section_index": section_index}
