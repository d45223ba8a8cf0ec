"""Gist memory over an H-GSA hierarchy (issue 5, item 4): passages cached with their meta-gists,
re-rotated and assembled as for one level; the question selects coarse to fine over the cache."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
import torch
from fakes import random_hierarchical_config
from test_memory import PASSAGES, QUESTION, greedy, tiny_engine, tokenizer  # noqa: F401  (fixture)
from transformers import DynamicCache

from gsa_rag.config import GistConfig
from gsa_rag.errors import ConfigError, MemoryFormatError
from gsa_rag.generation import forward
from gsa_rag.layout import Segment, build_layout, encode_text
from gsa_rag.memory import GistMemory
from gsa_rag.prompt import Passage, build_reuse_segments
from gsa_rag.selection import select_hierarchical

HIER = {"chunk_size": 4, "meta_chunks": (2,)}
DEEP = {"chunk_size": 3, "meta_chunks": (2, 2), "top_k": 2}


def _random(seed: int) -> dict:
    c = random_hierarchical_config(random.Random(seed))
    return {"chunk_size": c.chunk_size, "meta_chunks": c.meta_chunks, "sink": c.sink,
            "num_previous_chunks": c.num_previous_chunks, "word_aware": c.word_aware, "top_k": c.top_k}


CONFIGS = {"two-levels": HIER, "three-levels": DEEP, **{f"random-{s}": _random(s) for s in (0, 2, 8)}}  # 3 levels word-aware, chunk 1, window 2


@pytest.mark.parametrize("levels", list(CONFIGS.values()), ids=list(CONFIGS))
def test_assembled_kv_equals_independent_encoding_at_final_offset(tokenizer, levels):  # noqa: F811
    """Every cached column (prefix, passages with their meta-gists) == the unit [sink][passage]
    encoded alone under the hierarchical mask and moved to where the prompt has it."""
    engine = tiny_engine(tokenizer, **levels)
    config = engine.config
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    layout, cache = memory.prepare(QUESTION, ids)
    assert layout.levels == config.levels
    for p in range(len(PASSAGES)):  # every passage closes its sections: it holds meta-gists of every level
        levels_in = set(layout.level[0, layout.doc_id[0] == p].tolist())
        assert set(range(1, config.levels)) <= levels_in
    sink = layout.input_ids[0, : config.sink].tolist()
    prefix_len = int((layout.doc_id[0] == 0).nonzero()[0])
    prefix_ids = layout.input_ids[0, :prefix_len][~layout.is_gist[0, :prefix_len]]
    units = [(list(range(prefix_len)), [Segment(tuple(prefix_ids.tolist()), True)], 0, 0)]
    for p, passage in enumerate(PASSAGES):
        cols = torch.nonzero(layout.doc_id[0] == p).flatten().tolist()
        p_ = Passage(**passage) if isinstance(passage, dict) else Passage(passage)
        text = encode_text(tokenizer, p_.render(None))
        shift = int(layout.position_ids[0, cols[0]]) - config.sink
        units.append((cols, [Segment(tuple(sink), True), Segment(tuple(text), True, 0)], config.sink, shift))
    for cols, segments, skip, shift in units:
        unit = build_layout([segments], config, tokenizer)
        assert torch.equal(unit.input_ids[0, skip:], layout.input_ids[0, cols])  # same gists and meta-gists
        assert torch.equal(unit.level[0, skip:], layout.level[0, cols])
        unit.position_ids += shift
        want = DynamicCache()
        with torch.no_grad():
            forward(engine.model, unit, unit.seq_len, want, config)
        for layer in range(engine.model.config.num_hidden_layers):
            torch.testing.assert_close(cache.layers[layer].keys[0][:, cols], want.layers[layer].keys[0, :, skip:],
                                       atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(cache.layers[layer].values[0][:, cols], want.layers[layer].values[0, :, skip:],
                                       atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("levels", list(CONFIGS.values()), ids=list(CONFIGS))
def test_memory_path_equals_one_forward_over_the_reuse_layout(tokenizer, levels):  # noqa: F811
    """With sink 0 (exact, see gsa_rag.memory): the logits of links + question over the cached
    passages, and the greedy answer, equal encoding the same reuse layout directly."""
    engine = tiny_engine(tokenizer, **{**levels, "sink": 0})
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    layout, cache = memory.prepare(QUESTION, ids)
    pending = cache.pending.clone()
    full = build_layout([build_reuse_segments(tokenizer, QUESTION, PASSAGES, memory.link_ids)], engine.config, tokenizer)
    assert torch.equal(full.input_ids, layout.input_ids) and torch.equal(full.level, layout.level)
    assert torch.equal(full.section_id, layout.section_id)
    with torch.no_grad():
        got, _ = forward(engine.model, layout, len(pending), cache, engine.config)
        want, _ = forward(engine.model, full, full.seq_len, DynamicCache(), engine.config)
    torch.testing.assert_close(got.logits[0], want.logits[0, pending], atol=1e-4, rtol=1e-4)
    layout, cache = memory.prepare(QUESTION, ids)
    assert greedy(engine, layout, cache, n=8) == greedy(engine, full, None, n=8)


@pytest.mark.parametrize("levels", [HIER, DEEP, _random(8)], ids=["two-levels", "three-levels", "random-8"])
def test_offloaded_raw_kv_fetches_exactly_the_unfolded_chunks(tokenizer, levels):  # noqa: F811
    engine = tiny_engine(tokenizer, **levels)
    config = engine.config
    resident = GistMemory(engine, progress=False)
    offloaded = GistMemory(engine, offload=True, progress=False, num_links=0)  # no links: only the question runs
    ids = resident.add(PASSAGES)
    assert offloaded.add(PASSAGES) == ids
    layout, cache = offloaded.prepare(QUESTION, ids)
    offloaded_cols = torch.cat([s.columns for s in cache.offloaded])
    seen = {}
    hook = cache.hook

    def record(layer_idx, query, key, value, mask):
        seen[layer_idx] = (query.clone(), key.clone())
        hook(layer_idx, query, key, value, mask)

    cache.hook = record
    assert layout.is_tail[0, cache.pending].all()  # every row that runs is a question row
    with torch.no_grad():
        forward(engine.model, layout, len(cache.pending), cache, config)
    chunk = layout.chunk_id[0]
    n = int(layout.num_chunks[0])
    window = set(range(n - config.num_previous_chunks, n))  # the question's previous chunks
    for layer, (query, key) in seen.items():
        unfolded = set(window)
        if layer >= config.first_selecting_layer:
            chosen = select_hierarchical(query, key, layout, config).chunks  # [1, Hkv, Tq, C]
            unfolded |= set(torch.nonzero(chosen[0].any(0).any(0)).flatten().tolist())
        fetched = cache.layers[layer].keys[0].abs().sum((0, 2))[offloaded_cols] != 0
        want = torch.tensor([int(chunk[c]) in unfolded for c in offloaded_cols.tolist()])
        assert torch.equal(fetched, want), f"layer {layer}"
    assert 0 < cache.fetched_columns < len(offloaded_cols) * engine.model.config.num_hidden_layers
    # and the answers equal device-resident raw KV, with links as well
    offloaded = GistMemory(engine, offload=True, progress=False)
    offloaded.add(PASSAGES)
    assert greedy(engine, *resident.prepare(QUESTION, ids)) == greedy(engine, *offloaded.prepare(QUESTION, ids))
    with torch.no_grad():
        layout_a, cache_a = resident.prepare(QUESTION, ids)
        layout_b, cache_b = offloaded.prepare(QUESTION, ids)
        out_a, _ = forward(engine.model, layout_a, len(cache_a.pending), cache_a, config)
        out_b, _ = forward(engine.model, layout_b, len(cache_b.pending), cache_b, config)
    assert torch.equal(out_a.logits, out_b.logits)


def test_engine_generate_over_a_hierarchical_memory_does_not_re_encode(tokenizer):  # noqa: F811
    engine = tiny_engine(tokenizer, **DEEP)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    one = engine.generate(QUESTION, ids, memory=memory, max_new_tokens=6)
    encoded = memory.encoded_tokens
    assert "".join(engine.stream(QUESTION, ids, memory=memory, max_new_tokens=6)) == one
    assert engine.generate(QUESTION, PASSAGES, memory=memory, max_new_tokens=6) == one  # texts found by content
    assert memory.encoded_tokens == encoded
    stats = memory.stats()  # gists: every level's gist tokens
    assert stats.gists == sum(int(e.is_gist.sum()) for e in memory._entries.values())
    for other in (tiny_engine(tokenizer, **HIER), tiny_engine(tokenizer, chunk_size=DEEP["chunk_size"])):
        with pytest.raises(ConfigError, match="another engine"):
            other.generate(QUESTION, ids, memory=memory)


def test_save_load_keeps_the_hierarchy_and_refuses_another(tokenizer, tmp_path):  # noqa: F811
    engine = tiny_engine(tokenizer, **HIER)
    memory = GistMemory(engine, offload=True, progress=False)
    ids = memory.add(PASSAGES)
    answer = engine.generate(QUESTION, ids, memory=memory, max_new_tokens=6)
    memory.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["encoding"]["meta_chunks"] == [2] and manifest["encoding"]["mgist_token"] == "<mgist>"
    loaded = GistMemory.load(tmp_path, engine, progress=False)
    assert loaded.ids == ids
    assert engine.generate(QUESTION, ids, memory=loaded, max_new_tokens=6) == answer
    for other in ({"chunk_size": 4, "meta_chunks": (3,)}, {"chunk_size": 4}, DEEP):
        with pytest.raises(MemoryFormatError, match="meta_chunks"):
            GistMemory.load(tmp_path, tiny_engine(tokenizer, **other), progress=False)


def test_a_single_level_save_without_meta_chunks_still_loads(tokenizer, tmp_path):  # noqa: F811
    """Memories saved before the hierarchy had no meta_chunks in their encoding: single level."""
    engine = tiny_engine(tokenizer)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    memory.save(tmp_path)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["encoding"]["meta_chunks"] == [] and "mgist_token" not in manifest["encoding"]
    del manifest["encoding"]["meta_chunks"]
    path.write_text(json.dumps(manifest))
    assert GistMemory.load(tmp_path, engine, progress=False).ids == ids
    with pytest.raises(MemoryFormatError, match="meta_chunks"):
        GistMemory.load(tmp_path, tiny_engine(tokenizer, **HIER), progress=False)


def test_search_scores_chunk_gists_of_a_hierarchical_memory(tokenizer):  # noqa: F811
    engine = tiny_engine(tokenizer, **DEEP)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    gist_id = tokenizer.convert_tokens_to_ids(engine.config.gist_token)
    for aggregate in ("max", "mass"):
        hits = memory.search(QUESTION, k=3, aggregate=aggregate)
        assert sorted(h.id for h in hits) == sorted(ids)
        for h in hits:
            entry = memory._entries[memory._passage_key(memory._sink(memory.system)[0], memory._passages[h.id].sha)]
            n_chunks = int((entry.ids == gist_id).sum())
            assert n_chunks < int(entry.is_gist.sum())  # the entry holds meta-gists too; they are not chunks
            assert h.chunks and all(0 <= c < n_chunks for c in h.chunks)
            assert all(t and "<mgist>" not in t for t in h.chunk_texts)
            assert "".join(memory._chunk_text(entry, c) for c in range(n_chunks)).replace(" ", "") == \
                tokenizer.decode(entry.raw_ids, skip_special_tokens=True).replace(" ", "")


# --- search: which chunks a hit reports --------------------------------------------------------------
# The reference is worked out by brute force, apart from the code under test: each hit's gists come
# from the prompt that asks the question over that hit alone (its levels and sections from that
# layout, its keys from the assembled cache, moved along RoPE so the question starts where the
# closed-book run has it: the hit right before its links and the question), and the coarse-to-fine
# walk is plain Python over sorted scores.


@dataclass
class _Unit:
    """One gist of a hit: which hit, its index among the hit's gists of its level, the index of its
    parent section among the hit's gists of the level above (None at the top), its keys per layer."""

    hit: int
    index: int
    parent: int | None
    keys: dict[int, torch.Tensor]  # layer -> [Hkv, D]


