"""Int8 gist keys (GistConfig(score_dtype="int8"), gsa_rag.kernels.gist_keys8): the quantization,
the scores kernel over the int8 copy against its reference, and every path that selects with it
(decode key lists, a question's rows, the engine's decode) against the reference selection.

Without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton not installed")

from gsa_rag.kernels.gist_keys8 import (
    Int8GistKeys,
    gist_keys_of_layer,
    quantize_gist_keys,
    scaled_query,
)
from gsa_rag.kernels.gist_select import (
    DecodePlan,
    _scores_launch,
    select_index_list,
    select_rows_triton,
)
from test_kernels import (
    DEVICE,
    as_sets,
    assert_key_lists_are_the_engine_mask,
    random_layout,
    rel_err,
)

from gsa_rag.config import GistConfig
from gsa_rag.errors import ConfigError
from gsa_rag.selection import ChunkSelector, gist_scores, int8_gist_scores


def random_keys(B, Hkv, T, D, C, g, outlier=True):
    """Keys with a few loud channels, as RoPE'd keys have; gist columns sorted, every second batch
    row with fewer chunks."""
    key = torch.randn(B, Hkv, T, D, generator=g)
    if outlier:
        key[..., :2] *= 20
    gist_index = torch.stack([torch.sort(torch.randperm(T, generator=g)[:C]).values for _ in range(B)])
    num_chunks = torch.tensor([C if b % 2 == 0 else C // 2 for b in range(B)])
    gist_valid = torch.arange(C)[None] < num_chunks[:, None]
    return key, gist_index, num_chunks, gist_valid


def test_quantized_keys_are_within_half_a_step_of_the_keys():
    g = torch.Generator().manual_seed(0)
    key, gist_index, _, gist_valid = random_keys(2, 3, 50, 16, 20, g)
    key[1, 2, :, 5] = 0  # a channel that is zero everywhere keeps scale 1
    q8 = quantize_gist_keys(key, gist_index, gist_valid)
    assert q8.values.dtype == torch.int8 and q8.values.shape == (2, 3, 20, 16)
    assert q8.scale.dtype == torch.float32 and q8.scale.shape == (2, 3, 16)
    assert int(q8.values.abs().max()) == 127  # every channel's largest key maps to +-127
    gists = torch.gather(key, 2, gist_index[:, None, :, None].expand(2, 3, 20, 16))
    error = (q8.values.float() * q8.scale[:, :, None] - gists).abs()
    assert bool((error[gist_valid[:, None, :, None].expand_as(error)] <= q8.scale[:, :, None].expand_as(error)[
        gist_valid[:, None, :, None].expand_as(error)] / 2 * (1 + 1e-6)).all())
    assert not q8.values[1, :, 10:].any(), "chunks that do not exist must be zeros"
    assert float(q8.scale[1, 2, 5]) == 1.0
    poisoned = key.clone()
    poisoned[1, :, gist_index[1, 10:]] = float("nan")  # what padding chunks' columns hold is never read
    again = quantize_gist_keys(poisoned, gist_index, gist_valid)
    assert torch.equal(again.values, q8.values) and torch.equal(again.scale, q8.scale)
    empty = quantize_gist_keys(key, gist_index[:, :0], gist_valid[:, :0])
    assert empty.values.shape == (2, 3, 0, 16) and bool((empty.scale == 1).all())


def test_int8_scores_are_within_the_rounding_bound_of_the_exact_scores():
    """|q . k - q . (scale * values)| <= sum_d |q_d| scale_d / 2 (fp32 queries: no query rounding)."""
    g = torch.Generator().manual_seed(1)
    key, gist_index, _, gist_valid = random_keys(2, 2, 60, 32, 25, g)
    query = torch.randn(2, 8, 3, 32, generator=g)
    q8 = quantize_gist_keys(key, gist_index, gist_valid)
    exact = gist_scores(query, key, gist_index, gist_valid)
    approx = int8_gist_scores(query, q8, gist_valid)
    bound = (query.abs().view(2, 2, 4, 3, 32) * q8.scale[:, :, None, None]).sum(-1).view(2, 8, 3, 1) / 2
    finite = torch.isfinite(exact)
    assert torch.equal(finite, torch.isfinite(approx))
    gap = (approx - exact).abs()
    assert bool((gap[finite] <= (bound.expand_as(gap)[finite] * (1 + 1e-4) + 1e-4)).all())
    assert float(gap[finite].max()) > 0  # it is an approximation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 4, 2, 16, 40, 9), (1, 9, 3, 64, 300, 130), (2, 8, 8, 128, 30, 5),
                                   (2, 32, 8, 128, 400, 150)])
def test_scores_kernel_over_int8_keys_equals_the_reference(dtype, shape):
    B, Hq, Hkv, D, T, C = shape
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    key, gist_index, num_chunks, gist_valid = random_keys(B, Hkv, T, D, C, g)
    key = key.to(dtype)
    query = torch.randn(B, Hq, D, generator=g).to(dtype)
    q8 = quantize_gist_keys(key.to(DEVICE), gist_index.to(DEVICE), gist_valid.to(DEVICE))
    ref = int8_gist_scores(query[:, :, None].to(DEVICE), q8, gist_valid.to(DEVICE))[:, :, 0]
    out = torch.full((B, Hq, C), float("nan"), device=DEVICE)
    poison = torch.full_like(key, float("nan")).to(DEVICE)  # the cache must not be read
    _scores_launch(query.to(DEVICE), poison, gist_index.to(DEVICE), num_chunks.to(DEVICE), keys8=q8, out=out)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert rel_err(out[finite], ref[finite]) < 1e-5  # the same products, summed in another order


def test_query_scaling_rounds_to_the_query_dtype():
    g = torch.Generator().manual_seed(2)
    key, gist_index, _, gist_valid = random_keys(1, 2, 30, 16, 10, g)
    q8 = quantize_gist_keys(key, gist_index, gist_valid)
    query = torch.randn(1, 4, 2, 16, generator=g).bfloat16()
    scaled = scaled_query(query, q8)
    assert scaled.dtype == torch.bfloat16
    want = (query.float() * q8.scale.repeat_interleave(2, 1)[:, :, None]).bfloat16()
    assert torch.equal(scaled, want)


# gist keys of 4 chunks in channels 0 and 1 (the rest 0), scored by a query of ones there: chunk 2's
# loud channel 0 makes that channel's int8 step 1, so chunks 0 and 1 both round to 0 in it, and
# channel 1 (step 0.02 / 127) decides between them: exact scores 0.32 < 0.45, int8 ones 0.02 > 0
NEAR_TIE_KEYS = ((0.30, 0.02), (0.45, 0.0), (127.0, 0.0), (-5.0, 0.0))


def near_tie_inputs(Hq=2, Hkv=1, D=16):
    """The exact scores pick chunks 1 and 2, the int8 copy's chunks 0 and 2 (NEAR_TIE_KEYS)."""
    C, T = 4, 12
    key = torch.zeros(1, Hkv, T, D)
    gist_index = torch.tensor([[2, 5, 8, 11]])
    for col, values in zip(gist_index[0].tolist(), NEAR_TIE_KEYS):
        key[0, :, col, :2] = torch.tensor(values)
    query = torch.zeros(1, Hq, D)
    query[..., :2] = 1.0
    return query, key, gist_index, torch.ones(1, C, dtype=torch.bool)


