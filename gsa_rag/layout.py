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
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field, fields
from functools import lru_cache
from itertools import compress, pairwise

import torch

from gsa_rag.config import GistConfig
from gsa_rag.kernels.dispatch import to_device_together

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
    size = len(table)
    return [table[i] if 0 <= i < size else True for i in ids]


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
        names = [f.name for f in fields(self)]
        moved = to_device_together([getattr(self, name) for name in names], device)  # one copy to CUDA
        out = GistLayout(**dict(zip(names, moved, strict=True)))
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


def _chunk_ends(starts: list[bool], begin: int, chunk_size: int, max_extra: int) -> list[int]:
    """Where the chunks of one compressed segment end: the column (within the segment, exclusive)
    after which each gist goes, for the raw tokens `begin..len(starts)` (those before `begin` are
    sink). The last end is always `len(starts)`: the segment's closing gist.

    A chunk ends after `chunk_size` tokens if a word starts right after them (the end of the
    segment counts as one); otherwise it waits for the next word start, at most `max_extra` more
    tokens. `starts[i]`: token i of the segment begins a word. `chunk_size` >= 1.
    """
    n = len(starts)
    ends = []
    while begin < n:
        end = begin + chunk_size
        if end < n and not starts[end]:  # mid-word: move the cut to the next word start within reach
            reach = min(begin + chunk_size + max_extra, n)
            end = next((i for i in range(end + 1, reach) if starts[i]), reach)
        end = min(end, n)  # a segment shorter than a chunk closes where it ends
        ends.append(end)
        begin = end
    return ends


def _lay_out_row(segments: list[Segment], config: GistConfig, gist_id: int, starts, memo: dict | None = None) -> _Row:
    # Built a segment at a time with list.extend, never a token at a time: a prompt is thousands
    # of tokens and this runs on every request (gist memory's prepare, every training batch).
    row = _Row([], [], [], [], [], [])
    chunk = 0  # the open chunk: raw tokens laid out now belong to it
    seen_raw_segment = False
    max_extra = config.chunk_size // 2 if config.word_aware else 0

    def extend(ids, chunk_of: list[int], passage: int, doc: int, is_gist=None, is_link=None) -> None:
        """Appends tokens `ids` of one segment (is_gist, is_link: default all False)."""
        n = len(ids)
        row.ids.extend(ids)
        row.is_gist.extend(is_gist if is_gist is not None else [False] * n)
        row.chunk_id.extend(chunk_of)
        row.passage_id.extend([passage] * n)
        row.doc_id.extend([doc] * n)
        row.is_link.extend(is_link if is_link is not None else [False] * n)

    for seg in segments:
        row.boundaries.append(len(row.ids))
        if seg.independent and (not seg.compress or seg.passage_id < 0):
            raise ValueError("an independent (KV reuse) segment must be a compressed passage with passage_id >= 0")
        if seg.link and seen_raw_segment:
            raise ValueError("link segments must come before raw ones (question/answer)")
        chunked = seg.compress and config.uses_gists and not seg.link
        if chunked and seen_raw_segment:
            raise ValueError("compressed (context) segments must come before raw ones (question/answer)")
        doc = seg.passage_id if seg.independent else -1  # KV reuse: the passage encoded on its own
        # the row's first `config.sink` tokens are sink (chunk -1, no gist, never a link), whatever
        # segments they fall in; the rest of the segment follows the segment's rule
        n_sink = min(max(config.sink - len(row.ids), 0), len(seg.ids))
        rest = len(seg.ids) - n_sink
        if seg.link:  # after the previous passage's closing gist, in its last chunk
            chunk_of = [SINK_CHUNK] * n_sink + [max(chunk - 1, 0)] * rest
            extend(seg.ids, chunk_of, seg.passage_id, doc, is_link=[False] * n_sink + [True] * rest)
        elif not chunked:  # raw: the question/answer tail, or any segment when gists are off
            seen_raw_segment = seen_raw_segment or not seg.compress
            extend(seg.ids, [SINK_CHUNK] * n_sink + [chunk] * rest, seg.passage_id, doc)
        else:  # context: each chunk's raw tokens, then its gist, all in that chunk
            keep = memo is not None and n_sink == 0 and isinstance(seg.ids, tuple)  # a tuple hashes
            key = (seg.ids, config.chunk_size, max_extra, gist_id) if keep else None
            piece = memo.get(key) if key is not None else None
            if piece is None:
                piece = _chunk_piece(seg.ids, n_sink, config.chunk_size, max_extra, gist_id, starts)
                if key is not None:
                    if len(memo) >= _MEMO_SEGMENTS:
                        memo.clear()
                    memo[key] = piece
            ids, is_gist, chunk_of, num_chunks = piece
            extend(ids, [c if c < 0 else c + chunk for c in chunk_of], seg.passage_id, doc, is_gist=is_gist)
            chunk += num_chunks
    # tokens after the last gist belong to the open chunk `chunk`
    row.boundaries.append(len(row.ids))
    return row