def _question_start(layout) -> int:
    return int(layout.position_ids[0, layout.is_tail[0]][0])


def _last_token_queries(memory) -> tuple[dict[int, torch.Tensor], int]:
    """The closed-book question's last-token query per selecting layer ([Hq, D]), and where it starts."""
    layout, cache = memory.prepare(QUESTION, [])
    cache.queries = {}
    with torch.no_grad():
        forward(memory.engine.model, layout, len(cache.pending), cache, memory.config)
    first = memory.config.first_selecting_layer
    queries = {layer: q[0, :, -1].float() for layer, q in cache.queries.items() if layer >= first}
    return queries, _question_start(layout)


def _hit_units(memory, hit: int, hit_id: str, question_start: int) -> list[list[_Unit]]:
    """Per level, the hit's gists, from the prompt that asks the question over it alone."""
    layout, cache = memory.prepare(QUESTION, [hit_id])
    shift = question_start - _question_start(layout)
    passage = layout.doc_id[0] == 0
    columns = [torch.nonzero(passage & (layout.level[0] == lv)).flatten().tolist() for lv in range(layout.levels)]
    units = []
    for lv, cols in enumerate(columns):
        level_units = []
        for i, c in enumerate(cols):
            parent = None
            if lv + 1 < layout.levels:  # the gist closing its section, among the hit's gists of the level above
                section = int(layout.section_id[0, c, lv])
                parent = columns[lv + 1].index(int(layout.section_index[0, lv, section]))
            keys = {layer: memory.rotator.rotate(cache.layers[layer].keys[0][:, c : c + 1].float(), shift)[:, 0]
                    for layer in range(len(cache.layers))}
            level_units.append(_Unit(hit, i, parent, keys))
        units.append(level_units)
    return units


