"""The bulk layout (gsa_rag.layout) against the per-token implementation it replaced.

`build_layout` lays out rows a segment at a time, in bulk, and packs them into tensors without
torch.tensor(list). The `reference_*` functions below are the original implementation, kept
unchanged (only renamed; `_section_tables` did not change and is shared): every layout they build
must equal the fast one, tensor for tensor, and their rows must equal the fast rows, list for list.
"""

from __future__ import annotations

import random
from dataclasses import fields

import pytest
import torch
from fakes import (
    FakeTokenizer,
    random_config,
    random_hierarchical_config,
    random_segments,
)

import gsa_rag.layout as layout_module
from gsa_rag.config import GistConfig
from gsa_rag.layout import (
    PAD_CHUNK,
    SINK_CHUNK,
    GistLayout,
    Segment,
    _Row,
    _section_tables,
    _word_start_table,
    build_layout,
    word_starts,
)
from gsa_rag.prompt import reuse_segments

# --- the reference: the per-token implementation, unchanged ------------------------------------------------


def reference_word_starts(tokenizer, ids: list[int]) -> list[bool]:
    """For each id, whether that token begins a word (so a chunk may end just before it)."""
    table = _word_start_table(tokenizer)
    return [table[i] if 0 <= i < len(table) else True for i in ids]


def reference_lay_out_row(segments: list[Segment], config: GistConfig, gist_id: int, starts) -> _Row:
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


def reference_add_level(row: _Row, level: int, per_section: int, mgist_id: int) -> _Row:
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


def reference_lay_out_levels(row: _Row, config: GistConfig, mgist_id: int) -> _Row:
    """The level-0 row with every higher level of `config.meta_chunks` inserted (H-GSA)."""
    row.level = [0 if g else -1 for g in row.is_gist]
    for level, per_section in enumerate(config.meta_chunks, start=1):
        row = reference_add_level(row, level, per_section, mgist_id)
    return row


