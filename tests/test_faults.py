"""Faults: a save that dies at any step (an error, or SIGKILL) leaves a loadable memory; tampered
files are refused; an add that runs out of memory part way leaves the memory as it was.

tests/test_memory_persist.py holds the first cases (an error at two steps, one SIGKILL, a flipped
byte, a missing file, a truncated manifest, a newer version, another model or config); these
tests sweep every step and add the tampering that the checksum alone does not catch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import traceback
from pathlib import Path

import pytest
import torch
from test_memory import PASSAGES, QUESTION, tiny_engine
from transformers import AutoTokenizer

from gsa_rag.errors import MemoryFormatError
from gsa_rag.memory import GistMemory

NEW = ["The Wasa was later renamed Vasa in modern Swedish spelling.", "Djurgarden is an island in central Stockholm."]


class Faults:
    """Counts the file-system steps of a save (each file write, fsync, rename and unlink) and
    fails at step `at` (1-based): `action()` raises, or kills the process. A write that fails
    first writes half its bytes, as a crash in the middle of a write would leave them.

    Attributes:
        steps: (kind, file name) of every step seen so far.
    """

    def __init__(self, at: int | None, action):
        self.at, self.action, self.steps = at, action, []

    def _step(self, kind: str, name: str) -> bool:
        self.steps.append((kind, name))
        return len(self.steps) == self.at

    def install(self, patch) -> None:
        """`patch(obj, name, value)`: monkeypatch.setattr, or setattr in a child process."""
        replace, fsync, fdopen, unlink = os.replace, os.fsync, os.fdopen, Path.unlink
        faults = self

        class File:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                if faults._step("write", Path(self.f.name if isinstance(self.f.name, str) else "").name):
                    self.f.write(data[: len(data) // 2])
                    self.f.flush()
                    faults.action()
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

        def on_replace(src, dst):
            if self._step("replace", Path(dst).name):
                self.action()
            return replace(src, dst)

        def on_fsync(fd):
            if self._step("fsync", str(fd)):
                self.action()
            return fsync(fd)

        def on_unlink(path, missing_ok=False):
            if self._step("unlink", path.name):
                self.action()
            return unlink(path, missing_ok=missing_ok)

        patch(os, "replace", on_replace)
        patch(os, "fsync", on_fsync)
        patch(os, "fdopen", lambda *a, **k: File(fdopen(*a, **k)))
        patch(Path, "unlink", on_unlink)


class InjectedFault(OSError):
    pass


def raise_fault():
    raise InjectedFault("injected fault")


def snapshot(memory: GistMemory) -> dict:
    return {
        "passages": [(pid, memory.passage(pid)) for pid in memory.ids],
        "entries": {k: [t.detach().cpu().clone() for t in (e.res_k, e.res_v, e.raw_k, e.raw_v)] for k, e in memory._entries.items()},
    }


def same(a: dict, b: dict) -> bool:
    if a["passages"] != b["passages"] or set(a["entries"]) != set(b["entries"]):
        return False
    return all(torch.allclose(x, y, atol=1e-5) for k in a["entries"] for x, y in zip(a["entries"][k], b["entries"][k]))


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def engine(tokenizer):
    return tiny_engine(tokenizer)


@pytest.fixture(scope="module")
def saved(engine, tmp_path_factory):
    """(old directory, old snapshot, the memory after a change, its snapshot): the change adds
    two passages and removes one, so a save writes files, the manifest, and deletes a file."""
    directory = tmp_path_factory.mktemp("old") / "mem"
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    memory.save(directory)
    old = snapshot(memory)
    memory.add(NEW)
    memory.remove(ids[1])
    return directory, old, memory, snapshot(memory)


def dry_run_steps(memory, directory: Path, tmp: Path) -> list:
    faults = Faults(None, raise_fault)
    target = tmp / "dry"
    shutil.copytree(directory, target)
    patched = []
    faults.install(lambda obj, name, value: (patched.append((obj, name, getattr(obj, name))), setattr(obj, name, value)))
    try:
        memory.save(target)
    finally:
        for obj, name, value in reversed(patched):
            setattr(obj, name, value)
    return faults.steps


def publish_step(steps) -> int:
    """1-based index of the step that publishes the new manifest (its rename)."""
    return next(i + 1 for i, (kind, name) in enumerate(steps) if kind == "replace" and name == "manifest.json")


def test_an_error_at_any_step_of_a_save_leaves_the_old_or_the_new_memory(engine, saved, tmp_path, monkeypatch):
    directory, old, memory, new = saved
    steps = dry_run_steps(memory, directory, tmp_path)
    publish = publish_step(steps)
    assert {"write", "fsync", "replace", "unlink"} <= {kind for kind, _ in steps} and publish < len(steps)
    for at in range(1, len(steps) + 1):
        target = tmp_path / f"at{at}"
        shutil.copytree(directory, target)
        with monkeypatch.context() as patch:
            Faults(at, raise_fault).install(patch.setattr)
            try:
                memory.save(target)
                finished = True  # only a failed fsync of the directory is ignored (the data is written)
            except InjectedFault:
                finished = False
        assert not finished or steps[at - 1][0] == "fsync", (at, steps[at - 1])
        loaded = snapshot(GistMemory.load(target, engine, progress=False))
        # before the manifest's rename the old memory stands; from then on the new one
        assert same(loaded, old if at <= publish and not finished else new), (at, steps[at - 1])
    memory.save(target)  # a good save after a failed one publishes and sweeps the leftovers
    assert same(snapshot(GistMemory.load(target, engine, progress=False)), new)
    assert not list(target.glob(".tmp-*"))


def test_sigkill_at_any_step_of_a_save_leaves_the_old_or_the_new_memory(saved, engine, tmp_path):
    """The same sweep with SIGKILL (no `finally`, no cleanup): a saver forked from this process
    per step (the memory and model already here: no new interpreter importing torch) kills
    itself at that step."""
    directory, old, memory, new = saved
    steps = dry_run_steps(memory, directory, tmp_path)
    publish = publish_step(steps)
    for at in range(1, len(steps) + 1):
        target = tmp_path / f"kill{at}"
        shutil.copytree(directory, target)
        pid = os.fork()
        if pid == 0:
            try:
                torch.set_num_threads(1)  # a forked child has no OpenMP pool: torch must not wait on one
                Faults(at, lambda: os.kill(os.getpid(), signal.SIGKILL)).install(setattr)
                memory.save(target)
            except BaseException:  # noqa: BLE001 - to the captured stderr, for the assertion below
                traceback.print_exc()
            finally:
                os._exit(3)  # the save finished, or failed otherwise: the kill never came
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (at, steps[at - 1], status)
        loaded = snapshot(GistMemory.load(target, engine, progress=False))
        assert same(loaded, old if at <= publish else new), (at, steps[at - 1])


# --- files that are not what the manifest says ------------------------------------------------------


def tampered(directory: Path, tmp_path: Path, name: str, change) -> Path:
    target = tmp_path / name
    shutil.copytree(directory, target)
    change(target)
    return target


def edit_manifest(change):
    def edit(d: Path):
        manifest = json.loads((d / "manifest.json").read_text())
        change(manifest, d)
        (d / "manifest.json").write_text(json.dumps(manifest))

    return edit


def kv_files(d: Path) -> list[Path]:
    return sorted(d.glob("kv-*.safetensors"))


def set_sha(manifest, d: Path, index: int = 0) -> None:
    import hashlib

    item = manifest["entries"][index]
    item["sha256"] = hashlib.sha256((d / item["file"]).read_bytes()).hexdigest()


def _truncate_kv(d):
    f = kv_files(d)[0]
    f.write_bytes(f.read_bytes()[:-100])


def _swap_files(manifest, d):
    a, b = manifest["entries"][0], manifest["entries"][1]
    a["file"], b["file"], a["sha256"], b["sha256"] = b["file"], a["file"], b["sha256"], a["sha256"]


def _random_bytes(manifest, d):
    (d / manifest["entries"][0]["file"]).write_bytes(os.urandom(256))
    set_sha(manifest, d)


def _foreign_safetensors(manifest, d):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(d / manifest["entries"][0]["file"]))
    set_sha(manifest, d)


def _edit_text(manifest, d):
    manifest["passages"][0]["text"] = manifest["passages"][0]["text"].replace("1628", "1629")


TAMPERING = [
    ("truncated kv file", _truncate_kv, "corrupt"),
    ("empty manifest", lambda d: (d / "manifest.json").write_text(""), "corrupt"),
    ("manifest is a JSON list", lambda d: (d / "manifest.json").write_text("[1, 2]"), "not a gist memory manifest"),
    ("foreign manifest", lambda d: (d / "manifest.json").write_text('{"format": "other-tool", "version": 1}'),
     "not a gist memory manifest"),
    ("manifest without entries", edit_manifest(lambda m, d: m.pop("entries")), "malformed"),
    ("entry base not an int", edit_manifest(lambda m, d: m["entries"][0].update(base="x")), "malformed"),
    ("file name outside the directory", edit_manifest(lambda m, d: m["entries"][0].update(file="../../etc/passwd")),
     "file name '../../etc/passwd'"),
    ("passage text edited (valid JSON)", edit_manifest(_edit_text), "does not match its sha256"),
    ("two kv files swapped, sums updated", edit_manifest(_swap_files), "holds another entry"),
    ("random bytes, sum updated", edit_manifest(_random_bytes), "not a safetensors file"),
    ("foreign safetensors, sum updated", edit_manifest(_foreign_safetensors), "not a gist memory entry"),
]


@pytest.mark.parametrize("name, change, words", TAMPERING, ids=[t[0] for t in TAMPERING])
def test_tampered_or_foreign_files_are_refused(engine, saved, tmp_path, name, change, words):
    directory = saved[0]
    with pytest.raises(MemoryFormatError) as info:
        GistMemory.load(tampered(directory, tmp_path, "t", change), engine, progress=False)
    assert words in str(info.value)


# --- running out of memory in add -------------------------------------------------------------------


@pytest.mark.parametrize("fault", [torch.OutOfMemoryError("CUDA out of memory (injected)"), KeyboardInterrupt()],
                         ids=["out-of-memory", "interrupt"])
def test_an_add_that_fails_mid_batch_leaves_the_memory_as_it_was(engine, fault, monkeypatch):
    memory = GistMemory(engine, progress=False, batch_size=2)
    memory.add(PASSAGES[:1])
    before, stats = snapshot(memory), memory.stats()
    texts = [f"Extra passage {i} about the Vasa's guns and sails." for i in range(5)]
    real, calls = memory._encode, []

    def encode(units, skip):
        calls.append(len(units))
        if len(calls) == 2:  # the first batch is encoded, the second one fails
            raise fault
        return real(units, skip)

    monkeypatch.setattr(memory, "_encode", encode)
    with pytest.raises(type(fault)):
        memory.add(texts)
    assert calls == [2, 2]
    assert same(snapshot(memory), before) and memory.stats() == stats
    monkeypatch.undo()
    ids = memory.add(texts)  # the memory still works, and ends where a clean add would
    clean = GistMemory(engine, progress=False)
    clean.add(PASSAGES[:1])
    clean.add(texts)
    assert ids == clean.ids[1:] and same(snapshot(memory), snapshot(clean))


def test_a_tiny_byte_budget_evicts_but_keeps_the_memory_consistent(engine, caplog):
    one = GistMemory(engine, progress=False)
    one.add(PASSAGES[:1])
    entry_bytes = max(e.res_bytes + e.raw_bytes for e in one._entries.values())
    memory = GistMemory(engine, progress=False, max_bytes=int(entry_bytes * 1.5))
    texts = [f"Budget passage {i}: the Vasa carried {i} cannons." for i in range(6)]

    def check():
        keys = set(memory._entries)
        sink = memory._sink(memory.system)[0]
        for pid in memory.ids:  # every passage still named has its KV
            assert memory._passage_key(sink, memory._passages[pid].sha) in keys
        assert sum(e.res_bytes + e.raw_bytes for e in memory._entries.values()) == memory.stats().full_bytes

    for text in texts:
        [pid] = memory.add([text])
        check()
        assert pid in memory.ids  # what was just added is never the one evicted
        assert {h.id for h in memory.search(QUESTION, k=2)} <= set(memory.ids)  # a search never returns an evicted id
    assert len(memory) < len(texts)  # older passages were evicted
    with caplog.at_level("WARNING"):
        ids = memory.add(texts[:3])  # more than the budget in one call: kept (all needed now), with a warning
    check()
    assert set(ids) <= set(memory.ids) and "exceed max_bytes" in caplog.text
    assert isinstance(engine.generate(QUESTION, ids, memory=memory, max_new_tokens=2), str)
    memory.add(["One more passage to push the others out."])
    check()
    assert memory.stats().full_bytes <= memory.max_bytes
