"""H-GSA (gist-of-gist, issue 5): config, layout, mask, coarse-to-fine selection, keys touched.

Every check is against a plain-Python reference written from the rule, not from the code.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from fakes import (
    GIST_ID,
    MGIST_ID,
    FakeTokenizer,
    random_config,
    random_hierarchical_config,
    random_segments,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_rag.attention import GistState
from gsa_rag.config import GistConfig
from gsa_rag.errors import ConfigError
from gsa_rag.layout import PAD_CHUNK, SINK_CHUNK, Segment, build_layout
from gsa_rag.masks import dense_gist_mask, dense_unfold_mask, gist_block_mask
from gsa_rag.selection import select_chunks, select_hierarchical

seeds = st.integers(0, 2**32 - 1)


def lay_out(rng, config, batch_max=3, **kw):
    batch = [random_segments(rng, **kw) for _ in range(rng.randrange(1, batch_max + 1))]
    return batch, build_layout(batch, config, FakeTokenizer())


# --- config ------------------------------------------------------------------------------------------------


def test_config_levels_ratios_and_round_trip():
    assert GistConfig().levels == 1 and not GistConfig().hierarchical and GistConfig().compression_ratio == 8
    assert GistConfig(chunk_size=8, meta_chunks=(4,)).compression_ratio == 32
    assert GistConfig(chunk_size=4, meta_chunks=(4,)).compression_ratio == 16
    deep = GistConfig(chunk_size=8, meta_chunks=[4, 2])  # a list (as JSON gives it) becomes a tuple
    assert deep.meta_chunks == (4, 2) and deep.levels == 3 and deep.compression_ratio == 64
    assert GistConfig.from_json(deep.to_json()) == deep
    assert GistConfig.from_dict({k: v for k, v in GistConfig().to_dict().items() if k != "meta_chunks"}) == GistConfig()
    beam = GistConfig(chunk_size=8, meta_chunks=(4, 4), top_k=2, section_top_k=6)
    assert [beam.level_top_k(level) for level in range(3)] == [2, 6, 6]
    assert [deep.level_top_k(level) for level in range(3)] == [4, 4, 4]  # None: top_k at every level
    assert GistConfig.from_json(beam.to_json()) == beam
    # without a beam the field is not written: what older gsa-rag versions (which refuse unknown fields) read
    assert "section_top_k" not in deep.to_dict() and GistConfig.from_dict(deep.to_dict()) == deep


@pytest.mark.parametrize("bad", [
    {"meta_chunks": (0,)}, {"meta_chunks": (4, -1)}, {"meta_chunks": 4}, {"meta_chunks": "4"},
    {"meta_chunks": (2.5,)}, {"meta_chunks": (True,)}, {"chunk_size": 0, "meta_chunks": (4,)},
    {"meta_chunks": (4,), "k_policy": "adaptive"},
    {"section_top_k": 2}, {"meta_chunks": (4,), "section_top_k": 0}, {"meta_chunks": (4,), "section_top_k": True},
    {"meta_chunks": (4,), "section_top_k": 2.0}, {"meta_chunks": (4,), "k_policy": "top_p", "section_top_k": 2},
])
def test_bad_hierarchy_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        GistConfig(**bad)


# --- layout ------------------------------------------------------------------------------------------------

# sha256 over 300 seeded random single-level layouts (the fields below), computed with the layout code
# as it was before the hierarchy existed (commit before issue 5). A single-level config must lay
# out bit for bit as it did then.
SINGLE_LEVEL_DIGEST = "45583888e81a49e43b5d9084e68100924d125d5126ed92e37719c481c77f45d2"
LEGACY_FIELDS = ("input_ids", "is_gist", "is_sink", "chunk_id", "passage_id", "position_ids", "valid", "num_chunks",
                 "gist_index", "doc_id", "is_link")


def test_single_level_layouts_are_bit_identical_to_before_the_hierarchy():
    digest = hashlib.sha256()
    for seed in range(300):
        rng = random.Random(seed)
        config = random_config(rng)
        _, layout = lay_out(rng, config)
        for name in LEGACY_FIELDS:
            t = getattr(layout, name)
            digest.update(name.encode())
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.numpy().tobytes())
        # the new metadata says "one level" and nothing else
        assert layout.levels == 1 and layout.section_id.shape == (*layout.input_ids.shape, 0)
        assert torch.equal(layout.level, torch.where(layout.is_gist, 0, -1))
    assert digest.hexdigest() == SINGLE_LEVEL_DIGEST


def expected_hierarchy(flat_ids, flat_gist, flat_passage, meta_chunks):
    """Reference: the single-level row with meta-gists inserted, built top-down from groups.

    Each passage's level-0 gists are split into runs of meta_chunks[0]; each run's unit is
    anchored at its last level-0 gist; level-l units group level-(l-1) units the same way. A
    level-l gist goes right after its anchor, after the gists of lower levels anchored there.

    Returns:
        (ids, levels, source column in the flat row of each column: the anchor for meta-gists).
    """
    units = {}  # passage -> level-0 gist columns
    for col, (g, p) in enumerate(zip(flat_gist, flat_passage)):
        if g:
            units.setdefault(p, []).append(col)
    inserted = {}  # anchor column -> levels inserted after it
    for cols in units.values():
        anchors = cols
        for level, size in enumerate(meta_chunks, start=1):
            anchors = [anchors[min(i + size, len(anchors)) - 1] for i in range(0, len(anchors), size)]
            for a in anchors:
                inserted.setdefault(a, []).append(level)
    ids, levels, source = [], [], []
    for col, (t, g) in enumerate(zip(flat_ids, flat_gist)):
        ids.append(t), levels.append(0 if g else -1), source.append(col)
        for level in inserted.get(col, []):
            ids.append(MGIST_ID), levels.append(level), source.append(col)
    return ids, levels, source


def expected_sections(levels, chunk_id, num_levels):
    """Reference section ids: chunk c's level-l section is the index of the first level-l gist
    after chunk c's gist; a token takes its chunk's; the tail (open chunk) the open section."""
    gist_cols = [i for i, lv in enumerate(levels) if lv == 0]
    out = []
    for level in range(1, num_levels):
        closers = [i for i, lv in enumerate(levels) if lv == level]
        of_chunk = [next(s for s, c in enumerate(closers) if c > g) for g in gist_cols] + [len(closers)]
        out.append([c if c < 0 else of_chunk[c] for c in chunk_id])
    return out


@settings(max_examples=150, deadline=None)
@given(seeds)
def test_hierarchical_layout_equals_the_reference_and_keeps_level_zero(seed):
    rng = random.Random(seed)
    config = random_hierarchical_config(rng)
    batch, layout = lay_out(rng, config)
    single = build_layout(batch, GistConfig(**{**config.to_dict(), "meta_chunks": ()}), FakeTokenizer())
    for b in range(layout.batch_size):
        valid, flat_valid = layout.valid[b], single.valid[b]
        row = {k: getattr(layout, k)[b][valid].tolist() for k in ("input_ids", "level", "chunk_id", "passage_id",
                                                                    "position_ids", "doc_id", "is_link", "is_gist")}
        flat = {k: getattr(single, k)[b][flat_valid].tolist() for k in ("input_ids", "is_gist", "chunk_id", "passage_id",
                                                                        "position_ids", "doc_id", "is_link")}
        ids, levels, source = expected_hierarchy(flat["input_ids"], flat["is_gist"], flat["passage_id"], config.meta_chunks)
        assert row["input_ids"] == ids and row["level"] == levels
        assert row["is_gist"] == [lv >= 0 for lv in levels]  # every level is a gist: no position, no label
        # a meta-gist takes chunk, passage, doc and position of the gist it follows; all else is unchanged
        for name in ("chunk_id", "passage_id", "doc_id", "position_ids"):
            assert row[name] == [flat[name][s] for s in source], name
        assert row["is_link"] == [flat["is_link"][s] and lv < 1 for s, lv in zip(source, levels)]
        # level 0 bookkeeping is that of the single-level layout, moved to the new columns
        n = int(single.num_chunks[b])
        assert int(layout.num_chunks[b]) == n
        cols = torch.nonzero(valid).flatten()
        assert (cols[[i for i, lv in enumerate(levels) if lv == 0]]).tolist() == layout.gist_index[b, :n].tolist()
        # sections, and the gist closing each of them
        want = expected_sections(levels, row["chunk_id"], config.levels)
        for level in range(1, config.levels):
            assert layout.section_id[b][valid][:, level - 1].tolist() == want[level - 1]
            closers = [i for i, lv in enumerate(levels) if lv == level]
            s = int(layout.num_sections[b, level - 1])
            assert s == len(closers) and layout.section_index[b, level - 1, :s].tolist() == cols[closers].tolist()
            assert (layout.section_id[b][~valid] == PAD_CHUNK).all()
        assert (layout.section_id[b][layout.is_sink[b]] == SINK_CHUNK).all()


def test_layout_by_hand_two_passages_three_levels():
    segs = [Segment(tuple(range(1, 9)), True, 0), Segment(tuple(range(11, 21)), True, 1), Segment((50, 51), False)]
    layout = build_layout([segs], GistConfig(chunk_size=2, sink=2, word_aware=False, meta_chunks=(2, 2)), FakeTokenizer())
    g, m = GIST_ID, MGIST_ID
    assert layout.input_ids[0].tolist() == [
        1, 2, 3, 4, g, 5, 6, g, m, 7, 8, g, m, m,  # passage 0: 3 chunks; sections {0,1} {2}; one level-2
        11, 12, g, 13, 14, g, m, 15, 16, g, 17, 18, g, m, m, 19, 20, g, m, m, 50, 51]
    assert layout.level[0].tolist() == [
        -1, -1, -1, -1, 0, -1, -1, 0, 1, -1, -1, 0, 1, 2,
        -1, -1, 0, -1, -1, 0, 1, -1, -1, 0, -1, -1, 0, 1, 2, -1, -1, 0, 1, 2, -1, -1]
    assert layout.section_id[0, :, 0].tolist() == [-1, -1] + [0] * 7 + [1] * 5 + [2] * 7 + [3] * 8 + [4] * 5 + [5] * 2
    assert layout.section_id[0, :, 1].tolist() == [-1, -1] + [0] * 12 + [1] * 15 + [2] * 5 + [3] * 2
    assert layout.position_ids[0].tolist()[:14] == [0, 1, 2, 3, 3, 4, 5, 5, 5, 6, 7, 7, 7, 7]
    grown = layout.append(torch.tensor([[7]]))
    assert grown.section_id[0, -1].tolist() == [5, 3] and grown.level[0, -1] == -1 and grown.is_tail[0, -1]


def test_missing_mgist_token_is_refused():
    class NoMgist(FakeTokenizer):
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return 0 if token == "<mgist>" else GIST_ID

    with pytest.raises(ValueError, match="<mgist>"):
        build_layout([[Segment((1, 2, 3), True), Segment((4,), False)]], GistConfig(chunk_size=2, meta_chunks=(2,)), NoMgist())


# --- masks -------------------------------------------------------------------------------------------------


def as_lists(layout):
    """Per-row Python lists of the metadata the rule reads (fast brute force)."""
    names = ("valid", "is_sink", "chunk_id", "level", "doc_id", "is_link", "section_id")
    return [{k: getattr(layout, k)[b].tolist() for k in names} | {"num_chunks": int(layout.num_chunks[b])}
            for b in range(layout.batch_size)]


def brute_force(row, q, kv, P, levels, chosen=None):
    """The H-GSA rule for one pair, in plain Python (chosen: None for the forgetting mask, else
    (chunks, sections) sets of one query row and head for the unfold mask)."""
    if q == kv:
        return True
    if kv > q or not row["valid"][kv]:
        return False
    if row["is_sink"][kv]:
        return True
    if row["doc_id"][q] >= 0 and row["doc_id"][kv] != row["doc_id"][q]:
        return False
    if row["is_link"][kv]:
        return True
    lq, lk = row["level"][q], row["level"][kv]
    cq, ck = row["chunk_id"][q], row["chunk_id"][kv]
    if lq <= 0 and 0 <= cq - ck <= P:  # raw tokens and level-0 gists keep their window; meta-gists do not
        return True
    if chosen is None:
        if lk == levels - 1:  # the top level: seen by all later tokens
            return True
        return lk >= 0 and row["section_id"][kv][lk] == row["section_id"][q][lk]  # same parent section
    chunks, sections = chosen
    if lk <= 0:
        return 0 <= ck < row["num_chunks"] and ck in chunks
    return row["section_id"][kv][lk - 1] in sections[lk - 1]


@settings(max_examples=60, deadline=None)
@given(seeds)
def test_dense_hierarchical_forgetting_mask_equals_brute_force(seed):
    rng = random.Random(seed)
    config = random_hierarchical_config(rng)
    _, layout = lay_out(rng, config)
    mask = dense_gist_mask(layout, config.num_previous_chunks).tolist()
    for b, row in enumerate(as_lists(layout)):
        T = len(row["valid"])
        for q in range(T):
            for kv in range(T):
                assert mask[b][q][kv] == brute_force(row, q, kv, config.num_previous_chunks, config.levels), (b, q, kv)


def test_hierarchical_rule_by_hand():
    """The rule's own words, on the hand layout: meta-gists for all, level-0 gists in-section only."""
    segs = [Segment(tuple(range(1, 9)), True, 0), Segment(tuple(range(11, 21)), True, 1), Segment((50, 51), False)]
    config = GistConfig(chunk_size=2, sink=2, word_aware=False, meta_chunks=(2,), num_previous_chunks=1)
    layout = build_layout([segs], config, FakeTokenizer())
    mask, level, sec = dense_gist_mask(layout, 1)[0], layout.level[0], layout.section_id[0, :, 0]
    T = layout.seq_len
    q = T - 1  # the last question token
    assert all(mask[q, kv] for kv in range(T) if level[kv] == 1)  # every meta-gist
    window = {kv for kv in range(T) if layout.chunk_id[0, kv] == layout.num_chunks[0] - 1}
    assert all(not mask[q, kv] for kv in range(T) if level[kv] == 0 and kv not in window)  # no gist out of its section
    for m in torch.nonzero(level == 1).flatten().tolist():  # a meta-gist: its children, earlier meta-gists, the sink
        seen = set(torch.nonzero(mask[m]).flatten().tolist())
        want = {kv for kv in range(m + 1) if layout.is_sink[0, kv] or kv == m or level[kv] == 1
                or (level[kv] == 0 and sec[kv] == sec[m])}
        assert seen == want


