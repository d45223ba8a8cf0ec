"""Gist memory on disk: same answers after save/load, crash-safe saves, foreign and corrupt files refused."""

from __future__ import annotations

import json
import os
import signal
import time
import traceback

import pytest
import torch
from test_memory import PASSAGES, QUESTION, tiny_engine
from transformers import AutoTokenizer

import gsa_rag.memory as memory_module
from gsa_rag import memory_files
from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.memory import GistMemory, MemoryFormatError

NEW = ["The Wasa was later renamed Vasa in modern Swedish spelling.", "Djurgarden is an island in central Stockholm."]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)


def answers(engine, memory, ids, questions=(QUESTION, "Where is the museum?"), n=6):
    return [engine.generate(q, ids, memory=memory, max_new_tokens=n) for q in questions]


def test_default_model_save_load_and_offload_give_the_same_answers(default_model_dir, tmp_path):
    engine = GistEngine.from_pretrained(str(default_model_dir), config=GistConfig(chunk_size=8, top_k=2), adapter=None, device="cpu")
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    want = answers(engine, memory, ids, [QUESTION], n=4)
    memory.save(tmp_path / "mem")
    for offload in (False, True):
        loaded = GistMemory.load(tmp_path / "mem", engine, offload=offload, progress=False)
        assert loaded.ids == ids and loaded.offload == offload
        before = loaded.encoded_tokens
        assert answers(engine, loaded, ids, [QUESTION], n=4) == want
        assert loaded.encoded_tokens == before  # nothing re-encoded after loading
    stats = loaded.stats()
    assert stats.host_bytes == stats.raw_bytes and stats.device_bytes == stats.gist_bytes
    assert [h.id for h in loaded.search(QUESTION, k=3)] == [h.id for h in memory.search(QUESTION, k=3)]


def test_saves_are_content_addressed_and_incremental(tokenizer, tmp_path):
    engine = tiny_engine(tokenizer)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    memory.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "gsa-rag-memory" and manifest["version"] == 1
    assert manifest["model_fingerprint"] == memory.fingerprint
    assert [p["id"] for p in manifest["passages"]] == ids
    assert all(len(p["text_sha256"]) == 64 for p in manifest["passages"])
    files = {e["file"]: e["sha256"] for e in manifest["entries"]}
    assert set(files) == {p.name for p in tmp_path.glob("kv-*.safetensors")}
    stamps = {name: (tmp_path / name).stat().st_mtime_ns for name in files}
    memory.add([NEW[0]])
    memory.remove(ids[1])
    memory.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    names = {e["file"] for e in manifest["entries"]}
    assert names == {p.name for p in tmp_path.glob("kv-*.safetensors")}  # the removed passage's file is gone
    for name in names & set(stamps):
        assert (tmp_path / name).stat().st_mtime_ns == stamps[name]  # unchanged entries are not rewritten
    assert not list(tmp_path.glob(".tmp-*"))
    assert "pickle" not in (tmp_path / "manifest.json").read_text()


