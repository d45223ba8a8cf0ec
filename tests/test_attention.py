"""The gsa attention function's masks, layer by layer, on random queries and keys."""

import random
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from fakes import (
    FakeTokenizer,
    random_config,
    random_hierarchical_config,
    random_segments,
)

from gsa_rag import attention
from gsa_rag.attention import GistState, gsa_attention
from gsa_rag.config import GistConfig
from gsa_rag.layout import GistLayout, HostFacts, build_layout
from gsa_rag.masks import dense_gist_mask, dense_unfold_mask
from gsa_rag.selection import select_chunks, select_hierarchical


def state_and_qk(seed, config, Hq=4, Hkv=2, D=8):
    rng = random.Random(seed)
    layout = build_layout([random_segments(rng, max_len=40) for _ in range(2)], config, FakeTokenizer())
    g = torch.Generator().manual_seed(seed)
    B, T = layout.input_ids.shape
    state = GistState.for_new_tokens(layout, T, config)
    return state, torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)


def test_layer_zero_and_context_rows_use_the_forgetting_mask():
    config = GistConfig(chunk_size=4, sink=2, top_k=1)
    for seed in range(5):
        state, q, k = state_and_qk(seed, config)
        forget = dense_gist_mask(state.layout, config.num_previous_chunks)
        assert torch.equal(state.mask_for_layer(0, q, k)[:, 0], forget)
        layer1 = state.mask_for_layer(1, q, k)
        context = ~state.layout.is_tail
        for h in range(layer1.shape[1]):
            assert torch.equal(layer1[:, h][context], forget[context])


def test_tail_rows_keep_sink_window_and_tail_and_unfold_only_selected_chunks():
    config = GistConfig(chunk_size=4, sink=2, top_k=1, num_previous_chunks=1)
    for seed in range(10):
        state, q, k = state_and_qk(seed, config)
        layout = state.layout
        mask = state.mask_for_layer(1, q, k)
        for b in range(layout.batch_size):
            n = int(layout.num_chunks[b])
            for t in torch.nonzero(layout.is_tail[b]).flatten().tolist():
                for h in range(mask.shape[1]):
                    row = mask[b, h, t]
                    cols = torch.arange(t + 1)
                    chunk = layout.chunk_id[b, cols]
                    always = layout.is_sink[b, cols] | (chunk == n) | ((chunk == n - 1) & (n > 0))
                    assert row[cols][always & layout.valid[b, cols]].all()
                    assert not row[t + 1 :].any()
                    # at most 2 heads x top-1 chunks unfolded beyond the window, each whole
                    unfolded = set(chunk[row[cols] & ~always].tolist())
                    assert len(unfolded) <= 2
                    for c in unfolded:
                        assert row[cols][chunk == c].all()
                    # unselected closed chunks are invisible, gists included
                    hidden = (chunk >= 0) & (chunk < n - 1) & ~torch.isin(chunk, torch.tensor(sorted(unfolded), dtype=torch.long))
                    assert not row[cols][hidden].any()


def test_k_covering_every_chunk_unfolds_everything():
    config = GistConfig(chunk_size=3, sink=1, top_k=100)
    state, q, k = state_and_qk(7, config)
    mask = state.mask_for_layer(2, q, k)
    tail = state.layout.is_tail
    causal_valid = torch.tril(torch.ones(q.shape[2], q.shape[2], dtype=torch.bool))[None] & state.layout.valid[:, None, :]
    for h in range(mask.shape[1]):
        assert torch.equal(mask[:, h][tail], causal_valid[tail])


# --- the split mask (LayerMask) against the per-head mask it replaced -------------------------------


def per_head_mask(state, layer_idx, query, key):
    """The previous construction: the forgetting mask copied to every KV head, tail rows
    overwritten with what they unfold -> bool [B, 1 or Hkv, Tq, T]."""
    mask, layout, config = state.forget_mask(), state.layout, state.config
    tail = layout.is_tail[:, state.q_index]
    if layer_idx < config.first_selecting_layer or int(layout.num_chunks.max()) == 0 or not tail.any():
        return mask
    rows = slice(int(tail.any(0).nonzero()[0]), None)
    if layout.levels > 1:
        chosen = select_hierarchical(query[:, :, rows], key, layout, config)
        selected, sections = chosen.chunks, chosen.sections
    else:
        context_len = (layout.valid & ~layout.is_tail).sum(-1)
        selected = select_chunks(query[:, :, rows], key, layout.gist_index, layout.gist_valid, context_len, config)
        sections = None
    unfold = dense_unfold_mask(layout, selected, config.num_previous_chunks, state.q_index[rows], sections)
    head_mask = mask.expand(-1, key.shape[1], -1, -1).clone()
    head_mask[:, :, rows] = torch.where(tail[:, None, rows, None], unfold, head_mask[:, :, rows])
    return head_mask