@settings(max_examples=40, deadline=None)
@given(seeds)
def test_dense_hierarchical_unfold_mask_equals_brute_force(seed):
    rng = random.Random(seed)
    config = random_hierarchical_config(rng)
    _, layout = lay_out(rng, config)
    B, T = layout.input_ids.shape
    H, g = 2, torch.Generator().manual_seed(seed % 2**31)
    q_index = torch.arange(rng.randrange(T), T)
    chunks = torch.rand(B, H, len(q_index), layout.gist_index.shape[1], generator=g) < 0.4
    sections = [torch.rand(B, H, len(q_index), layout.section_index.shape[2], generator=g) < 0.4
                for _ in range(config.levels - 1)]
    mask = dense_unfold_mask(layout, chunks, config.num_previous_chunks, q_index, sections).tolist()
    for b, row in enumerate(as_lists(layout)):
        for h in range(H):
            for r, q in enumerate(q_index.tolist()):
                chosen = (set(torch.nonzero(chunks[b, h, r]).flatten().tolist()),
                          [set(torch.nonzero(s[b, h, r]).flatten().tolist()) for s in sections])
                for kv in range(T):
                    assert mask[b][h][r][kv] == brute_force(row, q, kv, config.num_previous_chunks, config.levels, chosen)
    with pytest.raises(ValueError, match="sections"):
        dense_unfold_mask(layout, chunks, config.num_previous_chunks, q_index)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_size", [16, 128])
