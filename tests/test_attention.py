"""The gsa attention function's masks, layer by layer, on random queries and keys."""

import random

import torch
from fakes import FakeTokenizer, random_segments

from gsa_rag.attention import GistState
from gsa_rag.config import GistConfig
from gsa_rag.layout import build_layout
from gsa_rag.masks import dense_gist_mask


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