def per_head_attention(mask, query, key, value, scaling):
    """The previous attention: mask, keys and values repeated to the query heads, one SDPA."""
    group = query.shape[1] // key.shape[1]
    if mask.shape[1] > 1:
        mask = mask.repeat_interleave(group, dim=1)
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling).transpose(1, 2)


def layer_module(layer_idx):
    module = torch.nn.Module()
    module.layer_idx = layer_idx
    return module


@pytest.mark.parametrize("hierarchical", [False, True])
def test_split_mask_attention_equals_the_per_head_mask(hierarchical):
    """GQA 9/3 heads, layouts with gists: every layer (layer 0 never selects), full forwards and
    forwards over context rows only (no tail row), single-level and H-GSA layouts."""
    Hq, Hkv, D = 9, 3, 16
    checked = {"tail": 0, "no tail": 0}
    for seed in range(12):
        rng = random.Random(seed)
        config = random_hierarchical_config(rng) if hierarchical else random_config(rng)
        config = GistConfig(**{**config.to_dict(), "chunk_size": max(config.chunk_size, 1)})  # gists, always
        layout = build_layout([random_segments(rng, max_len=30) for _ in range(3)], config, FakeTokenizer())
        B, T = layout.input_ids.shape
        context_rows = int((~layout.is_tail).sum(-1).min())  # columns before every row's tail
        g = torch.Generator().manual_seed(seed)
        key, value = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
        for q_index in (torch.arange(T), torch.arange(context_rows)):
            if len(q_index) == 0:
                continue
            query = torch.randn(B, Hq, len(q_index), D, generator=g)
            for layer_idx in range(3):
                state = GistState(layout, q_index, config)
                want_mask = per_head_mask(GistState(layout, q_index, config), layer_idx, query, key)
                assert torch.equal(state.mask_for_layer(layer_idx, query, key), want_mask)
                out, _ = gsa_attention(layer_module(layer_idx), query, key, value, None, 0.25, gsa_state=state)
                want = per_head_attention(want_mask, query, key, value, 0.25)
                assert out.is_contiguous() and out.shape == want.shape
                torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
                assert torch.equal(state.attended[layer_idx], want_mask[:, :, -1].sum(-1))
                checked["tail" if want_mask.shape[1] > 1 else "no tail"] += 1
    assert checked["tail"] and checked["no tail"]


@pytest.mark.parametrize("hierarchical", [False, True])
def test_folded_gqa_attention_equals_the_per_head_mask(hierarchical, monkeypatch):
    """The CUDA path for few rows (query heads folded onto their KV head, masks repeated instead of
    K/V) against attention under the per-head mask: GQA 9/3 and 8/2, with and without tail rows;
    the folded shared bias is built once per forward. SDPA's output comes back strided, as CUDA's
    memory-efficient kernel returns it ([B, H, rows, D] over [B, rows, H, D] memory)."""
    sdpa = F.scaled_dot_product_attention

    def strided_sdpa(*args, **kwargs):
        return sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", strided_sdpa)
    checked = 0
    for seed in range(8):
        rng = random.Random(seed)
        config = random_hierarchical_config(rng) if hierarchical else random_config(rng)
        config = GistConfig(**{**config.to_dict(), "chunk_size": max(config.chunk_size, 1)})
        layout = build_layout([random_segments(rng, max_len=30) for _ in range(2)], config, FakeTokenizer())
        B, T = layout.input_ids.shape
        Hq, Hkv, D = (9, 3, 16) if seed % 2 else (8, 2, 8)
        g = torch.Generator().manual_seed(seed)
        key, value = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
        for q_index in (torch.arange(T), torch.arange(T - 3, T)):
            query = torch.randn(B, Hq, len(q_index), D, generator=g)
            state = GistState(layout, q_index, config)
            biases = set()
            for layer_idx in range(3):
                mask = state.layer_mask(layer_idx, query, key)
                out = attention._sdpa_rows_folded(query, key, value, mask, 0.25, 0.0)
                want = per_head_attention(mask.full(), query, key, value, 0.25)
                torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
                biases |= {id(b) for k, b in mask.biases.items() if isinstance(k, tuple)}
                checked += 1
            assert len(biases) <= 2  # one for the layer that selects nothing, one for those that select
    assert checked == 48