def test_hierarchical_block_mask_matches_dense_mask(seed, block_size):
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        pytest.skip("FlexAttention unavailable in this torch (torch.nn.attention.flex_attention)")
    rng = random.Random(seed)
    config = random_hierarchical_config(rng)
    _, layout = lay_out(rng, config)
    B, T = layout.input_ids.shape
    q_offset = rng.randrange(T)
    block_mask = gist_block_mask(layout, config.num_previous_chunks, q_offset=q_offset, block_size=block_size)
    dense = dense_gist_mask(layout, config.num_previous_chunks, torch.arange(q_offset, T))
    blocks = block_mask.to_dense()[:, 0].bool()
    nq, nk = blocks.shape[-2:]
    padded = F.pad(dense, (0, nk * block_size - T, 0, nq * block_size - (T - q_offset)))
    assert torch.equal(blocks, padded.view(B, nq, block_size, nk, block_size).any(4).any(2))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 2, T - q_offset, 8, generator=g)
    k, v = torch.randn(B, 2, T, 8, generator=g), torch.randn(B, 2, T, 8, generator=g)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None]), atol=1e-5, rtol=1e-5)


# --- selection ---------------------------------------------------------------------------------------------


def random_qk(layout, seed, Hq=4, Hkv=2, Tq=2, D=8):
    g = torch.Generator().manual_seed(seed)
    B, T = layout.input_ids.shape
    return torch.randn(B, Hq, Tq, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)


