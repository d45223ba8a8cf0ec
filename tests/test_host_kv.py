"""gsa_rag.host_kv: offloaded raw KV packed into host blocks, and what GistMemory does with them."""

import gc

import pytest
import torch
from test_memory import PASSAGES, QUESTION, greedy, tiny_engine, tokenizer  # noqa: F401  (fixture)

from gsa_rag import host_kv
from gsa_rag.host_kv import HostKVStore
from gsa_rag.memory import GistMemory


def kv(n, seed, L=3, H=2, D=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, H, n, D, generator=g), torch.randn(L, H, n, D, generator=g)


def test_entries_are_views_of_shared_blocks_and_blocks_go_when_unused():
    per_column = 3 * 2 * 2 * 4 * 4  # L * (K, V) * H * D * fp32
    store = HostKVStore(block_bytes=10 * per_column, pin=False)  # 10 columns a block
    data = [kv(n, seed) for seed, n in enumerate((4, 5, 3, 12))]
    homes = [store.put(k, v) for k, v in data]
    for (k, v), home in zip(data, homes, strict=True):
        assert torch.equal(home.keys, k) and torch.equal(home.values, v)
        assert home.keys.untyped_storage().data_ptr() == home.block.untyped_storage().data_ptr()  # a view, no copy
    # 4 + 5 share the first block, 3 does not fit there, 12 is larger than a block: a block of its own
    assert [h.start for h in homes] == [0, 4, 0, 0]
    assert homes[0].block is homes[1].block and homes[2].block is not homes[1].block
    assert homes[3].block.shape[3] == 12
    assert store.reserved_bytes == (10 + 10 + 12) * per_column
    del homes[:2], data
    gc.collect()
    assert store.reserved_bytes == (10 + 12) * per_column  # the first block had no entry left
    moved = store.repack(homes)
    assert [torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) for a, b in zip(homes, moved, strict=True)] == [True, True]
    with pytest.raises(ValueError, match="one \\[L, Hkv, n, D\\] shape"):
        store.put(torch.zeros(3, 2, 4, 4), torch.zeros(3, 2, 5, 4))


def test_eviction_repacks_the_host_blocks_and_answers_stay(tokenizer, monkeypatch):  # noqa: F811
    """Evicted passages leave holes in their blocks; past twice the live bytes (plus a block) the
    memory repacks what is left, and questions over the repacked KV answer as before."""
    engine = tiny_engine(tokenizer)
    probe = GistMemory(engine, offload=True, progress=False)
    probe.add([PASSAGES[0]])
    entry = next(e for e in probe._entries.values() if e.kind == "passage")
    per_column = entry.raw_bytes // entry.raw_k.shape[2]
    monkeypatch.setattr(host_kv, "BLOCK_BYTES", 60 * per_column)  # a few passages a block
    many = PASSAGES + [f"Passage {i} tells of the island number {i} and its {i * 7} old harbours." for i in range(9)]
    memory = GistMemory(engine, offload=True, progress=False)
    ids = memory.add(many)
    assert len({id(e.raw_home.block) for e in memory._entries.values()}) < len(memory._entries)  # blocks are shared
    asked = {pid: greedy(engine, *memory.prepare(QUESTION, [pid])) for pid in ids[:2] + ids[3::2]}
    held = memory.prepare(QUESTION, ids)  # a question's cache keeps every old block alive
    for pid in ids[2::2]:  # every other passage: each block keeps some live KV, so none empties by itself
        memory.remove(pid)
    stats = memory.stats()
    used = {id(e.raw_home.block): e.raw_home.block for e in memory._entries.values()}
    assert sum(b.numel() * b.element_size() for b in used.values()) <= 2 * stats.host_bytes + memory._host_kv.block_bytes
    memory._tidy_host_kv()  # the blocks `held` keeps do not count: no second repack
    assert {id(e.raw_home.block) for e in memory._entries.values()} == set(used)
    del held
    gc.collect()
    assert memory.stats().host_reserved_bytes <= 2 * stats.host_bytes + memory._host_kv.block_bytes
    for pid, want in asked.items():  # the repacked KV answers as before
        assert greedy(engine, *memory.prepare(QUESTION, [pid])) == want
