"""Files of a saved GistMemory: crash-safe writes, content-addressed names, manifest checks.

A save writes every file to a temporary sibling, fsyncs it and renames it into place, the
manifest last; so a save killed at any point leaves the previous memory loadable (see
gsa_rag.memory for the format, tests/test_faults.py for the sweep).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from gsa_rag.errors import MemoryFormatError

# what save() names its files; load() refuses any other name (no "../" from a tampered manifest)
FILE_NAME = re.compile(r"(kv|vectors)-[0-9a-f]{32}\.safetensors")
# what atomic_write's tempfile.mkstemp(prefix=".tmp-") leaves after a crash: ".tmp-" and random
# lowercase letters, digits, "_" (no dot, no extension); save() sweeps only these and FILE_NAME
TEMP_NAME = re.compile(r"\.tmp-[a-z0-9_]+")


def is_own_file(name: str) -> bool:
    """Whether `name` is a file GistMemory.save writes (an entry, the vectors, a temp file)."""
    return FILE_NAME.fullmatch(name) is not None or TEMP_NAME.fullmatch(name) is not None


def check_save_target(directory: Path, manifest_name: str, fmt: str) -> None:
    """Refuses to save into a folder whose `manifest_name` is not a gist-memory manifest: saving
    overwrites that file, so it would destroy someone else's manifest (nothing is written)."""
    path = directory / manifest_name
    if not path.exists():
        return
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise MemoryFormatError(
            f"{path} exists and is not a gist memory manifest; GistMemory.save would overwrite it. "
            "Save the memory into an empty folder (or one that holds a gist memory)."
        )


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()



def safetensors_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file (its header: 8-byte little-endian length, JSON)."""
    size = int.from_bytes(data[:8], "little")
    try:
        return json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        return {}


def check_manifest(manifest: dict, path: Path) -> None:
    """Refuses a manifest whose fields are missing or of the wrong type, or that names files
    save() would never write (a tampered manifest must not reach outside its directory)."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise MemoryFormatError(f"{path} is malformed ({what}); it was not written by GistMemory.save, or was edited")

    def is_file_name(name) -> bool:
        return isinstance(name, str) and FILE_NAME.fullmatch(name) is not None

    need(isinstance(manifest.get("model_fingerprint"), str), "model_fingerprint")
    need(isinstance(manifest.get("encoding"), dict), "encoding")
    need(manifest.get("system") is None or isinstance(manifest.get("system"), str), "system")
    need(isinstance(manifest.get("num_links"), int), "num_links")
    need(isinstance(manifest.get("entries"), list) and isinstance(manifest.get("passages"), list), "entries/passages")
    for item in manifest["entries"]:
        need(isinstance(item, dict) and isinstance(item.get("key"), str) and item.get("kind") in ("passage", "prefix")
             and isinstance(item.get("base"), int) and isinstance(item.get("sha256"), str)
             and isinstance(item.get("sink"), list) and all(isinstance(t, int) for t in item["sink"]), "an entry")
        need(is_file_name(item.get("file")), f"file name {item.get('file')!r}")
    for item in manifest["passages"]:
        need(isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("id", "text_sha256", "text", "title")),
             "a passage")
    vectors = manifest.get("vectors")
    if vectors:
        need(isinstance(vectors, dict) and is_file_name(vectors.get("file")) and isinstance(vectors.get("ids"), list),
             "vectors")


def atomic_write(path: Path, data: bytes) -> None:
    """Writes `data` to a temporary sibling, flushes it to disk, then renames it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes it owner-only; a plain write would not
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


# read once, at import: setting it even for a moment while another thread creates a file would
# give that file the wrong mode
_UMASK = _read_umask()


def write_if_changed(path: Path, data: bytes, digest: str) -> None:
    # content-addressed: a file of this name with the right bytes is already what we would write
    if path.is_file() and path.stat().st_size == len(data) and sha256(path.read_bytes()) == digest:
        return
    atomic_write(path, data)
