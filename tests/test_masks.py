import random

import pytest
import torch
import torch.nn.functional as F
from fakes import FakeTokenizer, random_config, random_segments
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_rag.layout import build_layout
from gsa_rag.masks import dense_gist_mask, dense_index, dense_unfold_mask, gist_block_mask, recall_gate, visible

seeds = st.integers(0, 2**32 - 1)


def random_batch(rng):
    config = random_config(rng)
    layout = build_layout([random_segments(rng) for _ in range(rng.randrange(1, 4))], config, FakeTokenizer())
    return config, layout


def brute_force_visible(layout, b, q, kv, num_prev, recall) -> bool:
    """The rule, one pair at a time, in plain Python (over `_plain(layout)`: lists, not tensors,
    so a check of every pair stays fast)."""
    if q == kv:
        return True
    if kv > q or not layout["valid"][b][kv]:
        return False
    if layout["is_sink"][b][kv] or recall:
        return True
    cq, ck = layout["chunk_id"][b][q], layout["chunk_id"][b][kv]
    return ck in range(cq - num_prev, cq + 1)


def _plain(layout) -> dict:
    names = ("valid", "is_sink", "is_gist", "chunk_id")
    return {name: getattr(layout, name).tolist() for name in names} | {"num_chunks": layout.num_chunks.tolist()}


@settings(max_examples=150, deadline=None)
@given(seeds)
def test_dense_gist_mask_equals_brute_force(seed):
    rng = random.Random(seed)
    config, layout = random_batch(rng)
    mask = dense_gist_mask(layout, config.num_previous_chunks).tolist()
    plain = _plain(layout)
    B, T = layout.input_ids.shape
    for b in range(B):
        for q in range(T):
            for kv in range(T):
                want = brute_force_visible(plain, b, q, kv, config.num_previous_chunks, plain["is_gist"][b][kv])
                assert mask[b][q][kv] == want, (b, q, kv)


@settings(max_examples=100, deadline=None)
@given(seeds)
def test_recall_gate_splits_the_rule(seed):
    """visible(recall) == visible(no recall) | (recall_gate & recall) for any recall, with KV-reuse
    passages (doc_id) and link tokens drawn at random: what lets a forward build the
    recall-free part once and each layer add only its own recall (attention.TailRows)."""
    from dataclasses import replace

    rng = random.Random(seed)
    config, layout = random_batch(rng)
    g = torch.Generator().manual_seed(seed % 2**31)
    B, T = layout.input_ids.shape
    layout = replace(layout, doc_id=torch.randint(-1, 3, (B, T), generator=g),
                     is_link=torch.rand(B, T, generator=g) < 0.2)
    b, q, kv = dense_index(layout, None)
    recall = torch.rand(B, T, T, generator=g) < 0.3
    P = config.num_previous_chunks
    whole = visible(layout, b, q, kv, P, recall)
    assert torch.equal(whole, visible(layout, b, q, kv, P, False) | (recall_gate(layout, b, q, kv) & recall))


@settings(max_examples=100, deadline=None)
@given(seeds)
def test_dense_unfold_mask_equals_brute_force(seed):
    rng = random.Random(seed)
    config, layout = random_batch(rng)
    B, T = layout.input_ids.shape
    C, H = layout.gist_index.shape[1], 2
    q_index = torch.arange(rng.randrange(T), T)
    selected = torch.rand(B, H, len(q_index), C, generator=torch.Generator().manual_seed(seed % 2**31)) < 0.4
    mask = dense_unfold_mask(layout, selected, config.num_previous_chunks, q_index)
    assert mask.shape == (B, H, len(q_index), T)
    mask, selected, plain = mask.tolist(), selected.tolist(), _plain(layout)
    for b in range(B):
        for h in range(H):
            for r, q in enumerate(q_index.tolist()):
                for kv in range(T):
                    c = plain["chunk_id"][b][kv]
                    recall = 0 <= c < plain["num_chunks"][b] and selected[b][h][r][c]
                    want = brute_force_visible(plain, b, q, kv, config.num_previous_chunks, recall)
                    assert mask[b][h][r][kv] == want, (b, h, q, kv)


def test_unfold_with_every_chunk_selected_sees_all_closed_chunks():
    rng = random.Random(3)
    config, layout = random_batch(rng)
    q_index = torch.tensor([layout.seq_len - 1])
    everything = torch.ones(layout.batch_size, 1, 1, layout.gist_index.shape[1], dtype=torch.bool)
    mask = dense_unfold_mask(layout, everything, config.num_previous_chunks, q_index)
    assert torch.equal(mask[:, 0, 0], layout.valid)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_size", [16, 128])
def test_block_mask_matches_dense_mask(seed, block_size):
    """flex_attention under the BlockMask == SDPA under the dense mask (eager FlexAttention on CPU)."""
    rng = random.Random(seed)
    config, layout = random_batch(rng)
    B, T = layout.input_ids.shape
    q_offset = rng.randrange(T)
    block_mask = gist_block_mask(layout, config.num_previous_chunks, q_offset=q_offset, block_size=block_size)
    dense = dense_gist_mask(layout, config.num_previous_chunks, torch.arange(q_offset, T))

    # block-level: a block is kept iff some pair in it is visible
    blocks = block_mask.to_dense()[:, 0].bool()
    nq, nk = blocks.shape[-2:]
    padded = F.pad(dense, (0, nk * block_size - T, 0, nq * block_size - (T - q_offset)))
    any_visible = padded.view(B, nq, block_size, nk, block_size).any(4).any(2)
    assert torch.equal(blocks, any_visible)

    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 2, T - q_offset, 8, generator=g)
    k, v = torch.randn(B, 2, T, 8, generator=g), torch.randn(B, 2, T, 8, generator=g)
    got = flex_attention(q, k, v, block_mask=block_mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled FlexAttention")
def test_compiled_flex_attention_under_block_mask_matches_dense_on_cuda():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)
    for seed in range(3):
        rng = random.Random(seed)
        config = random_config(rng)
        segments = [random_segments(rng, max_len=200) for _ in range(2)]
        layout = build_layout(segments, config, FakeTokenizer(), device="cuda")
        B, T = layout.input_ids.shape
        block_mask = gist_block_mask(layout, config.num_previous_chunks)
        dense = dense_gist_mask(layout, config.num_previous_chunks)
        g = torch.Generator(device="cuda").manual_seed(seed)
        q, k, v = (torch.randn(B, 4, T, 64, device="cuda", generator=g) for _ in range(3))
        got = compiled(q, k, v, block_mask=block_mask)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=dense[:, None])
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-3