def brute_force_selection(query, key, layout, k, section_k=None):
    """Coarse to fine in plain Python: per KV head and row, the group's heads each take their k
    best candidates (section_k, when given, above the chunks); the union's children are the next
    level's candidates."""
    B, Hq, Tq, _ = query.shape
    Hkv = key.shape[1]
    G, top = Hq // Hkv, layout.levels - 1
    out = {}
    for b in range(B):
        units = [layout.units(level) for level in range(layout.levels)]
        gists = [idx[b][val[b]].tolist() for idx, val in units]
        parents = [layout.section_id[b, gists[level], level].tolist() for level in range(top)]
        for h in range(Hkv):
            for r in range(Tq):
                candidates = set(range(len(gists[top])))
                for level in range(top, -1, -1):
                    union = set()
                    for qh in range(h * G, (h + 1) * G):
                        score = {u: float(query[b, qh, r] @ key[b, h, gists[level][u]]) for u in candidates}
                        keep = k if level == 0 or section_k is None else section_k
                        union |= set(sorted(candidates, key=lambda u: -score[u])[:keep])
                    out[b, h, r, level] = union
                    if level:
                        candidates = {c for c, p in enumerate(parents[level - 1]) if p in union}
    return out


@settings(max_examples=80, deadline=None)
@given(seeds, st.integers(1, 4), st.one_of(st.none(), st.integers(1, 6)))
def test_coarse_to_fine_equals_brute_force_and_keeps_its_invariants(seed, k, section_k):
    rng = random.Random(seed)
    config = GistConfig(**{**random_hierarchical_config(rng).to_dict(), "top_k": k, "k_policy": "fixed",
                           "section_top_k": section_k})
    _, layout = lay_out(rng, config)
    query, key = random_qk(layout, seed)
    sel = select_hierarchical(query, key, layout, config)
    want = brute_force_selection(query, key, layout, k, section_k)
    for level in range(config.levels):
        _, valid = layout.units(level)
        chosen, scored = sel.chosen[level], sel.scored[level]
        assert not (chosen & ~valid[:, None, None, :]).any()  # never a unit that does not exist
        assert not (chosen & ~scored).any()  # only among the candidates
        for (b, h, r, lv), units in want.items():
            if lv == level:
                assert set(torch.nonzero(chosen[b, h, r]).flatten().tolist()) == units, (b, h, r, level)