# Gist memory lays out the same passages for question after question: a compressed segment's
# chunking depends only on its ids and the chunking settings, so `build_layout` keeps it per
# tokenizer (word starts come from the tokenizer). An entry holds three lists as long as the
# segment (about 8 KB at 300 tokens); past the bound the memo starts again, so it stays under
# about 10 MB a tokenizer for passages of that size.
_MEMO_SEGMENTS = 1024


@lru_cache(maxsize=8)
def _chunking_memo(tokenizer) -> dict:
    """{(segment ids, chunk_size, max_extra, gist id): its `_chunk_piece`} for one tokenizer."""
    return {}


def _chunk_piece(seg_ids: tuple[int, ...], n_sink: int, chunk_size: int, max_extra: int, gist_id: int, starts):
    """One compressed segment laid out on its own: (ids with gists, is_gist, chunk of each token
    counted from 0 (SINK_CHUNK for its first `n_sink` tokens), number of chunks)."""
    ids, is_gist, chunk_of = list(seg_ids[:n_sink]), [False] * n_sink, [SINK_CHUNK] * n_sink
    # word starts only matter where a cut can move (max_extra > 0)
    seg_starts = starts(list(seg_ids)) if max_extra else [True] * len(seg_ids)
    begin, chunk = n_sink, 0
    for end in _chunk_ends(seg_starts, begin, chunk_size, max_extra):
        ids.extend(seg_ids[begin:end])
        ids.append(gist_id)
        is_gist.extend([False] * (end - begin))
        is_gist.append(True)
        chunk_of.extend([chunk] * (end - begin + 1))
        chunk, begin = chunk + 1, end
    return ids, is_gist, chunk_of, chunk


def _insert_after(values: list, after: list[int], new: list) -> list:
    """`values` with `new[k]` inserted right after column `after[k]` (`after` increasing)."""
    out, prev = [], 0
    for column, value in zip(after, new):
        out.extend(values[prev : column + 1])
        out.append(value)
        prev = column + 1
    out.extend(values[prev:])
    return out


def _add_level(row: _Row, level: int, per_section: int, mgist_id: int) -> _Row:
    """Inserts a level-`level` gist after every `per_section` gists of level `level - 1`, and at
    every segment boundary that leaves a section open (a passage closes its sections).

    The new gist copies the chunk, passage and doc of the token before it (the gist it follows),
    so it stays inside its passage for the KV-reuse rule and chunk ids never move backwards.
    """
    # columns of the level - 1 gists (itertools keeps the scan over tokens out of Python)
    units = list(compress(range(len(row.level)), map((level - 1).__eq__, row.level)))
    # a section open at a segment boundary closes before it; boundaries split the row into segments
    # (sorted(set(...)): an empty segment adds a repeated boundary, which splits nothing)
    closes = sorted(set(row.boundaries))
    after = []  # columns the new gists follow, in order
    for begin, end in pairwise(closes):
        seg_units = units[bisect_left(units, begin) : bisect_left(units, end)]
        after.extend(seg_units[per_section - 1 :: per_section])  # every per_section-th gist closes a section
        if len(seg_units) % per_section:  # the section left open closes after the segment's last token
            after.append(end - 1)

    m = len(after)
    out = _Row(
        ids=_insert_after(row.ids, after, [mgist_id] * m),
        is_gist=_insert_after(row.is_gist, after, [True] * m),
        chunk_id=_insert_after(row.chunk_id, after, [row.chunk_id[j] for j in after]),
        passage_id=_insert_after(row.passage_id, after, [row.passage_id[j] for j in after]),
        doc_id=_insert_after(row.doc_id, after, [row.doc_id[j] for j in after]),
        is_link=_insert_after(row.is_link, after, [False] * m),
        level=_insert_after(row.level, after, [level] * m),
        # a boundary moves right by the new gists before it (a closing one goes just before it)
        boundaries=[b + bisect_left(after, b) for b in closes],
    )
    return out