def test_near_ties_pick_differently_from_the_cache_keys_in_the_kernel_and_the_reference():
    query, key, gist_index, gist_valid = near_tie_inputs()
    config = GistConfig(chunk_size=2, top_k=2)
    context_len = torch.tensor([12])
    exact = ChunkSelector(gist_index, gist_valid, context_len, config)(query[:, :, None], key)
    int8 = ChunkSelector(gist_index, gist_valid, context_len, dataclasses.replace(config, score_dtype="int8"))(
        query[:, :, None], key)
    assert exact[0, 0, 0].tolist() == [False, True, True, False]
    assert int8[0, 0, 0].tolist() == [True, False, True, False]
    q8 = quantize_gist_keys(key.to(DEVICE), gist_index.to(DEVICE), gist_valid.to(DEVICE))
    k = torch.tensor([2], device=DEVICE)
    rows = select_rows_triton(query[:, :, None].to(DEVICE), key.to(DEVICE), gist_index.to(DEVICE),
                              gist_valid.sum(-1).to(DEVICE), k, keys8=q8)
    assert rows[0, 0, 0].tolist() == [True, False, True, False]


@pytest.mark.parametrize("kv_reuse", [False, True])
def test_int8_key_lists_are_the_engine_mask(kv_reuse):
    """Decode key lists (the kernels and their reference) equal the engine's dense mask when every
    path scores the int8 copy; layer 0 does not select, layer 1 does."""
    for seed in range(6):
        layout, config = random_layout(seed, kv_reuse=kv_reuse)
        assert_key_lists_are_the_engine_mask(layout, dataclasses.replace(config, score_dtype="int8"), seed)