@settings(max_examples=40, deadline=None)
@given(seeds)
def test_tail_rows_never_lose_sink_window_or_tail_and_k_covering_all_unfolds_everything(seed):
    rng = random.Random(seed)
    config = random_hierarchical_config(rng)
    _, layout = lay_out(rng, config, max_len=40)
    B, T = layout.input_ids.shape
    query, key = torch.randn(B, 4, T, 8), torch.randn(B, 2, T, 8)
    state = GistState.for_new_tokens(layout, T, config)
    mask = state.mask_for_layer(1, query, key)
    tail = layout.is_tail
    col = torch.arange(T)
    causal_valid = (col[None, :, None] >= col[None, None, :]) & layout.valid[:, None, :]
    n = layout.num_chunks[:, None, None]
    always = causal_valid & (layout.is_sink[:, None, :] | (layout.chunk_id[:, None, :] >= n - config.num_previous_chunks))
    for h in range(mask.shape[1]):
        assert (mask[:, h] | ~always)[tail].all()  # sink, window and the tail itself stay
    everything = GistConfig(**{**config.to_dict(), "top_k": 10_000})
    sel = select_hierarchical(query[:, :, -1:], key, layout, everything)
    for level in range(config.levels):
        assert torch.equal(sel.chosen[level], layout.units(level)[1][:, None, None, :].expand_as(sel.chosen[level]))
    full = GistState.for_new_tokens(layout, T, everything).mask_for_layer(2, query, key)
    for h in range(full.shape[1]):  # unfold everything = full causal attention for the tail
        assert torch.equal(full[:, h][tail], (causal_valid | torch.eye(T, dtype=torch.bool))[tail])