def test_error_inside_the_writer_leaves_the_previous_memory_loadable(tokenizer, tmp_path, monkeypatch):
    engine = tiny_engine(tokenizer)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    memory.save(tmp_path)
    want = answers(engine, memory, ids)
    memory.add(NEW)
    real = memory_module._atomic_write
    for fail_at in (1, 3):  # a passage file, and the manifest (after all files are written)
        calls = []

        def failing(path, data, calls=calls, fail_at=fail_at):
            calls.append(path)
            if len(calls) == fail_at or (fail_at == 3 and path.name == "manifest.json"):
                with open(path.parent / ".tmp-half", "wb") as f:  # a half-written temp file, as a crash leaves
                    f.write(data[: len(data) // 2])
                raise OSError("disk full")
            return real(path, data)

        # every write of a save: the entry files (memory_files) and the manifest (memory)
        monkeypatch.setattr(memory_files, "atomic_write", failing)
        monkeypatch.setattr(memory_module, "_atomic_write", failing)
        with pytest.raises(OSError, match="disk full"):
            memory.save(tmp_path)
        assert len(calls) == fail_at or calls[-1].name == "manifest.json"
        monkeypatch.setattr(memory_files, "atomic_write", real)
        monkeypatch.setattr(memory_module, "_atomic_write", real)
        old = GistMemory.load(tmp_path, engine, progress=False)
        assert old.ids == ids
        assert answers(engine, old, ids) == want
    memory.save(tmp_path)  # the next good save publishes, and sweeps the leftovers
    assert GistMemory.load(tmp_path, engine, progress=False).ids == memory.ids
    assert not list(tmp_path.glob(".tmp-*"))


def test_killed_save_leaves_the_previous_memory_loadable(tokenizer, tmp_path):
    engine = tiny_engine(tokenizer)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    memory.save(tmp_path / "mem")
    want = answers(engine, memory, ids)
    # a child forked from this process (the model already here: no new interpreter importing
    # torch) loads the memory, adds passages and saves; it stalls with every new file written and
    # the manifest about to be published, and is SIGKILLed there (no cleanup runs)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            torch.set_num_threads(1)  # a forked child has no OpenMP pool: torch must not wait on one
            child = GistMemory.load(tmp_path / "mem", engine, progress=False)
            child.add(NEW)
            replace = os.replace

            def stall(src, dst):
                if str(dst).endswith("manifest.json"):
                    os.write(write, b"STALLED\n")
                    time.sleep(600)
                return replace(src, dst)

            os.replace = stall
            child.save(tmp_path / "mem")
            os.write(write, b"the save finished without publishing its manifest\n")
        except BaseException:  # noqa: BLE001 - reported to the parent, which reads the pipe
            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(3)
    os.close(write)
    with os.fdopen(read) as child_says:
        try:
            line = child_says.readline()
            assert line.strip() == "STALLED", line + child_says.read()
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert list((tmp_path / "mem").glob(".tmp-*"))  # the dead save left its temp manifest behind
    old = GistMemory.load(tmp_path / "mem", engine, progress=False)
    assert old.ids == ids and answers(engine, old, ids) == want


def test_foreign_or_corrupt_memories_are_refused(tokenizer, tmp_path):
    engine = tiny_engine(tokenizer)
    memory = GistMemory(engine, progress=False)
    memory.add(PASSAGES)
    memory.save(tmp_path / "mem")
    with pytest.raises(MemoryFormatError, match="another model"):
        GistMemory.load(tmp_path / "mem", tiny_engine(tokenizer, seed=1))
    with pytest.raises(MemoryFormatError, match="another gist config"):
        GistMemory.load(tmp_path / "mem", GistEngine(engine.model, tokenizer, GistConfig(chunk_size=8, sink=3)))
    # selection settings do not change the cached KV: a memory serves any top-k
    GistMemory.load(tmp_path / "mem", GistEngine(engine.model, tokenizer, GistConfig(chunk_size=4, sink=3, top_k=3)))
    with pytest.raises(MemoryFormatError, match="no gist memory"):
        GistMemory.load(tmp_path / "nothing", engine)

    def corrupted(name, change):
        target = tmp_path / name
        if target.exists():
            import shutil

            shutil.rmtree(target)
        import shutil

        shutil.copytree(tmp_path / "mem", target)
        change(target)
        return target

    def flip_byte(d):
        f = min(d.glob("kv-*.safetensors"))
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))

    with pytest.raises(MemoryFormatError, match="corrupt"):
        GistMemory.load(corrupted("flipped", flip_byte), engine)
    with pytest.raises(MemoryFormatError, match="missing"):
        GistMemory.load(corrupted("missing", lambda d: min(d.glob("kv-*.safetensors")).unlink()), engine)
    with pytest.raises(MemoryFormatError, match="corrupt"):
        GistMemory.load(corrupted("truncated", lambda d: (d / "manifest.json").write_text('{"format": "gsa-rag-')), engine)

    def bump(d):
        manifest = json.loads((d / "manifest.json").read_text())
        manifest["version"] = 99
        (d / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(MemoryFormatError, match="version 99"):
        GistMemory.load(corrupted("newer", bump), engine)
    assert os.path.isdir(tmp_path / "mem") and torch.is_tensor(memory._entries[next(iter(memory._entries))].res_k)