def reference_build_layout(
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
    starts = (lambda ids: reference_word_starts(tokenizer, ids)) if config.word_aware else (lambda ids: [True] * len(ids))
    rows = [reference_lay_out_row(segs, config, gist_id, starts) for segs in segments_batch]
    if any(not r.ids for r in rows):
        raise ValueError("empty prompt: every sequence needs at least one token")
    if config.hierarchical:
        mgist_id = tokenizer.convert_tokens_to_ids(config.mgist_token)
        if mgist_id is None or mgist_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {config.mgist_token!r} token: load the model with gsa_rag.models.load_model")
        rows = [reference_lay_out_levels(r, config, mgist_id) for r in rows]

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
        out.update(reference_hierarchy_tensors(rows, T, config.levels))
    return GistLayout(**out).to(device)


def reference_hierarchy_tensors(rows: list[_Row], T: int, num_levels: int) -> dict[str, torch.Tensor]:
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


# --- helpers -----------------------------------------------------------------------------------------------


def assert_same_layout(batch, config, tokenizer) -> GistLayout:
    """The fast layout equals the reference one, every tensor field, and so do their rows."""
    fast, ref = build_layout(batch, config, tokenizer), reference_build_layout(batch, config, tokenizer)
    for f in fields(GistLayout):
        a, b = getattr(fast, f.name), getattr(ref, f.name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{f.name} differs for {config}, {batch}"
    # the rows (boundaries included, which the tensors do not show), level 0 then every level
    gist_id = tokenizer.convert_tokens_to_ids(config.gist_token)
    mgist_id = tokenizer.convert_tokens_to_ids(config.mgist_token)
    fast_starts, ref_starts = (lambda ids: word_starts(tokenizer, ids)), (lambda ids: reference_word_starts(tokenizer, ids))
    if not config.word_aware:
        fast_starts = ref_starts = lambda ids: [True] * len(ids)
    for segments in batch:
        fast_row = layout_module._lay_out_row(segments, config, gist_id, fast_starts)
        ref_row = reference_lay_out_row(segments, config, gist_id, ref_starts)
        assert fast_row == ref_row
        if config.hierarchical:
            assert layout_module._lay_out_levels(fast_row, config, mgist_id) == reference_lay_out_levels(ref_row, config, mgist_id)
    return fast


def random_token_ids(rng: random.Random, low: int, high: int, max_len: int, min_len: int = 1) -> tuple[int, ...]:
    return tuple(rng.randrange(low, high) for _ in range(rng.randrange(min_len, max_len + 1)))


def random_reuse_prompt(rng: random.Random, max_passages: int = 5, max_len: int = 30) -> list[Segment]:
    """A KV-reuse prompt as the gist memory builds it (prompt.reuse_segments): prefix (maybe
    empty), independent passages each followed by link tokens (maybe none), raw tail."""
    prefix = Segment(random_token_ids(rng, 1, 990, 8, min_len=0), compress=True)
    passages = [list(random_token_ids(rng, 1, 990, max_len)) for _ in range(rng.randrange(0, max_passages + 1))]
    links = [991 + k for k in range(rng.randrange(0, 4))]
    tail = Segment(random_token_ids(rng, 1, 990, 6), compress=False)
    return reuse_segments(prefix, passages, tail, links)


def random_any_config(rng: random.Random) -> GistConfig:
    """Single-level (chunk_size 0 included) or hierarchical, sometimes with a long sink."""
    config = random_hierarchical_config(rng) if rng.random() < 0.5 else random_config(rng)
    if rng.random() < 0.3:  # a sink longer than the first segments: it spans segments, links included
        config = GistConfig(**{**config.to_dict(), "sink": rng.randrange(6, 60)})
    return config


# word-start patterns: the FakeTokenizer's default (every third id), rare, none, every token
TOKENIZERS = [FakeTokenizer(), FakeTokenizer(lambda i: i % 7 == 0), FakeTokenizer(lambda i: False), FakeTokenizer(lambda i: True)]


# --- tests -------------------------------------------------------------------------------------------------


def test_fast_layout_equals_reference_on_random_prompts():
    rng = random.Random(0)
    for _ in range(300):
        config = random_any_config(rng)
        batch = [random_segments(rng, max_passages=5, max_len=40) for _ in range(rng.randrange(1, 4))]
        assert_same_layout(batch, config, rng.choice(TOKENIZERS))


def test_fast_layout_equals_reference_on_reuse_prompts():
    rng = random.Random(1)
    for _ in range(300):
        config = random_any_config(rng)
        batch = [random_reuse_prompt(rng) for _ in range(rng.randrange(1, 4))]
        assert_same_layout(batch, config, rng.choice(TOKENIZERS))


def test_fast_layout_equals_reference_on_mixed_segments():
    """Plain and independent passages, links and empty segments in one prompt."""
    rng = random.Random(2)
    for _ in range(200):
        config = random_any_config(rng)
        batch = []
        for _ in range(rng.randrange(2, 4)):
            segments = []
            for p in range(rng.randrange(0, 6)):
                independent = rng.random() < 0.5
                segments.append(Segment(random_token_ids(rng, 1, 990, 25, min_len=0), True, p, independent=independent))
                if rng.random() < 0.5:  # links: compress or not, they are laid out the same
                    segments.append(Segment(random_token_ids(rng, 991, 995, 4), rng.random() < 0.8, p, link=True))
            segments += [Segment(random_token_ids(rng, 1, 990, 5), False, rng.choice([-1, 7])) for _ in range(rng.randrange(1, 3))]
            batch.append(segments)
        assert_same_layout(batch, config, rng.choice(TOKENIZERS))


@pytest.mark.parametrize("word_aware", [False, True])
@pytest.mark.parametrize("meta_chunks", [(), (4,), (2, 3)])
def test_fast_layout_equals_reference_on_long_prompts(word_aware, meta_chunks):
    """Prompts the size the gist memory sees: many passages, links, a raw tail; 3 rows."""
    rng = random.Random(3)
    config = GistConfig(chunk_size=8, meta_chunks=meta_chunks, sink=4, word_aware=word_aware)
    batch = [random_reuse_prompt(rng, max_passages=20, max_len=150) for _ in range(3)]
    layout = assert_same_layout(batch, config, FakeTokenizer())
    assert layout.num_chunks.min() > 0


class OtherGistTokenizer(FakeTokenizer):
    """A FakeTokenizer that also knows a second gist token, `<g2>` (id 997)."""

    def convert_tokens_to_ids(self, token: str) -> int:
        return 997 if token == "<g2>" else super().convert_tokens_to_ids(token)


def test_remembered_chunkings_lay_out_as_the_reference(monkeypatch):
    """build_layout remembers each compressed segment's chunking per tokenizer (gist memory lays
    out the same passages question after question): the same passages, reordered, under other
    sinks, chunk sizes, word rules and tokenizers, lay out as the reference every time, and the
    second time round build_layout chunks only what lies under a sink."""
    rng = random.Random(4)
    passages = [list(random_token_ids(rng, 1, 990, 60, min_len=1)) for _ in range(6)]
    tail = Segment(random_token_ids(rng, 1, 990, 6), compress=False)
    chunked = []
    real = layout_module._chunk_piece
    monkeypatch.setattr(layout_module, "_chunk_piece", lambda *a: (chunked.append(a[1]), real(*a))[1])
    tokenizers = [OtherGistTokenizer(), OtherGistTokenizer(lambda i: i % 7 == 0)]  # different word starts
    configs = [GistConfig(chunk_size=4, sink=3), GistConfig(chunk_size=5, sink=3),  # the same max_extra
               GistConfig(chunk_size=4, sink=3, gist_token="<g2>"),  # another gist id, the same chunks
               GistConfig(chunk_size=4, sink=0, word_aware=False), GistConfig(chunk_size=6, sink=70),
               GistConfig(chunk_size=4, sink=3, meta_chunks=(2,))]
    for round_ in range(2):
        chunked.clear()
        for tokenizer in tokenizers:
            for config in configs:
                for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4]):
                    prefix = Segment(tuple(passages[order[0]][:5]), compress=True)
                    segments = reuse_segments(prefix, [passages[i] for i in order], tail, [991, 992])
                    fast, ref = build_layout([segments], config, tokenizer), reference_build_layout([segments], config, tokenizer)
                    for f in fields(GistLayout):
                        assert torch.equal(getattr(fast, f.name), getattr(ref, f.name)), (f.name, config, order)
        if round_ == 1:
            assert chunked and all(n_sink > 0 for n_sink in chunked)  # the prefix, and passages a 70-token sink reaches