def _lay_out_levels(row: _Row, config: GistConfig, mgist_id: int) -> _Row:
    """The level-0 row with every higher level of `config.meta_chunks` inserted (H-GSA)."""
    row.level = [-1] * len(row.is_gist)
    for column in compress(range(len(row.is_gist)), row.is_gist):
        row.level[column] = 0
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
    memo = _chunking_memo(tokenizer)
    rows = [_lay_out_row(segs, config, gist_id, starts, memo) for segs in segments_batch]
    if any(not r.ids for r in rows):
        raise ValueError("empty prompt: every sequence needs at least one token")
    if config.hierarchical:
        mgist_id = tokenizer.convert_tokens_to_ids(config.mgist_token)
        if mgist_id is None or mgist_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {config.mgist_token!r} token: load the model with gsa_rag.models.load_model")
        rows = [_lay_out_levels(r, config, mgist_id) for r in rows]

    B, T = len(rows), max(len(r.ids) for r in rows)
    C = max(1, max(r.level.count(0) if r.level else r.is_gist.count(True) for r in rows))  # level-0 gists
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
        is_gist = _bool_tensor(r.is_gist)
        out["input_ids"][b, pad:] = _long_tensor(r.ids)
        out["is_gist"][b, pad:] = is_gist
        out["is_sink"][b, pad : pad + min(config.sink, n)] = True
        out["chunk_id"][b, pad:] = _long_tensor(r.chunk_id)
        out["passage_id"][b, pad:] = _long_tensor(r.passage_id)
        out["doc_id"][b, pad:] = _long_tensor(r.doc_id)
        out["is_link"][b, pad:] = _bool_tensor(r.is_link)
        out["position_ids"][b, pad:] = torch.arange(n) - torch.cumsum(is_gist.long(), 0)
        out["valid"][b, pad:] = True
        level0 = _long_tensor(r.level) == 0 if r.level else is_gist  # chunks are closed by level-0 gists only
        gists = torch.nonzero(level0).flatten() + pad
        out["num_chunks"][b] = len(gists)
        out["gist_index"][b, : len(gists)] = gists
    if config.hierarchical:
        out.update(_hierarchy_tensors(rows, out["chunk_id"], config.levels))
    return GistLayout(**out).to(device)


# torch.tensor(list) converts element by element (about 0.1 us each: 0.3 ms for a 3,000-token row,
# nine times per layout); array/bytearray pack the list in C and torch.frombuffer wraps that, ~10x
# faster. The results are only copied into the batch tensors, never kept (they share the buffer).
def _long_tensor(values: list[int]) -> torch.Tensor:
    """torch.tensor(values) for a non-empty list of ints, as int64."""
    return torch.frombuffer(array("q", values), dtype=torch.long)


def _bool_tensor(values: list[bool]) -> torch.Tensor:
    """torch.tensor(values, dtype=torch.bool) for a non-empty list of bools."""
    return torch.frombuffer(bytearray(values), dtype=torch.bool)


def _hierarchy_tensors(rows: list[_Row], chunk_id: torch.Tensor, num_levels: int) -> dict[str, torch.Tensor]:
    """level [B, T], section_id [B, T, L-1], num_sections [B, L-1], section_index [B, L-1, S]
    of left-padded hierarchical rows (see GistLayout), given their chunk_id [B, T]."""
    B, T = chunk_id.shape
    level = torch.full((B, T), -1, dtype=torch.long)
    section_id = torch.full((B, T, num_levels - 1), PAD_CHUNK, dtype=torch.long)
    tables = []
    for b, r in enumerate(rows):
        pad = T - len(r.ids)
        level[b, pad:] = _long_tensor(r.level)
        ids, index = _section_tables(level[b, pad:], chunk_id[b, pad:], num_levels)
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