def test_top_p_policy_runs_coarse_to_fine():
    rng = random.Random(5)
    config = GistConfig(chunk_size=3, meta_chunks=(2,), k_policy="top_p", top_p=0.5, sink=2)
    _, layout = lay_out(rng, config, max_len=40)
    query, key = random_qk(layout, 5)
    sel = select_hierarchical(query, key, layout, config)
    has = layout.gist_valid.any(-1)
    assert sel.chunks.any(-1)[has].all() and not (sel.chunks & ~sel.scored[0]).any()


# --- keys touched per decode step as the context grows --------------------------------------------------------


def keys_touched(config, num_passages, passage_len=128, Hq=8, Hkv=2, D=16, seed=0):
    """Mean over KV heads of the key columns one decode step reads in a selecting layer: every
    gist scored on the way down, plus every column the unfold mask shows (sink, window, tail,
    unfolded chunks and sections). Random queries and keys: the count depends on the structure."""
    rng = random.Random(seed)
    segs = [Segment(tuple(rng.randrange(1, 990) for _ in range(passage_len)), True, p) for p in range(num_passages)]
    layout = build_layout([segs + [Segment(tuple(range(1, 17)), False)]], config, FakeTokenizer())
    g = torch.Generator().manual_seed(seed)
    T = layout.seq_len
    query, key = torch.randn(1, Hq, 1, D, generator=g), torch.randn(1, Hkv, T, D, generator=g)
    q_index = torch.tensor([T - 1])
    if layout.levels > 1:
        sel = select_hierarchical(query, key, layout, config)
        touched = dense_unfold_mask(layout, sel.chunks, config.num_previous_chunks, q_index, sel.sections)[:, :, 0]
        for level, scored in enumerate(sel.scored):  # the gists read on the way down
            index, _ = layout.units(level)
            for h in range(Hkv):
                touched[0, h, index[0][scored[0, h, 0]]] = True
    else:
        chosen = select_chunks(query, key, layout.gist_index, layout.gist_valid, torch.tensor([T]), config)
        touched = dense_unfold_mask(layout, chosen, config.num_previous_chunks, q_index)[:, :, 0] | layout.is_gist[:, None]
    return T, touched.float().sum(-1).mean().item()


def test_keys_touched_grow_far_slower_than_the_context(capsys):
    configs = {
        "GSA 8x (all gists scored)": GistConfig(chunk_size=8, top_k=4, word_aware=False),
        "H-GSA (8,4) 32x": GistConfig(chunk_size=8, meta_chunks=(4,), top_k=4, word_aware=False),
        "H-GSA (8,4,4) 128x": GistConfig(chunk_size=8, meta_chunks=(4, 4), top_k=4, word_aware=False),
        "H-GSA (8,4,4,4) 512x": GistConfig(chunk_size=8, meta_chunks=(4, 4, 4), top_k=4, word_aware=False),
    }
    scales = (1, 2, 4, 8)
    table = {name: [keys_touched(c, 8 * s) for s in scales] for name, c in configs.items()}
    lengths = [t for t, _ in table["GSA 8x (all gists scored)"]]
    with capsys.disabled():
        print("\nkeys touched per decode step per KV head (k=4, GQA 4 heads/KV head, 128-token passages)")
        print(f"{'context tokens (with gists)':32}" + "".join(f"{n:>9}" for n in lengths))
        for name, row in table.items():
            print(f"{name:32}" + "".join(f"{v:9.0f}" for _, v in row) + f"   x{row[-1][1] / row[0][1]:.2f} for 8x")
    growth = {name: row[-1][1] / row[0][1] for name, row in table.items()}
    assert growth["GSA 8x (all gists scored)"] > 4  # linear: every gist is scored
    assert growth["H-GSA (8,4) 32x"] < growth["GSA 8x (all gists scored)"] / 1.5
    assert growth["H-GSA (8,4,4) 128x"] < 2.0  # far slower than the 8x context
    assert growth["H-GSA (8,4,4,4) 512x"] < 1.5
    deep = [v for _, v in table["H-GSA (8,4,4,4) 512x"]]
    assert all(b - a < deep[0] for a, b in itertools.pairwise(deep))  # each doubling adds less than the base
    assert all(v < math.inf for v in deep)
