"""DecodeCache (gsa_rag.decode_cache): DynamicCache's results without a whole-layer copy per step."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from gsa_rag.config import GistConfig
from gsa_rag.decode_cache import DecodeCache
from gsa_rag.generation import SamplingParams, generate_tokens
from gsa_rag.layout import build_layout
from tests.fakes import FakeTokenizer, random_segments


def random_kv(g: torch.Generator, n: int, dtype=torch.float32):
    return torch.randn(2, 3, n, 8, generator=g).to(dtype), torch.randn(2, 3, n, 8, generator=g).to(dtype)


@pytest.mark.parametrize("reserve", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_returns_what_dynamic_cache_returns(reserve, dtype):
    """Many appends of random sizes across several capacity doublings, two layers."""
    g = torch.Generator().manual_seed(reserve)
    want, got = DynamicCache(), DecodeCache(reserve=reserve)
    sizes = [7] + [1] * 40 + [3, 1, 2] + [1] * 30
    capacities = set()
    for n in sizes:
        for layer in range(2):
            k, v = random_kv(g, n, dtype)
            wk, wv = want.update(k, v, layer)
            gk, gv = got.update(k, v, layer)
            assert torch.equal(gk, wk) and torch.equal(gv, wv) and gk.dtype == dtype
        assert got.get_seq_length() == want.get_seq_length()
        capacities.add(got.layers[0].capacity)
    assert len(capacities) >= 3, f"the test should cross doublings, saw capacities {sorted(capacities)}"


def test_appending_does_not_reallocate_between_doublings():
    g = torch.Generator().manual_seed(0)
    cache = DecodeCache()
    cache.update(*random_kv(g, 4), 0)
    layer = cache.layers[0]
    reallocations = 0
    for _ in range(60):
        ptr, capacity = layer.key_buffer.data_ptr(), layer.capacity
        keys, values = cache.update(*random_kv(g, 1), 0)
        if layer.key_buffer.data_ptr() != ptr:
            reallocations += 1
            assert layer.capacity == 2 * capacity  # full: doubled, not grown by a column
        else:
            assert layer.capacity == capacity
        # the returned tensors are views of the buffers, not copies
        assert keys.data_ptr() == layer.key_buffer.data_ptr() and values.data_ptr() == layer.value_buffer.data_ptr()
    assert reallocations == 4  # 4 -> 8 -> 16 -> 32 -> 64 columns for 64 tokens


def test_reserve_fits_the_whole_generation_and_a_crop_is_followed():
    g = torch.Generator().manual_seed(1)
    cache = DecodeCache(reserve=10)
    cache.update(*random_kv(g, 6), 0)
    layer = cache.layers[0]
    ptr = layer.key_buffer.data_ptr()
    for _ in range(10):
        cache.update(*random_kv(g, 1), 0)
    assert layer.key_buffer.data_ptr() == ptr and layer.capacity == 16
    # DynamicLayer.crop (and the benchmark's crop) keep a view: appending then overwrites the cut columns
    layer.crop(-5)
    k, v = random_kv(g, 1)
    keys, _ = cache.update(k, v, 0)
    assert keys.shape[2] == 12 and torch.equal(keys[:, :, -1:], k) and layer.key_buffer.data_ptr() == ptr
    # a layer whose tensors were replaced (beam reorder, batch select) is adopted into a new buffer
    layer.batch_select_indices(torch.tensor([1]))
    before = layer.keys.clone()
    keys, _ = cache.update(k[1:], v[1:], 0)
    assert torch.equal(keys[:, :, :12], before) and keys.shape == (1, 3, 13, 8)


def tiny_model():
    import gsa_rag.attention  # noqa: F401  (registers "gsa")

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="gsa").eval()


@pytest.mark.parametrize("kernels", ["0", "1"])
@pytest.mark.parametrize("chunk_size", [4, 0])  # gists, and no gists at all
def test_greedy_engine_tokens_equal_dynamic_cache(chunk_size, kernels, monkeypatch):
    """The engine's loop with its default DecodeCache vs a DynamicCache: the same greedy tokens
    and the same attended counts; kernels="1" runs the Triton decode kernels (the interpreter on
    the CPU) on the strided cache views."""
    monkeypatch.setenv("GSA_RAG_KERNELS", kernels)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels run on CUDA, else in the interpreter
    model = tiny_model().to(device)
    config = GistConfig(chunk_size=chunk_size, sink=2, top_k=2)
    layout = build_layout([random_segments(random.Random(seed), max_passages=4, max_len=40) for seed in range(2)],
                          config, FakeTokenizer()).to(device)
    # the interpreted kernels cost seconds a step on the CPU: fewer steps there, two decode steps
    # (the first builds the DecodePlan, the second takes it from the layout's lineage cache; the
    # steps after that differ only in the list lengths)
    params = SamplingParams(max_new_tokens=3 if kernels == "1" and device == "cpu" else 12)
    runs = {}
    for name, cache in (("dynamic", DynamicCache()), ("decode", None)):
        states = []
        # eager steps (cuda_graph=False: tests/test_graph_decode.py covers the replayed ones)
        tokens = generate_tokens(model, layout, config, params, set(), observe=states.append, cache=cache,
                                 cuda_graph=False)
        runs[name] = (torch.stack(list(tokens)), [dict(s.attended) for s in states])
        if kernels == "1" and chunk_size:
            assert getattr(states[-1], "_decode_plan", None), "the kernel path did not run"
    assert torch.equal(runs["decode"][0], runs["dynamic"][0])
    for a, b in zip(runs["decode"][1], runs["dynamic"][1], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)
