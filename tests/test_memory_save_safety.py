"""GistMemory.save leaves other people's files alone, and gist memory is exact on NoPE layers."""

from __future__ import annotations

import json

import pytest
import torch
from test_memory import PASSAGES, QUESTION, TINY, tiny_engine
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import gsa_rag.attention  # noqa: F401  (registers the "gsa" attention)
from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.generation import forward
from gsa_rag.layout import Segment, build_layout, encode_text
from gsa_rag.memory import GistMemory, MemoryFormatError
from gsa_rag.models import add_gist_tokens
from gsa_rag.prompt import as_passage


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def memory(tokenizer):
    memory = GistMemory(tiny_engine(tokenizer), progress=False)
    memory.add(PASSAGES)
    return memory


USER_FILES = ("kv-store.sqlite", "vectors-wikipedia.npy", ".tmp-upload.part", "kv-" + "0" * 32 + ".safetensors.bak",
              "notes.txt")


def test_save_keeps_the_users_files_in_a_folder_without_manifest(memory, tmp_path):
    for name in USER_FILES:
        (tmp_path / name).write_text("user data\n")
    memory.save(tmp_path)
    for name in USER_FILES:
        assert (tmp_path / name).read_text() == "user data\n", name
    memory.save(tmp_path)  # saving again over its own memory keeps them too
    assert all((tmp_path / name).exists() for name in USER_FILES)
    assert GistMemory.load(tmp_path, memory.engine, progress=False).ids == memory.ids


def test_save_sweeps_only_its_own_stale_files(memory, tmp_path):
    memory.save(tmp_path)
    stale = ["kv-" + "a" * 32 + ".safetensors", "vectors-" + "b" * 32 + ".safetensors", ".tmp-x1y2z3_q"]
    for name in stale:
        (tmp_path / name).write_bytes(b"old")
    (tmp_path / "kv-store.sqlite").write_text("user data\n")
    memory.save(tmp_path)
    assert not any((tmp_path / name).exists() for name in stale)
    assert (tmp_path / "kv-store.sqlite").exists()


@pytest.mark.parametrize("content", ['{"name": "my-project", "version": "1.0"}\n', "[1, 2]", "not json at all"])
def test_save_refuses_a_folder_with_a_foreign_manifest(memory, tmp_path, content):
    (tmp_path / "manifest.json").write_text(content)
    (tmp_path / ("kv-" + "c" * 32 + ".safetensors")).write_bytes(b"theirs")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(MemoryFormatError, match="not a gist memory manifest"):
        memory.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing deleted


def test_save_over_a_previous_gist_memory_still_works(memory, tmp_path):
    memory.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "gsa-rag-memory"
    memory.save(tmp_path)
    assert GistMemory.load(tmp_path, memory.engine, progress=False).ids == memory.ids


# --- layers without RoPE (SmolLM3 no_rope_layers) -----------------------------------------------


def smollm3_engine(tokenizer, no_rope_layers) -> GistEngine:
    from transformers import SmolLM3Config

    torch.manual_seed(0)
    cfg = SmolLM3Config(vocab_size=tokenizer.vocab_size, no_rope_layers=no_rope_layers, pad_token_id=None,
                        bos_token_id=None, eos_token_id=None, **TINY)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="gsa").eval()
    add_gist_tokens(model, tokenizer, GistConfig())
    return GistEngine(model, tokenizer, GistConfig(chunk_size=4, sink=3, top_k=1))


def encoded_in_place(engine, sink: list[int], passage, shift: int):
    """The unit [sink][passage] encoded alone with its passage moved by `shift` positions: its
    layout and KV (what a cached passage must equal once placed)."""
    config, tok = engine.config, engine.tokenizer
    text = passage if isinstance(passage, list) else encode_text(tok, as_passage(passage).render(None))
    unit = build_layout([[Segment(tuple(sink), True), Segment(tuple(text), True, 0)]], config, tok)
    unit.position_ids += shift
    want = DynamicCache()
    with torch.no_grad():
        forward(engine.model, unit, unit.seq_len, want, config)
    return unit, want