@pytest.mark.parametrize("k_policy,streamed", [("fixed", False), ("adaptive", False), ("fixed", True)])
def test_tail_rows_choose_the_same_chunks_through_the_select_kernels(monkeypatch, k_policy, streamed):
    """A sequence's tail rows through gist_select.select_rows_triton (the CUDA path; without CUDA
    under Triton's interpreter) get the reference's masks in every layer: the same chunks per row and
    KV head, from the k of the config's policy. Integer queries and keys: exact scores, ties.
    `streamed`: the select kernel streams every row (as rows past TOPK_MAX_CHUNKS)."""
    pytest.importorskip("triton", reason="triton not installed: the select kernels need it")
    from gsa_rag.kernels import dispatch, gist_select

    if streamed:
        monkeypatch.setattr(gist_select, "TOPK_MAX_CHUNKS", 0)
        monkeypatch.setattr(gist_select, "STREAM_TILE", 64)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        dispatch._interpreter_compat()
    monkeypatch.setattr(attention, "_rows_kernel_fits", lambda query: True)
    calls = _count_select_kernel_calls(monkeypatch)
    config = GistConfig(chunk_size=4, sink=2, top_k=2, k_policy=k_policy, adaptive_ratio=2)
    for seed in range(3):
        rng = random.Random(seed)
        layout = build_layout([random_segments(rng, max_passages=6, max_len=40)], config, FakeTokenizer()).to(device)
        T = layout.seq_len
        g = torch.Generator().manual_seed(seed)
        Hq, Hkv, D = 8, 2, 16
        key = torch.randint(-2, 3, (1, Hkv, T, D), generator=g).float().to(device)
        for rows in (T, 6):  # a whole prompt, a question's last rows
            query = torch.randint(-2, 3, (1, Hq, rows, D), generator=g).float().to(device)
            masks = {}
            for kernel in (True, False):
                monkeypatch.setattr(attention, "SELECT_KERNEL", kernel)
                state = GistState(layout, torch.arange(T - rows, T, device=device), config)
                masks[kernel] = [state.layer_mask(layer, query, key).full() for layer in range(3)]
            for got, want in zip(masks[True], masks[False], strict=True):
                assert torch.equal(got, want), seed
    assert len(calls) == 3 * 2 * 2  # seeds x row counts x selecting layers


def _count_select_kernel_calls(monkeypatch) -> list:
    """Spies on gist_select.select_rows_triton: the rows of each call (so a test can tell the
    kernel path ran rather than a fallback to the reference)."""
    from gsa_rag.kernels import gist_select

    calls, real = [], gist_select.select_rows_triton

    def spy(query, *args, **kwargs):
        calls.append(query.shape[2])
        return real(query, *args, **kwargs)

    monkeypatch.setattr(gist_select, "select_rows_triton", spy)
    return calls


def test_rows_kernel_serves_only_forwards_that_need_no_gradient(monkeypatch):
    """The rows kernel has no backward: a training forward (grad on, q/k/v needing it) or one with
    dropout takes SDPA; an inference forward takes the kernel."""
    monkeypatch.setattr(attention, "_rows_kernel_fits", lambda query: True)
    q, k, v = (torch.randn(1, 4, 3, 16) for _ in range(3))
    assert attention._rows_kernel_serves(q, k, v, 0.0)
    assert not attention._rows_kernel_serves(q, k, v, 0.1)
    trained = torch.randn(1, 2, 3, 16, requires_grad=True)
    assert not attention._rows_kernel_serves(q, trained, v, 0.0)
    with torch.no_grad():
        assert attention._rows_kernel_serves(q, trained, v, 0.0)
    monkeypatch.setattr(attention, "ROWS_KERNEL", False)
    assert not attention._rows_kernel_serves(q, k, v, 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: gsa_attention folds few rows on CUDA only "
                    "(test_folded_gqa_attention_equals_the_per_head_mask covers the folded path on the CPU, "
                    "tests/test_kernels_rows.py the rows kernel under Triton's interpreter)")