def _kept(scores: list[float], config, level: int, head_dim: int, k: int | None) -> int:
    """How many of the best candidates (scores sorted, best first) a query head keeps."""
    if config.k_policy == "top_p":
        mass = torch.softmax(torch.tensor(scores) / head_dim**0.5, 0).tolist()
        return sum(sum(mass[:i]) < config.top_p for i in range(len(scores)))
    return min(len(scores), k if k is not None else config.level_top_k(level))


def _brute_force_votes(queries, levels: list[list[_Unit]], config, num_kv_heads: int, k: int | None = None):
    """Coarse-to-fine selection over `levels` (top last; one level: flat selection), each query head
    keeping its best candidates and each KV head the union of its heads' picks, level by level.
    `k` overrides the config's k. Returns per level {(hit, index): fraction of (layer, KV head)
    pairs that choose the unit}."""
    counts, pairs = [{} for _ in levels], 0
    for layer, q in queries.items():
        Hq, D = q.shape
        group = Hq // num_kv_heads
        for kv in range(num_kv_heads):
            pairs += 1
            candidates = range(len(levels[-1]))
            for lv in range(len(levels) - 1, -1, -1):
                chosen = set()
                for h in range(kv * group, (kv + 1) * group):
                    score = {u: float(q[h] @ levels[lv][u].keys[layer][kv]) for u in candidates}
                    ranked = sorted(candidates, key=lambda u: -score[u])
                    chosen |= {(levels[lv][u].hit, levels[lv][u].index)
                               for u in ranked[: _kept([score[u] for u in ranked], config, lv, D, k)]}
                for key in chosen:
                    counts[lv][key] = counts[lv].get(key, 0) + 1
                if lv:  # the next level's candidates: the children of the chosen sections
                    candidates = [u for u, unit in enumerate(levels[lv - 1]) if (unit.hit, unit.parent) in chosen]
    return [{key: n / pairs for key, n in level.items()} for level in counts]