def worst_key_error(engine, memory, ids) -> dict[int, float]:
    """Per layer, the largest gap between a key the memory assembled from its cache (fetched from
    the host too, when offloading) and the same key encoded in place at its final offset."""
    config = engine.config
    layout, cache = memory.prepare(QUESTION, ids)
    L = engine.model.config.num_hidden_layers
    if cache.offloaded:  # every column visible: the hook fetches (and places) every raw column
        everything = torch.ones(1, layout.seq_len, dtype=torch.bool)
        for layer in range(L):
            cache.hook(layer, None, cache.layers[layer].keys, cache.layers[layer].values, everything)
    sink = layout.input_ids[0, : config.sink].tolist()
    worst: dict[int, float] = {}
    for p, passage in enumerate(PASSAGES):
        cols = torch.nonzero(layout.doc_id[0] == p).flatten().tolist()
        shift = int(layout.position_ids[0, cols[0]]) - config.sink
        assert p == 0 or shift > 0  # the later passages really are moved
        _, want = encoded_in_place(engine, sink, passage, shift)
        for layer in range(L):
            got = cache.layers[layer].keys[0][:, cols].float()
            d = (got - want.layers[layer].keys[0, :, config.sink :].float()).abs().max().item()
            worst[layer] = max(worst.get(layer, 0.0), d)
    return worst


@pytest.mark.parametrize("offload", [False, True])
def test_memory_keys_equal_in_place_encoding_on_nope_layers(tokenizer, offload):
    """transformers reads `use_rope = config.no_rope_layers[i]`: 0 is a layer without RoPE (layer 1)."""
    engine = smollm3_engine(tokenizer, [1, 0, 1])
    memory = GistMemory(engine, offload=offload, progress=False)
    ids = memory.add(PASSAGES)
    worst = worst_key_error(engine, memory, ids)
    assert all(d < 1e-4 for d in worst.values()), worst


def test_search_places_gist_keys_as_encoded_in_place_on_nope_layers(tokenizer):
    engine = smollm3_engine(tokenizer, [1, 0, 1])
    memory = GistMemory(engine, progress=False)
    memory.add(PASSAGES)
    entry = next(e for e in memory._entries.values() if e.kind == "passage")
    tail_start = 200
    keys, _, _ = memory._placed_gist_keys([entry], tail_start)  # layers first_selecting_layer.. = 1, 2
    n_raw = int((~entry.is_gist).sum())
    shift = tail_start - memory.num_links - n_raw - entry.base
    unit, want = encoded_in_place(engine, list(entry.sink), list(entry.raw_ids), shift)
    gists = torch.nonzero(unit.is_gist[0]).flatten()
    assert len(gists) == keys.shape[2] and torch.equal(unit.input_ids[0, unit.seq_len - len(entry.ids):], entry.ids)
    for j, layer in enumerate(range(engine.config.first_selecting_layer, 3)):
        d = (keys[j] - want.layers[layer].keys[0][:, gists].float()).abs().max().item()
        assert d < 1e-4, (layer, d)


@pytest.mark.parametrize("kernel", [False, True])
def test_placement_leaves_nope_layers_keys_unrotated(kernel):
    from gsa_rag.kernels.kv_place import place_rotated_ref, place_rotated_triton

    if kernel:
        pytest.importorskip("triton")
        from gsa_rag.kernels import dispatch

        dispatch._interpreter_compat()
    g = torch.Generator().manual_seed(0)
    L, H, D, T = 3, 2, 16, 12
    k_parts = [torch.randn(L, H, 4, D, generator=g), torch.randn(L, H, 5, D, generator=g)]
    v_parts = [torch.randn(L, H, 4, D, generator=g), torch.randn(L, H, 5, D, generator=g)]
    columns, owner = torch.randperm(T, generator=g)[:9], torch.tensor([0] * 4 + [1] * 5)
    angle = torch.randn(2, D // 2, generator=g) * 3
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    # the kernel runs on CUDA where there is one (in Triton's interpreter elsewhere)
    device = "cuda" if kernel and torch.cuda.is_available() else "cpu"
    k_parts, v_parts = [p.to(device) for p in k_parts], [p.to(device) for p in v_parts]
    columns, owner, cos, sin = columns.to(device), owner.to(device), cos.to(device), sin.to(device)
    place = place_rotated_triton if kernel else place_rotated_ref
    keys, values = torch.zeros(L, 1, H, T, D, device=device), torch.zeros(L, 1, H, T, D, device=device)
    place(keys, values, columns, owner, k_parts, v_parts, cos, sin, rope_layers=[True, False, True])
    everywhere = torch.zeros_like(keys), torch.zeros_like(values)
    place_rotated_ref(*everywhere, columns, owner, k_parts, v_parts, cos, sin)
    assert torch.equal(keys[1, 0][:, columns], torch.cat(k_parts, 2)[1])  # NoPE layer: copied exactly
    torch.testing.assert_close(keys[[0, 2]], everywhere[0][[0, 2]])  # the others: rotated
    assert torch.equal(values, everywhere[1])
