import random
from dataclasses import fields

import pytest
import torch
from fakes import GIST_ID, FakeTokenizer, random_config, random_segments
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_rag.config import GistConfig
from gsa_rag.layout import PAD_CHUNK, SINK_CHUNK, Segment, build_layout

seeds = st.integers(0, 2**32 - 1)


def lay_out_one(segments, config, tokenizer=None):
    layout = build_layout([segments], config, tokenizer or FakeTokenizer())
    return {f.name: getattr(layout, f.name)[0].tolist() for f in fields(layout) if getattr(layout, f.name).dim() == 2}, layout


@settings(max_examples=200, deadline=None)
@given(seeds)
def test_layout_invariants_on_random_prompts(seed):
    rng = random.Random(seed)
    config, segments = random_config(rng), random_segments(rng)
    tok = FakeTokenizer()
    row, layout = lay_out_one(segments, config, tok)
    ids, is_gist, chunk = row["input_ids"], row["is_gist"], row["chunk_id"]

    # removing the gists gives back the prompt, and RoPE positions are those of the prompt
    raw = [t for t, g in zip(ids, is_gist) if not g]
    assert raw == [t for s in segments for t in s.ids]
    raw_positions = [p for p, g in zip(row["position_ids"], is_gist) if not g]
    assert raw_positions == list(range(len(raw)))
    for i, g in enumerate(is_gist):
        if g:  # a gist shares the position of the raw token before it
            assert row["position_ids"][i] == row["position_ids"][i - 1]
            assert ids[i] == GIST_ID

    assert not any(is_gist[: config.sink])
    assert all(c == SINK_CHUNK for c in chunk[: min(config.sink, len(ids))])
    n_chunks = sum(is_gist)
    assert layout.num_chunks.tolist() == [n_chunks]
    assert layout.gist_index[0, :n_chunks].tolist() == [i for i, g in enumerate(is_gist) if g]

    # the tail (raw segment) is after the last gist, in the open chunk
    tail_len = len(segments[-1].ids)
    assert not any(is_gist[-tail_len:])
    tail_cols = range(max(len(ids) - tail_len, config.sink), len(ids))  # sink tokens stay sink
    assert all(chunk[i] == n_chunks for i in tail_cols)
    assert layout.is_tail[0].sum().item() >= len(tail_cols)

    if not config.uses_gists:
        assert n_chunks == 0
        return
    # each chunk is a run of raw tokens closed by its gist, within one passage
    for c in range(n_chunks):
        members = [i for i, x in enumerate(chunk) if x == c]
        assert members == list(range(members[0], members[-1] + 1))
        assert is_gist[members[-1]] and sum(is_gist[i] for i in members) == 1
        assert len({row["passage_id"][i] for i in members}) == 1
        n_raw = len(members) - 1
        assert 1 <= n_raw <= config.chunk_size + (config.chunk_size // 2 if config.word_aware else 0)
    # every passage that has tokens after the sink ends with its closing gist
    for p in {s.passage_id for s in segments[:-1]}:
        cols = [i for i, x in enumerate(row["passage_id"]) if x == p]
        if any(c >= config.sink for c in cols):
            assert is_gist[cols[-1]]


def test_word_aware_cuts_wait_for_a_word_start():
    # ids 1..40; word starts only at multiples of 5
    tok = FakeTokenizer(starts=lambda i: i % 5 == 0)
    segs = [Segment(tuple(range(1, 41)), True), Segment((7,), False)]
    row, _ = lay_out_one(segs, GistConfig(chunk_size=4, sink=0, word_aware=True), tok)
    ids = row["input_ids"]
    # a cut after 4 raw tokens moves forward to before the next word start (at most 2 more)
    cuts = [ids[i - 1] for i, t in enumerate(ids) if row["is_gist"][i]]
    assert cuts[:4] == [4, 9, 14, 19]
    # no word start within reach: the cut lands at chunk_size + chunk_size // 2
    tok = FakeTokenizer(starts=lambda i: False)
    row, _ = lay_out_one(segs, GistConfig(chunk_size=4, sink=0, word_aware=True), tok)
    assert [ids for ids in row["input_ids"] if ids != GIST_ID][:6] == [1, 2, 3, 4, 5, 6]
    assert row["input_ids"][6] == GIST_ID
    # word_aware off: exact chunks
    row, _ = lay_out_one(segs, GistConfig(chunk_size=4, sink=0, word_aware=False), tok)
    assert row["input_ids"][:10] == [1, 2, 3, 4, GIST_ID, 5, 6, 7, 8, GIST_ID]


def test_sink_and_closing_gists():
    segs = [Segment(tuple(range(1, 11)), True, 0), Segment(tuple(range(11, 14)), True, 1), Segment((50, 51), False)]
    row, layout = lay_out_one(segs, GistConfig(chunk_size=4, sink=3, word_aware=False))
    assert row["input_ids"] == [1, 2, 3, 4, 5, 6, 7, GIST_ID, 8, 9, 10, GIST_ID, 11, 12, 13, GIST_ID, 50, 51]
    assert row["chunk_id"] == [-1, -1, -1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert row["position_ids"] == [0, 1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12, 12, 13, 14]
    assert layout.is_tail[0].tolist() == [False] * 16 + [True, True]


def test_batch_is_left_padded_and_append_extends_the_tail():
    config = GistConfig(chunk_size=3, sink=1, word_aware=False)
    a = [Segment(tuple(range(1, 12)), True), Segment((5, 6), False)]
    b = [Segment((1, 2, 3), True), Segment((5,), False)]
    batch = build_layout([a, b], config, FakeTokenizer())
    single = build_layout([b], config, FakeTokenizer())
    pad = batch.seq_len - single.seq_len
    for name in ("input_ids", "is_gist", "chunk_id", "position_ids", "passage_id"):
        assert getattr(batch, name)[1, pad:].tolist() == getattr(single, name)[0].tolist()
    assert not batch.valid[1, :pad].any() and (batch.chunk_id[1, :pad] == PAD_CHUNK).all()
    assert batch.gist_valid.tolist() == [[True] * 4, [True, False, False, False]]

    grown = batch.append(torch.tensor([[7], [8]]))
    assert grown.input_ids[:, -1].tolist() == [7, 8]
    assert grown.position_ids[:, -1].tolist() == [batch.position_ids[0, -1] + 1, batch.position_ids[1, -1] + 1]
    assert grown.chunk_id[:, -1].tolist() == batch.num_chunks.tolist()
    assert grown.is_tail[:, -1].all()


def test_context_after_a_raw_segment_is_refused():
    segs = [Segment((1, 2), False), Segment((3, 4), True)]
    with pytest.raises(ValueError, match="before raw"):
        build_layout([segs], GistConfig(chunk_size=2), FakeTokenizer())