def _hits_gists(memory, hits) -> tuple[dict[int, torch.Tensor], list[list[_Unit]]]:
    """The question's last-token queries, and the hits' gists per level (hit after hit)."""
    queries, start = _last_token_queries(memory)
    per_hit = [_hit_units(memory, i, h.id, start) for i, h in enumerate(hits)]
    return queries, [[u for units in per_hit for u in units[lv]] for lv in range(memory.config.levels)]


def _votes(memory, gists, flat: bool = False, k: int | None = None, config=None) -> list[dict]:
    """`_brute_force_votes` over `_hits_gists` (`flat`: over the chunks alone) under `config`
    (default the memory's)."""
    queries, levels = gists
    num_kv_heads = memory.engine.model.config.num_key_value_heads
    return _brute_force_votes(queries, levels[:1] if flat else levels, config or memory.config, num_kv_heads, k)


def _reported(hits) -> dict[tuple[int, int], float]:
    """{(hit, chunk): vote} as the hits report them."""
    return {(i, c): v for i, h in enumerate(hits) for c, v in zip(h.chunks, h.chunk_votes, strict=True)}


def _assert_votes_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, fraction in want.items():
        assert got[key] == pytest.approx(fraction, abs=1e-9), key


SEARCH_CONFIGS = {
    "three-levels": DEEP,
    "section-beam": {**HIER, "top_k": 3, "section_top_k": 1},
    "top-p": {**HIER, "k_policy": "top_p", "top_p": 0.2},
}