@pytest.mark.parametrize("rows_kernel", [True, False], ids=["rows-kernel", "folded-sdpa"])
@pytest.mark.parametrize("select_kernel", [True, False], ids=["select-kernel", "select-torch"])
def test_gsa_attention_on_cuda_folds_few_rows_and_matches_the_per_head_mask(monkeypatch, rows_kernel, select_kernel):
    monkeypatch.setattr(attention, "ROWS_KERNEL", rows_kernel)
    calls, expected = _count_select_kernel_calls(monkeypatch), 0
    config = GistConfig(chunk_size=4, sink=2, top_k=1)
    rng = random.Random(5)
    segments = [random_segments(rng, max_passages=6, max_len=30) for _ in range(2)]
    g = torch.Generator().manual_seed(5)
    Hq, Hkv, D = 8, 2, 16
    for batch in (1, 2):  # one sequence: the select kernels may serve; two: the reference selects
        layout = build_layout(segments[:batch], config, FakeTokenizer()).to("cuda")
        B, T = layout.input_ids.shape
        key, value = (torch.randn(B, Hkv, T, D, generator=g).cuda() for _ in range(2))
        for rows in (T, 5, 1):  # a whole forward (folded when T <= FOLD_MAX_ROWS), a question, a decode step
            query = torch.randn(B, Hq, rows, D, generator=g).cuda()
            q_index = torch.arange(T - rows, T, device="cuda")
            state, reference = GistState(layout, q_index, config), GistState(layout, q_index, config)
            for layer_idx in range(3):
                monkeypatch.setattr(attention, "SELECT_KERNEL", select_kernel)
                out, _ = gsa_attention(layer_module(layer_idx), query, key, value, None, 0.25, gsa_state=state)
                monkeypatch.setattr(attention, "SELECT_KERNEL", False)
                want = per_head_attention(reference.mask_for_layer(layer_idx, query, key), query, key, value, 0.25)
                torch.testing.assert_close(out, want, atol=2e-3, rtol=2e-3)
                # the kernels select for one sequence's tail rows in a selecting layer (a decode
                # step's one row is the decode path's)
                expected += (select_kernel and batch == 1 and rows > 1 and layer_idx >= config.first_selecting_layer
                             and state.tail_rows() is not None)
    several = [r for r in calls if r > 1]
    assert len(several) == expected and (expected > 0) == select_kernel


def test_hooks_get_the_full_mask_unless_they_do_not_read_it():
    config = GistConfig(chunk_size=4, sink=2, top_k=1)
    state, q, k = state_and_qk(3, config, Hq=9, Hkv=3)
    seen = []

    def hook(layer_idx, query, key, value, mask):
        seen.append(mask)

    state.hook = hook
    gsa_attention(layer_module(1), q, k, k, None, 0.25, gsa_state=state)
    assert torch.equal(seen[-1], per_head_mask(state, 1, q, k))
    hook.reads_mask = False
    gsa_attention(layer_module(1), q, k, k, None, 0.25, gsa_state=state)
    assert seen[-1] is None


def test_no_per_head_mask_reaches_sdpa_when_the_tail_is_short(monkeypatch):
    """A long prompt with a short tail: SDPA gets the shared mask once for all heads
    ([B, 1, rows, T]) and per-head masks only for the tail rows; nothing [B, H, Tq, T]-sized."""
    config = GistConfig(chunk_size=4, sink=2, top_k=1)
    rng = random.Random(0)
    segments = [random_segments(rng, max_passages=8, max_len=30) for _ in range(2)]
    layout = build_layout(segments, config, FakeTokenizer())
    B, T = layout.input_ids.shape
    tail_rows = T - int((~layout.is_tail).sum(-1).min())
    assert tail_rows < T // 4  # the case that matters: the tail is a small part of the prompt
    Hq, Hkv = 9, 3
    q, k = torch.randn(B, Hq, T, 8), torch.randn(B, Hkv, T, 8)
    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(tuple(attn_mask.shape))
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    state = GistState.for_new_tokens(layout, T, config)
    for layer_idx in range(3):
        gsa_attention(layer_module(layer_idx), q, k, k, None, 0.25, gsa_state=state)
    assert masks[0] == (B, 1, T, T)  # layer 0 selects nothing: one call, one mask for every head
    assert masks[1:] == [(B, 1, T - tail_rows, T), (B, Hq, tail_rows, T)] * 2
    shared = {state.layer_mask(layer, q, k).shared_bias(q.dtype).data_ptr() for layer in range(3)}
    assert len(shared) == 1  # one float bias per forward, whatever the layer


# --- no device syncs per layer: what every layer branches on is read once per forward -------------