def test_decode_lists_follow_the_int8_picks_on_near_ties():
    """The decode path's lists use the int8 copy (kernel and reference): on near-tie keys their
    chunks are the int8 picks, not the cache's."""
    from fakes import FakeTokenizer
    from gsa_rag.kernels.gist_select import (
        build_index_list_ref,
        choose_union,
        gist_scores_ref,
    )

    from gsa_rag.layout import Segment, build_layout

    query = near_tie_inputs(Hq=2, Hkv=1)[0]
    # 4 chunks of 2 tokens whose gist keys are NEAR_TIE_KEYS
    config = GistConfig(chunk_size=2, sink=0, num_previous_chunks=0, word_aware=False, top_k=2)
    layout = build_layout([[Segment((11, 12, 13, 14, 15, 16, 17, 18), True), Segment((19, 20), False)]],
                          config, FakeTokenizer()).append(torch.tensor([[21]])).to(DEVICE)
    T = layout.seq_len
    gist_cols = layout.gist_index[0].tolist()
    key = torch.zeros(1, 1, T, 16)
    for col, values in zip(gist_cols, NEAR_TIE_KEYS):
        key[0, 0, col, :2] = torch.tensor(values)
    key = key.to(DEVICE)
    query = query.to(DEVICE)
    plan = DecodePlan.build(layout, config, 2)
    exact_sel = choose_union(gist_scores_ref(query, key, layout.gist_index, layout.gist_valid), plan, 1, config, 16)
    exact = as_sets(*build_index_list_ref(plan, exact_sel, T), 1, 1)
    int8_config = dataclasses.replace(config, score_dtype="int8")
    for use_triton in (False, True):
        got = as_sets(*select_index_list(query, key, layout, plan, int8_config, 1, use_triton), 1, 1)
        assert got != exact, use_triton
        assert gist_cols[0] in got[0][0] and gist_cols[1] not in got[0][0], use_triton


def test_the_int8_copy_is_made_once_per_layer_and_buffer():
    layout, _ = random_layout(3)
    B = layout.batch_size
    layout = layout.append(torch.ones(B, 1, dtype=torch.long, device=DEVICE))  # layouts grown by append share a lineage
    T = layout.seq_len
    key = torch.randn(B, 2, T + 8, 16).to(DEVICE)
    view = key[:, :, :T]
    first = gist_keys_of_layer(layout, 1, view)
    grown = layout.append(torch.ones(B, 1, dtype=torch.long, device=DEVICE))
    assert gist_keys_of_layer(grown, 1, key[:, :, : T + 1]) is first  # the same buffer, one more column
    assert gist_keys_of_layer(grown, 2, view) is not first  # another layer
    moved = key.clone()
    again = gist_keys_of_layer(grown, 1, moved[:, :, : T + 1])  # a reallocated cache
    assert again is not first
    assert torch.equal(again.values, first.values) and torch.equal(again.scale, first.scale)
    # fresh tensors, each freed before the next (which may land at its address): never a stale copy
    for _ in range(5):
        fresh = torch.randn(B, 2, T + 1, 16).to(DEVICE)
        got = gist_keys_of_layer(grown, 3, fresh)
        want = quantize_gist_keys(fresh, grown.gist_index, grown.gist_valid)
        assert torch.equal(got.values, want.values) and torch.equal(got.scale, want.scale)
        del fresh, got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("integer", [True, False])