@pytest.mark.parametrize("levels", list(SEARCH_CONFIGS.values()), ids=list(SEARCH_CONFIGS))
@pytest.mark.parametrize("k", [2, 3])
def test_search_chunks_are_the_coarse_to_fine_selection_over_the_hits(tokenizer, levels, k):  # noqa: F811
    """Every chunk a hit reports lies in a section the coarse-to-fine selection chose for that hit,
    and its vote is the brute-force count over (selecting layer, KV head) pairs."""
    memory = GistMemory(tiny_engine(tokenizer, **levels), progress=False)
    memory.add(PASSAGES)
    hits = memory.search(QUESTION, k=k)
    gists = _hits_gists(memory, hits)
    want = _votes(memory, gists)
    reported = _reported(hits)
    assert all(h.chunks for h in hits) and len(want[0]) < len(gists[1][0])  # some chunks are left folded
    section = {(u.hit, u.index): u.parent for u in gists[1][0]}
    for hit, chunk in reported:
        assert (hit, section[(hit, chunk)]) in want[1]  # a level-1 section some (layer, KV head) chose
    _assert_votes_equal(reported, want[0])


def test_search_chunks_are_not_a_flat_top_k_over_a_hierarchy(tokenizer):  # noqa: F811
    """A beam of one section per query head: the flat top-k over the hits' chunks (what search
    reported before) picks chunks of sections the coarse-to-fine walk never reaches; the hits
    report the coarse-to-fine ones."""
    memory = GistMemory(tiny_engine(tokenizer, **SEARCH_CONFIGS["section-beam"]), progress=False)
    memory.add(PASSAGES)
    hits = memory.search(QUESTION, k=3)
    gists = _hits_gists(memory, hits)
    want, flat = _votes(memory, gists)[0], _votes(memory, gists, flat=True)[0]
    assert set(flat) - set(want)  # the case tells the two apart
    _assert_votes_equal(_reported(hits), want)


def _adaptive_k(memory, hits, num_chunks: int) -> int:
    """selection.adaptive_k's rule, spelled out, for the prompt that asks the question over the hits
    (every column before the question counts) with `num_chunks` chunks to choose from."""
    config, model = memory.config, memory.engine.model.config
    segments = build_reuse_segments(memory.engine.tokenizer, QUESTION, [memory.passage(h.id) for h in hits],
                                    memory.link_ids)
    layout = build_layout([segments], config, memory.engine.tokenizer)
    context_len = int((layout.valid & ~layout.is_tail).sum())
    group = model.num_attention_heads // model.num_key_value_heads
    return min(int(context_len // (config.adaptive_ratio * group * config.chunk_size)) + 1, max(1, num_chunks // 4))


SINGLE_LEVEL = {"fixed": {}, "adaptive": {"k_policy": "adaptive", "adaptive_ratio": 1.0},
                "top-p": {"k_policy": "top_p", "top_p": 0.5}}


@pytest.mark.parametrize("policy", list(SINGLE_LEVEL.values()), ids=list(SINGLE_LEVEL))
def test_single_level_search_chunks_follow_the_k_policy(tokenizer, policy):  # noqa: F811
    """One level: a hit's chunks are the engine's selection among the hits' chunks under the k
    policy (selection.ChunkSelector's rule); with adaptive k or top_p that is not a fixed top_k."""
    memory = GistMemory(tiny_engine(tokenizer, **policy), progress=False)
    memory.add(PASSAGES)
    hits = memory.search(QUESTION, k=2)
    gists = _hits_gists(memory, hits)
    config = memory.config
    k = _adaptive_k(memory, hits, len(gists[1][0])) if config.k_policy == "adaptive" else None
    want = _votes(memory, gists, k=k)[0]
    _assert_votes_equal(_reported(hits), want)
    if config.k_policy != "fixed":  # the case tells the policy from the fixed top_k search ran before
        assert k is None or k != config.top_k
        assert _votes(memory, gists, config=GistConfig(**{**config.to_dict(), "k_policy": "fixed"}))[0] != want
