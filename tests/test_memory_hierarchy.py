"""Gist memory over an H-GSA hierarchy (issue 5, item 4): passages cached with their meta-gists,
re-rotated and assembled as for one level; the question selects coarse to fine over the cache."""

from __future__ import annotations

import json
import random

import pytest
import torch
from fakes import random_hierarchical_config
from test_memory import PASSAGES, QUESTION, greedy, tiny_engine, tokenizer  # noqa: F401  (fixture)
from transformers import DynamicCache

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