# Tensor methods that hand a value to Python: on an accelerator each one waits for the device.
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")


def _tiny_gsa_model(num_layers):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="gsa").eval()


def _forward_counting(monkeypatch, model, layout, config, explicit_q_index):
    """One prefill of the whole layout: (host reads of tensor values, _find_tail_rows calls)."""
    counts = {"reads": 0, "plans": 0}
    state = (GistState(layout, torch.arange(layout.seq_len), config) if explicit_q_index
             else GistState.for_new_tokens(layout, layout.seq_len, config))
    find = GistState._find_tail_rows

    def counted_find(self):
        counts["plans"] += 1
        return find(self)

    with monkeypatch.context() as patch:
        patch.setattr(GistState, "_find_tail_rows", counted_find)
        for name in _HOST_READS:
            method = getattr(torch.Tensor, name)

            def counted(self, *args, _method=method, **kwargs):
                counts["reads"] += 1
                return _method(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        with torch.no_grad():
            model(input_ids=layout.input_ids, position_ids=layout.position_ids, gsa_state=state, use_cache=False)
    return counts


@pytest.mark.parametrize("explicit_q_index", [False, True], ids=["for_new_tokens", "q_index"])
@pytest.mark.parametrize("meta", [(), (2,)], ids=["gsa", "h-gsa"])
def test_host_reads_per_forward_do_not_grow_with_layers(monkeypatch, explicit_q_index, meta):
    """The reference path reads no tensor value per layer (on a GPU each read is a device sync
    that stalls the launch queue): the tail rows are found once per forward, and a forward of a
    6-layer model reads exactly as many values back as one of a 2-layer model."""
    monkeypatch.setenv("GSA_RAG_KERNELS", "0")
    config = GistConfig(chunk_size=4, sink=2, top_k=1, meta_chunks=meta)
    layout = build_layout([random_segments(random.Random(seed), max_len=30) for seed in range(2)],
                          config, FakeTokenizer())
    assert layout.is_tail.any() and int(layout.num_chunks.max()) > 0  # rows that select, in layers >= 1
    counts = {n: _forward_counting(monkeypatch, _tiny_gsa_model(n), layout, config, explicit_q_index) for n in (2, 6)}
    assert counts[2]["plans"] == counts[6]["plans"] == 1
    assert counts[2]["reads"] == counts[6]["reads"]


def test_layout_host_facts_travel_with_to_and_append():
    """Read on the host at build time, carried by `to` and `append`: equal to reading them again."""
    config = GistConfig(chunk_size=4, sink=2)
    for seed in range(6):
        rng = random.Random(seed)
        segments = [random_segments(rng, max_len=30) for _ in range(3)]
        if seed % 2:  # sequences with no tail yet: the tail starts where appended tokens go
            segments = [[s for s in segs if s.compress] or segs for segs in segments]
        layout = build_layout(segments, config, FakeTokenizer())
        grown = layout.append(torch.ones(3, 2, dtype=torch.long))
        for carried in (layout.to("cpu"), grown, grown.append(torch.ones(3, 1, dtype=torch.long))):
            fresh = GistLayout(**{f.name: getattr(carried, f.name).clone() for f in fields(carried)})
            assert carried.host_facts() == fresh.host_facts()
            tail = fresh.is_tail
            first = min((int(row.nonzero()[0]) for row in tail if row.any()), default=fresh.seq_len)
            assert fresh.host_facts() == HostFacts(int(fresh.num_chunks.max()), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA syncs can only be observed on a CUDA device")
def test_cuda_syncs_per_forward_do_not_grow_with_layers(monkeypatch):
    """torch's sync debug mode warns at each device sync: as many for 6 layers as for 2."""
    import warnings

    monkeypatch.setenv("GSA_RAG_KERNELS", "0")
    config = GistConfig(chunk_size=4, sink=2, top_k=1)
    layout = build_layout([random_segments(random.Random(seed), max_len=30) for seed in range(2)],
                          config, FakeTokenizer(), device="cuda")
    syncs = {}
    for n in (2, 6):
        model = _tiny_gsa_model(n).cuda()
        state = GistState.for_new_tokens(layout, layout.seq_len, config)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(input_ids=layout.input_ids, position_ids=layout.position_ids, gsa_state=state, use_cache=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # the mode's own notice ("... is a prototype feature ...") comes once per process, not per sync
        syncs[n] = [str(w.message) for w in caught if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
    assert len(syncs[2]) == len(syncs[6]), syncs[6]