def test_question_rows_kernel_over_int8_keys_picks_the_reference_sets(dtype, integer):
    """select_rows_triton over the int8 copy against ChunkSelector with score_dtype int8; integer
    keys with every channel's largest |k| the same give exact, tied scores in both."""
    Hq, Hkv, R, C, D = 8, 2, 5, 40, 16
    T = 3 * C
    g = torch.Generator().manual_seed(7 + integer)
    if integer:
        q = torch.randint(-2, 3, (1, Hq, R, D), generator=g).float()
        key = torch.randint(-2, 3, (1, Hkv, T, D), generator=g).float()
        key[..., 0, :] = 2.0  # column 0 holds a gist: every channel's amax is 2
    else:
        q, key = torch.randn(1, Hq, R, D, generator=g), torch.randn(1, Hkv, T, D, generator=g)
    gist_index = torch.cat([torch.zeros(1, dtype=torch.long),
                            torch.sort(torch.randperm(T - 1, generator=g)[: C - 1] + 1).values])[None]
    gist_valid = torch.ones(1, C, dtype=torch.bool)
    config = GistConfig(chunk_size=4, top_k=3, score_dtype="int8")
    q, key, gist_index, gist_valid = (x.to(DEVICE) for x in (q.to(dtype), key.to(dtype), gist_index, gist_valid))
    selector = ChunkSelector(gist_index, gist_valid, torch.tensor([T], device=DEVICE), config)
    want = selector(q, key)
    keys8 = quantize_gist_keys(key, gist_index, gist_valid)
    k = selector.chunks_per_head(Hq // Hkv).expand(R).contiguous()
    got = select_rows_triton(q, key, gist_index, gist_valid.sum(-1), k, keys8=keys8)
    assert torch.equal(got.cpu(), want.cpu()), (got != want).sum().item()


def test_engine_decode_with_int8_scores_kernels_equal_the_reference(monkeypatch):
    """A tiny random model decodes over a DecodeCache with GSA_RAG_KERNELS=1 and =0 and
    score_dtype int8: the same logits, and the kernel path made each selecting layer's copy once."""
    import random

    from fakes import FakeTokenizer, random_segments
    from transformers import AutoModelForCausalLM, LlamaConfig

    import gsa_rag.attention  # noqa: F401  (registers "gsa")
    from gsa_rag.decode_cache import DecodeCache
    from gsa_rag.generation import forward
    from gsa_rag.layout import build_layout

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2), attn_implementation="gsa").eval().to(DEVICE)
    config = GistConfig(chunk_size=4, sink=2, top_k=2, score_dtype="int8")
    rng = random.Random(5)
    layout = build_layout([random_segments(rng, max_passages=4, max_len=40) for _ in range(2)],
                          config, FakeTokenizer()).to(DEVICE)
    tokens = torch.randint(1, 990, (3, 2, 1), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    logits = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("GSA_RAG_KERNELS", mode)
        cache, lay, steps, copies = DecodeCache(), layout, [], []
        with torch.no_grad():
            forward(model, lay, lay.seq_len, cache, config)
            for token in tokens:
                lay = lay.append(token)
                out, state = forward(model, lay, 1, cache, config)
                steps.append(out.logits[:, -1])
                copies.append([lay.__dict__["_lineage"].get(("gist_keys8", layer)) for layer in (1, 2)])
        logits[mode] = torch.stack(steps)
        if mode == "1":
            assert state._decode_plan, "the kernel path did not run"
            for layer in (0, 1):  # layers 1 and 2 select: one copy each, made at the first step
                assert copies[0][layer] is not None
                assert all(step[layer][2] is copies[0][layer][2] for step in copies)
            assert copies[0][0][2] is not copies[0][1][2]
    torch.testing.assert_close(logits["1"], logits["0"], atol=1e-4, rtol=1e-4)


def test_score_dtype_is_checked_and_saved_only_when_set():
    assert "score_dtype" not in GistConfig().to_dict()  # older gsa-rag versions still read the file
    config = GistConfig(score_dtype="int8")
    assert GistConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="score_dtype must be"):
        GistConfig(score_dtype="fp8")
    with pytest.raises(ConfigError, match="single-level only"):
        GistConfig(meta_chunks=(4,), score_dtype="int8")


def test_int8_keys_that_do_not_fit_the_launch_are_refused():
    g = torch.Generator().manual_seed(5)
    key, gist_index, num_chunks, gist_valid = random_keys(2, 2, 30, 16, 8, g)
    q8 = quantize_gist_keys(key, gist_index, gist_valid)
    query = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="do not fit"):  # one row short
        _scores_launch(query, key, gist_index, num_chunks, keys8=Int8GistKeys(q8.values[:1], q8.scale[:1]))
    with pytest.raises(ValueError, match="do not fit"):  # H-GSA's per-head candidate lists
        per_head = gist_index[:, None].expand(2, 2, 8)
        _scores_launch(query, key, per_head, num_chunks[:, None].expand(2, 2), keys8=q8)