def test_chunk_size_zero_and_sinks_spanning_segments():
    tok = FakeTokenizer()
    batch = [
        [Segment((1, 2), True), Segment((3, 4, 5), True, 0, independent=True), Segment((991,), True, 0, link=True),
         Segment(tuple(range(10, 30)), True, 1, independent=True), Segment((992, 993), True, 1, link=True), Segment((7, 8), False)],
        [Segment((), True), Segment((5,), True, 0, independent=True), Segment((6, 9), False)],
    ]
    for chunk_size in (0, 1, 2, 5):
        for sink in (0, 1, 2, 3, 6, 7, 30, 100):
            for word_aware in (False, True):
                config = GistConfig(chunk_size=chunk_size, sink=sink, word_aware=word_aware)
                layout = assert_same_layout(batch, config, tok)
                assert (layout.chunk_id[layout.is_sink] == SINK_CHUNK).all()
                if chunk_size:
                    config = GistConfig(chunk_size=chunk_size, sink=sink, word_aware=word_aware, meta_chunks=(1, 2))
                    assert_same_layout(batch, config, tok)


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ([Segment((1, 2), False, 0, independent=True)], "an independent"),
        ([Segment((1, 2), True, -1, independent=True)], "an independent"),
        ([Segment((1,), False), Segment((2,), True, 0, link=True)], "link segments"),
        ([Segment((1,), False), Segment((2, 3), True, 0)], "compressed"),
    ],
)
def test_fast_layout_raises_as_reference(segments, message):
    for config in (GistConfig(chunk_size=2, sink=0), GistConfig(chunk_size=2, sink=1, meta_chunks=(2,))):
        with pytest.raises(ValueError, match=message) as fast:
            build_layout([segments], config, FakeTokenizer())
        with pytest.raises(ValueError, match=message) as ref:
            reference_build_layout([segments], config, FakeTokenizer())
        assert str(fast.value) == str(ref.value)
    with pytest.raises(ValueError, match="empty prompt"):
        build_layout([[Segment((), True)]], GistConfig(), FakeTokenizer())


def test_compressed_after_raw_is_allowed_without_gists_as_before():
    """chunk_size 0 lays every segment out raw, so order is not checked (as the reference does)."""
    segments = [Segment((1,), False), Segment((2, 3), True, 0)]
    assert_same_layout([segments], GistConfig(chunk_size=0, sink=1), FakeTokenizer())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a layout's one-transfer move (kernels.dispatch.to_device_together) runs there; its packing is tested on the CPU in test_kernels_kv_place.py")
def test_layout_moves_to_cuda_in_one_transfer_with_every_field():
    rng = random.Random()
    config = random_hierarchical_config(rng)
    host = build_layout([random_segments(rng) for _ in range(3)], config, FakeTokenizer())
    moved = host.to("cuda")
    for f in fields(GistLayout):
        got, want = getattr(moved, f.name), getattr(host, f.name)
        assert got.device.type == "cuda" and got.dtype == want.dtype and torch.equal(got.cpu(), want), f.name
    storages = {getattr(moved, f.name).untyped_storage().data_ptr() for f in fields(GistLayout)
                if getattr(moved, f.name).numel()}
    assert len(storages) == 1  # one transfer: every field a view of one device buffer
    assert moved.host_facts() == host.host_facts()