def test_int8_keys_must_have_contiguous_scales():
    g = torch.Generator().manual_seed(4)
    key, gist_index, num_chunks, gist_valid = random_keys(1, 2, 30, 16, 8, g)
    q8 = quantize_gist_keys(key, gist_index, gist_valid)
    bad = Int8GistKeys(q8.values, q8.scale.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="contiguous"):
        _scores_launch(torch.randn(1, 4, 16), key, gist_index, num_chunks, keys8=bad)


def test_question_rows_of_a_forward_select_with_int8_keys_through_the_kernel(monkeypatch):
    """A forward's tail rows (gsa_rag.attention's select kernel path, `_kernel_union`) choose the
    same chunks as the reference ChunkSelector when both score the int8 copy."""
    import random

    from fakes import FakeTokenizer, random_segments

    from gsa_rag import attention
    from gsa_rag.attention import GistState
    from gsa_rag.layout import build_layout

    monkeypatch.setattr(attention, "_rows_kernel_fits", lambda query: True)
    config = GistConfig(chunk_size=4, sink=2, top_k=2, score_dtype="int8")
    for seed in range(3):
        layout = build_layout([random_segments(random.Random(seed), max_passages=6, max_len=40)], config,
                              FakeTokenizer()).to(DEVICE)
        T = layout.seq_len
        g = torch.Generator().manual_seed(seed)
        key, _, _, _ = random_keys(1, 2, T, 16, 1, g)
        query = torch.randn(1, 8, 6, 16, generator=g)
        query, key = query.to(DEVICE), key.to(DEVICE)
        masks = {}
        for kernel in (True, False):
            monkeypatch.setattr(attention, "SELECT_KERNEL", kernel)
            state = GistState(layout, torch.arange(T - 6, T, device=DEVICE), config)
            masks[kernel] = [state.layer_mask(layer, query, key).full() for layer in range(3)]
        for got, want in zip(masks[True], masks[False], strict=True):
            assert torch.equal(got, want), seed


@pytest.mark.parametrize(("int8", "persistent"), [(False, False), (False, True), (True, False), (True, True)])
def test_scores_programs_that_loop_over_blocks_equal_the_reference(int8, persistent, monkeypatch):
    """Programs that score several blocks of chunks in turn (SCORE_STEPS / INT8_STEPS, or one wave
    of programs, SCORE_PERSISTENT / INT8_PERSISTENT), the last block short, write every score once,
    count every gist key read once and zero the select kernel's counters. The persistent stretches
    here cross from one (batch, KV head) row into the next (int8: 4 blocks of 32 chunks a program
    on rows of 10 and 13; the cache: 2 blocks of 128 on rows of 3) or span three rows of one
    block each. The grid is sized for 4 SMs on any device, so a GPU runs the
    same stretches as the interpreter."""
    from gsa_rag.kernels import gist_select

    monkeypatch.setattr(gist_select, "num_sms", lambda device: 4)
    monkeypatch.setattr(gist_select, "SCORE_STEPS", 3)
    monkeypatch.setattr(gist_select, "INT8_STEPS", 3)
    monkeypatch.setattr(gist_select, "INT8_BLOCK_C", 32)
    monkeypatch.setattr(gist_select, "STEPS_MIN_PROGRAMS_PER_SM", 0)  # small grids loop too
    monkeypatch.setattr(gist_select, "INT8_PERSISTENT", persistent)
    monkeypatch.setattr(gist_select, "SCORE_PERSISTENT", persistent)
    cases = (  # B, Hq, Hkv, D, T, C; programs an SM (int8, cache)
        (2, 4, 2, 16, 700, 300, 3, 2),  # 10 / 3 blocks a row: int8 PER 4, cache PER 2
        (1, 9, 3, 64, 900, 410, 3, 2),  # 13 / 4 blocks a row: PER 4 and 2
        (6, 4, 2, 16, 60, 20, 1, 1),  # 1 block a row: int8 PER 3, cache PER 3
    )
    for B, Hq, Hkv, D, T, C, int8_per_sm, cache_per_sm in cases:
        monkeypatch.setattr(gist_select, "INT8_PROGRAMS_PER_SM", int8_per_sm)
        monkeypatch.setattr(gist_select, "SCORE_PROGRAMS_PER_SM", cache_per_sm)
        g = torch.Generator().manual_seed(C)
        key, gist_index, num_chunks, gist_valid = random_keys(B, Hkv, T, D, C, g)
        query = torch.randn(B, Hq, D, generator=g)
        key, gist_index, num_chunks, gist_valid, query = (x.to(DEVICE) for x in (key, gist_index, num_chunks,
                                                                                 gist_valid, query))
        keys8 = quantize_gist_keys(key, gist_index, gist_valid) if int8 else None
        if int8:
            ref = int8_gist_scores(query[:, :, None], keys8, gist_valid)[:, :, 0]
        else:
            ref = gist_scores(query[:, :, None], key, gist_index, gist_valid)[:, :, 0]
        scored = torch.zeros(B * Hkv, dtype=torch.int32, device=DEVICE)
        sizes = torch.full((B, Hkv, C), -1, dtype=torch.int32, device=DEVICE)
        counters = torch.full((B * Hkv,), -1, dtype=torch.int32, device=DEVICE)
        out = torch.full((B, Hq, C), float("nan"), device=DEVICE)
        _scores_launch(query, key, gist_index, num_chunks, sizes=sizes, counters=counters, scored=scored,
                       keys8=keys8, out=out)
        assert not counters.any(), "every (batch, KV head)'s counter is zeroed"
        assert torch.equal(torch.isinf(out), torch.isinf(ref))
        finite = torch.isfinite(ref)
        assert rel_err(out[finite], ref[finite]) < 1e-5
        assert torch.equal(scored.view(B, Hkv).cpu(), num_chunks[:, None].expand(B, Hkv).int().cpu())
        assert not sizes.any(), "every block's sizes are zeroed"


@pytest.mark.parametrize("persistent", [False, True])
def test_fused_select_over_int8_keys_with_programs_that_loop_is_the_engine_mask(persistent, monkeypatch):
    """The decode path (scores kernel zeroing the select kernel's counters, then the select and
    union kernels) with scores programs that take several blocks each, on rows of ~150 chunks:
    3 blocks a program, or one wave of stretches that cross rows (the grid sized for 4 SMs on any
    device: 8 programs of 5 blocks over 4 rows of 9)."""
    from gsa_rag.kernels import gist_select
    from gsa_rag.kernels.bench import synthetic_layout

    monkeypatch.setattr(gist_select, "num_sms", lambda device: 4)
    monkeypatch.setattr(gist_select, "INT8_BLOCK_C", 16)
    monkeypatch.setattr(gist_select, "INT8_STEPS", 3)
    monkeypatch.setattr(gist_select, "STEPS_MIN_PROGRAMS_PER_SM", 0)
    monkeypatch.setattr(gist_select, "INT8_PERSISTENT", persistent)
    monkeypatch.setattr(gist_select, "INT8_PROGRAMS_PER_SM", 2)
    config = GistConfig(chunk_size=8, sink=4, k_policy="adaptive", adaptive_ratio=2.0, score_dtype="int8")
    layout = synthetic_layout(2, 1200, 8, device=DEVICE).append(torch.full((2, 1), 5, device=DEVICE))
    assert int(layout.num_chunks.min()) > 6 * 16  # more than two programs of three blocks a row
    assert_key_lists_are_the_engine_mask(layout, config, seed=11)


def test_gist_memory_answers_with_int8_scores_through_the_kernels_as_the_reference(default_model_dir, monkeypatch):
    """A question over gist memory (raw KV offloaded, fetched by the cache's hook) with int8
    scoring: the kernels and the reference path give the same answer, and the kernels do score
    the int8 copy."""
    from gsa_rag.kernels import gist_keys8
    from test_memory import PASSAGES, QUESTION, tiny_engine
    from transformers import AutoTokenizer

    from gsa_rag.memory import GistMemory

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)
    engine = tiny_engine(tokenizer, score_dtype="int8", top_k=2)
    engine.model.to(DEVICE)
    memory = GistMemory(engine, progress=False, offload=True)
    ids = memory.add(PASSAGES)
    made = []
    real = gist_keys8.quantize_gist_keys
    monkeypatch.setattr(gist_keys8, "quantize_gist_keys", lambda *a: made.append(1) or real(*a))
    answers = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("GSA_RAG_KERNELS", mode)
        made.clear()
        answers[mode] = engine.generate(QUESTION, ids, memory=memory, max_new_tokens=4)
        if mode == "1":
            assert made, "the decode kernels did not score the int8 copy"
    assert answers["1"] == answers["0"]
