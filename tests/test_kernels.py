"""Each Triton kernel against its torch reference, on fresh random inputs (gsa_rag.kernels).

On a machine without CUDA the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be
set before Triton decorates them (at the import of gsa_rag.kernels.gist_select and
.sparse_decode), so this module sets it first unless CUDA is there. Outputs are poisoned with
NaN before every run; errors are ||out - ref|| / ||ref|| against a float64 reference on the
same (rounded) inputs: fp16 <= 2e-3, bf16 <= 1e-2 (METHOD.md's bands for 16-bit operands).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton not installed")

from fakes import FakeTokenizer, random_segments
from gsa_rag.kernels import dispatch, gist_select
from gsa_rag.kernels.gist_select import (
    ENDS_BLOCKS,
    ENDS_PREFIX,
    SEARCH_BISECT,
    SEARCH_INTERP,
    DecodePlan,
    _expand_launch,
    build_index_list_ref,
    build_index_list_triton,
    choose_union,
    gist_scores_ref,
    gist_scores_triton,
    select_index_list,
    select_index_list_triton,
    select_sizes_triton,
    topk_union_launch,
    topk_union_triton,
)
from gsa_rag.kernels.prefill import gist_prefill, gist_prefill_ref
from gsa_rag.kernels.sparse_decode import sparse_decode_ref, sparse_decode_triton
from transformers import DynamicCache, LlamaConfig, Qwen2Config

from gsa_rag.attention import GistState
from gsa_rag.config import GistConfig
from gsa_rag.layout import Segment, build_layout

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_tree_reduce() -> None:
    """Triton's interpreter reduces with a custom combine function (the select kernel's interpolation
    search: count, min, max and sums at once; the three largest) one element at a time in Python,
    seconds per 16K-element row. Reduce pairwise over NumPy halves instead: the same combine
    function, log2(n) calls (its associativity is what the GPU's tree relies on too)."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.ReduceOps.generic_reduce
    if getattr(original, "_gsa_tree", False):
        return

    def tree(self, input):
        data = [arg.handle.data for arg in input]
        if self.axis != 0 or self.keep_dims or any(d.ndim != 1 for d in data):
            return original(self, input)
        dtypes = [arg.dtype for arg in input]
        while data[0].shape[0] > 1:
            half = data[0].shape[0] // 2
            out = self.combine_fn.fn(*(self.to_tensor(d[:half], t) for d, t in zip(data, dtypes)),
                                     *(self.to_tensor(d[half:2 * half], t) for d, t in zip(data, dtypes)))
            out = out if isinstance(out, tuple) else (out,)
            data = [np.concatenate([o.handle.data, d[2 * half:]]) for o, d in zip(out, data)]
        return [self.to_tensor(d[0], t) for d, t in zip(data, dtypes)]

    tree._gsa_tree = True
    interpreter.ReduceOps.generic_reduce = tree


if DEVICE == "cpu":
    dispatch._interpreter_compat()
    _interpreter_tree_reduce()
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


# the interpolation search's sums (mean, spread) of rows with +-1e30 (or magnitudes up to 1e30)
# overflow to inf / NaN, which the interpreter's NumPy reports; the kernel then leaves its normal
# fit unused, as on the GPU
OVERFLOW_OK = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                         "ignore:invalid value encountered:RuntimeWarning")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "unwritten (poisoned) or NaN output"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


# --------------------------------------------------------------------------- random layouts


def random_layout(seed: int, batch: int = 2, kv_reuse: bool = False):
    """A random batch laid out for decode: context, question, then one generated token."""
    rng = random.Random(seed)
    config = GistConfig(chunk_size=rng.randrange(1, 6), sink=rng.randrange(0, 5), num_previous_chunks=rng.randrange(0, 3),
                        word_aware=rng.random() < 0.5, top_k=rng.randrange(1, 4),
                        k_policy=rng.choice(["fixed", "fixed", "adaptive", "top_p"]), adaptive_ratio=2.0)
    rows = []
    for _ in range(batch):
        segments = random_segments(rng, max_passages=4, max_len=30)
        if kv_reuse:  # independent passages, link tokens after some of them
            reused = []
            for i, seg in enumerate(segments[:-1]):
                reused.append(Segment(seg.ids, True, passage_id=i, independent=True))
                if rng.random() < 0.5:
                    reused.append(Segment((5, 6), True, passage_id=i, link=True))
            segments = reused + segments[-1:]
        rows.append(segments)
    layout = build_layout(rows, config, FakeTokenizer())
    layout = layout.append(torch.randint(1, 990, (batch, 1), generator=torch.Generator().manual_seed(seed)))
    return layout.to(DEVICE), config


def engine_lists(layout, config, q, k, layer):
    """The set of key columns per (b, KV head) that the engine's dense mask allows."""
    state = GistState.for_new_tokens(layout, 1, config)
    mask = state.mask_for_layer(layer, q[:, :, None], k)[:, :, -1]  # [B, 1 or Hkv, T]
    return mask.expand(-1, k.shape[1], -1)


def as_sets(index, lengths, B, H):
    index, lengths = index.expand(B, H, -1), lengths.expand(B, H)
    return [[sorted(index[b, h, : lengths[b, h]].tolist()) for h in range(H)] for b in range(B)]


@pytest.mark.parametrize("ends_mode,search,stream_above", [
    (ENDS_PREFIX, SEARCH_BISECT, None), (ENDS_BLOCKS, SEARCH_BISECT, None), (ENDS_BLOCKS, SEARCH_INTERP, None),
    (ENDS_PREFIX, SEARCH_INTERP, 16), (ENDS_BLOCKS, SEARCH_INTERP, 16)])
@pytest.mark.parametrize("kv_reuse", [False, True])
def test_key_list_is_the_engine_mask(kv_reuse, ends_mode, search, stream_above, monkeypatch):
    """Reference and Triton lists equal the engine's dense selective mask, layer 0 and 1; the
    fused path placing chunks by the prefix sum and by block sums (gist_select.ENDS_MODE), with
    either threshold search (gist_select.SEARCH), and with rows of more than `stream_above`
    chunks (as rows past TOPK_MAX_CHUNKS are): streamed by the select kernel where it writes the
    union (ENDS_PREFIX), else taken by the window select (the SMs made many enough for any batch)."""
    monkeypatch.setattr(gist_select, "ENDS_MODE", ends_mode)
    monkeypatch.setattr(gist_select, "SEARCH", search)
    if stream_above is not None:
        monkeypatch.setattr(gist_select, "TOPK_MAX_CHUNKS", stream_above)
        monkeypatch.setattr(gist_select, "STREAM_TILE", 64)
        monkeypatch.setattr(gist_select, "num_sms", lambda device: 1024)
        calls = []
        launch = gist_select.window_select_launch
        monkeypatch.setattr(gist_select, "window_select_launch", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    for seed in range(6):
        layout, config = random_layout(seed, kv_reuse=kv_reuse)
        assert_key_lists_are_the_engine_mask(layout, config, seed)
    if stream_above is not None:
        assert bool(calls) == (ends_mode == ENDS_BLOCKS)


def assert_key_lists_are_the_engine_mask(layout, config, seed: int) -> None:
    """Reference and Triton key lists of random q / k on `layout` equal the engine's dense mask in
    a layer that does not select (0) and one that does (1)."""
    B, T = layout.input_ids.shape
    Hq, Hkv, D = 4, 2, 16
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(DEVICE)
    k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE)
    plan = DecodePlan.build(layout, config, Hq // Hkv)
    for layer in (0, 1):
        want = engine_lists(layout, config, q, k, layer)
        want = [[torch.nonzero(want[b, h]).flatten().tolist() for h in range(Hkv)] for b in range(B)]
        for use_triton in (False, True):
            index, lengths = select_index_list(q, k, layout, plan, config, layer, use_triton)
            assert index.shape[-1] >= int(lengths.max())
            assert as_sets(index, lengths, B, Hkv) == want, (seed, layer, use_triton, config)


@pytest.mark.parametrize("kv_reuse", [False, True])
def test_cached_plan_of_appended_layouts_equals_a_fresh_plan(kv_reuse):
    """DecodePlan.build reuses the plan of an earlier step of the same append lineage: every
    later step's lists (selecting and forgetting layers) equal a fresh plan's and the engine mask."""
    for seed in range(4):
        layout, config = random_layout(seed + 40, kv_reuse=kv_reuse)
        B = layout.batch_size
        Hq, Hkv, D = 4, 2, 16
        g = torch.Generator().manual_seed(seed)
        first = DecodePlan.build(layout, config, Hq // Hkv)
        assert DecodePlan.build(layout, config, Hq // Hkv) is first or layout.__dict__.get("_lineage") is None
        for step in range(3):
            layout = layout.append(torch.randint(1, 990, (B, 1), generator=g).to(DEVICE))
            T = layout.seq_len
            plan = DecodePlan.build(layout, config, Hq // Hkv)
            if step:
                assert DecodePlan.cached(layout, config, Hq // Hkv) is not None
            fresh = DecodePlan.build_full(layout, config, Hq // Hkv)
            assert plan.capacity == fresh.capacity and plan.nb_max == fresh.nb_max
            q = torch.randn(B, Hq, D, generator=g).to(DEVICE)
            k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE)
            for layer in (0, 1):
                want = engine_lists(layout, config, q, k, layer)
                want = [[torch.nonzero(want[b, h]).flatten().tolist() for h in range(Hkv)] for b in range(B)]
                for p in (plan, fresh):
                    for use_triton in (False, True):
                        index, lengths = select_index_list(q, k, layout, p, config, layer, use_triton)
                        assert as_sets(index, lengths, B, Hkv) == want, (seed, step, layer, use_triton)


def test_synthetic_benchmark_layout_lists_are_the_engine_mask():
    """The benchmarks' synthetic layout (gsa_rag.kernels.bench) goes through the same rule."""
    from gsa_rag.kernels.bench import synthetic_layout

    config = GistConfig(chunk_size=8, sink=4, k_policy="adaptive", adaptive_ratio=2.0)
    layout = synthetic_layout(2, 300, 8, device=DEVICE).append(torch.full((2, 1), 5, device=DEVICE))
    B, T = layout.input_ids.shape
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, 6, 16, generator=g).to(DEVICE), torch.randn(B, 2, T, 16, generator=g).to(DEVICE)
    plan = DecodePlan.build(layout, config, 3)
    want = engine_lists(layout, config, q, k, 1)
    index, lengths = select_index_list(q, k, layout, plan, config, 1, use_triton=True)
    assert as_sets(index, lengths, B, 2) == [[torch.nonzero(want[b, h]).flatten().tolist() for h in range(2)] for b in range(B)]


def test_expand_kernel_equals_reference_on_random_selections():
    for seed in range(4):
        layout, config = random_layout(seed + 10, batch=3)
        plan = DecodePlan.build(layout, GistConfig(chunk_size=config.chunk_size, k_policy="top_p"), 2)
        C = layout.gist_index.shape[1]
        selected = torch.rand(3, 2, C, generator=torch.Generator().manual_seed(seed)).to(DEVICE) < 0.4
        ref_index, ref_len = build_index_list_ref(plan, selected, layout.seq_len)
        index, lengths = build_index_list_triton(plan, selected)
        assert torch.equal(lengths, ref_len)
        assert as_sets(index, lengths, 3, 2) == as_sets(ref_index, ref_len, 3, 2)
        # no column twice: base and the chunks' extra columns are disjoint
        for b in range(3):
            for h in range(2):
                row = index[b, h, : lengths[b, h]].tolist()
                assert len(row) == len(set(row))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 4, 2, 16, 40, 9), (1, 9, 3, 64, 70, 20), (2, 8, 8, 128, 30, 5)])
def test_gist_scores_match_reference(dtype, shape):
    B, Hq, Hkv, D, T, C = shape
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    q = torch.randn(B, Hq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
    gist_index = torch.randint(0, T, (B, C), generator=g).to(DEVICE)
    num_chunks = torch.tensor([C, C // 2])[:B].to(DEVICE)
    valid = torch.arange(C, device=DEVICE)[None] < num_chunks[:, None]
    ref = gist_scores_ref(q.double(), k.double(), gist_index, valid)
    out = torch.full((B, Hq, C), float("nan"), device=DEVICE)
    out.copy_(gist_scores_triton(q, k, gist_index, num_chunks))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert rel_err(out[finite], ref[finite]) < 1e-5  # fp32 products of the same 16-bit inputs


def test_topk_union_equals_reference_selection():
    from gsa_rag.selection import select_chunks

    for seed in range(4):
        layout, _ = random_layout(seed + 20)
        for policy in ("fixed", "adaptive", "top_p"):
            config = GistConfig(chunk_size=3, top_k=2, k_policy=policy, adaptive_ratio=1.0)
            B, T = layout.input_ids.shape
            g = torch.Generator().manual_seed(seed)
            q = torch.randn(B, 6, 8, generator=g).to(DEVICE)
            k = torch.randn(B, 2, T, 8, generator=g).to(DEVICE)
            plan = DecodePlan.build(layout, config, 3)
            scores = gist_scores_ref(q, k, layout.gist_index, layout.gist_valid)
            got = choose_union(scores, plan, 2, config, 8)
            context_len = (layout.valid & ~layout.is_tail).sum(-1)
            want = select_chunks(q[:, :, None], k, layout.gist_index, layout.gist_valid, context_len, config)[:, :, 0]
            assert torch.equal(got, want), (seed, policy)


@OVERFLOW_OK
@pytest.mark.parametrize("early_exit,ends_mode,search,union_kernel", [
    (False, ENDS_PREFIX, SEARCH_BISECT, False), (True, ENDS_PREFIX, SEARCH_BISECT, False),
    (True, ENDS_BLOCKS, SEARCH_BISECT, False), (True, ENDS_PREFIX, SEARCH_INTERP, False),
    (True, ENDS_BLOCKS, SEARCH_INTERP, False), (True, ENDS_BLOCKS, SEARCH_INTERP, True)])
@pytest.mark.parametrize("G", [1, 3, 4])
def test_fused_topk_union_picks_the_reference_sets(G, early_exit, ends_mode, search, union_kernel, monkeypatch):
    """The select kernel's threshold search picks the reference's set per head (stable argsort:
    ties go to the lower chunk index), never a missing chunk, k above the chunks that exist,
    k = 0, many exact ties, -0.0 against +0.0; then the GQA union, its sizes and what the
    expansion places chunks by: the prefix sum, or the sums per block of 64 chunks (ENDS_BLOCKS;
    rows of one short block, several with a short last one, and whole blocks only). The
    searches: bisection over all 32 bits, bisection stopping once exactly k scores are above the
    threshold, and interpolation (SEARCH_INTERP). union_kernel: the union as a launch of its own
    (UNION_TILE 64 chunks a program, so rows span several)."""
    from types import SimpleNamespace

    monkeypatch.setattr(gist_select, "UNION_TILE", 64)

    from gsa_rag.selection import choose_chunks, union_over_groups

    g = torch.Generator().manual_seed(G)
    for trial in range(8):
        B, Hkv = 2, 2
        Hq = Hkv * G
        C = int(torch.randint(1, 64 if trial in (2, 5) else 400, (), generator=g))
        if trial == 7:  # whole blocks of 64
            C = 64 * (1 + C % 6)
        scores = torch.randn(B, Hq, C, generator=g)
        if trial % 3 == 0:  # few distinct values: ties straddle the k-th place
            scores = torch.randint(-3, 3, (B, Hq, C), generator=g).float()
        if trial % 4 == 1:
            scores = torch.where(scores > 1, -0.0, torch.where(scores < -1, 0.0, scores))
        if trial == 6:  # both signs and magnitudes far apart: every digit of the key matters
            scores = scores * torch.logspace(-30, 30, C)[torch.randperm(C, generator=g)]
        num_chunks = torch.randint(0, C + 1, (B,), generator=g)
        num_chunks[0] = C
        scores = torch.where(torch.arange(C)[None, None] < num_chunks[:, None, None], scores, float("-inf"))
        k = torch.randint(0, C + 3, (B,), generator=g)
        k[0] = min(int(k[0]), 1 + C // 20) if trial % 2 else k[0]
        sizes = torch.randint(1, 4, (B, C), generator=g)
        plan = SimpleNamespace(k=k.to(DEVICE), chunk_ptr=torch.cat([torch.zeros(B, 1, dtype=torch.long), sizes.cumsum(-1)], 1).int().to(DEVICE))
        got, got_sizes = topk_union_triton(scores.to(DEVICE), plan, Hkv, early_exit=early_exit, ends_mode=ends_mode,
                                           search=search, union_kernel=union_kernel)
        want = union_over_groups(choose_chunks(scores[:, :, None], k=k), Hkv)[:, :, 0]
        assert torch.equal(got.cpu(), want), (G, trial)
        assert torch.equal(got_sizes.cpu(), torch.where(want, sizes[:, None].int(), 0)), (G, trial)


def hard_rows(B: int, C: int, g: torch.Generator) -> torch.Tensor:
    """float32 [B, 10, C] score rows that stress a threshold search, one kind per head: normal;
    integers in [-3, 3) (ties straddle most k-th places); normal rounded to 0.25 (many exact ties
    at the threshold); normal with a few huge outliers (+-1e30); tiny (1e-30 scale, a third
    denormals and zeros); all equal; +0.0 / -0.0 and a few ones; signs and magnitudes from 1e-30
    to 1e30; bf16-rounded q . k (the decode benchmark's kind); two clusters 1e6 apart. Odd batch
    rows end in -inf padding (a random share), so k often exceeds the chunks that exist."""
    def normal():
        return torch.randn(B, C, generator=g)

    def pick(n):  # n random positions per row
        return torch.rand(B, C, generator=g).argsort(-1)[:, :n]

    huge = normal()
    huge.scatter_(1, pick(min(C, 3)), 1e30)
    huge.scatter_(1, pick(min(C, 2)), -1e30)
    tiny = normal() * 1e-30
    denormal = torch.randint(-40, 40, (B, C), generator=g).float() * 1.4e-45
    tiny = torch.where(torch.rand(B, C, generator=g) < 0.33, denormal, tiny)
    zeros = torch.where(torch.rand(B, C, generator=g) < 0.5, -0.0, 0.0)
    zeros = torch.where(torch.rand(B, C, generator=g) < 0.1, 1.0, zeros)
    wide = normal() * 10.0 ** (60 * torch.rand(B, C, generator=g) - 30)
    q = torch.randn(B, 64, generator=g).bfloat16().float()
    qk = torch.einsum("bd,bcd->bc", q, torch.randn(B, C, 64, generator=g).bfloat16().float())
    clusters = normal() + 1e6 * (torch.rand(B, C, generator=g) < 0.1)
    rows = torch.stack([normal(), torch.randint(-3, 3, (B, C), generator=g).float(), (normal() * 4).round() / 4,
                        huge, tiny, torch.full((B, C), 0.375), zeros, wide, qk, clusters], 1)
    assert bool((tiny[tiny != 0].abs() < 1.2e-38).any()) or C < 16  # denormals made it through float32
    pad = (torch.arange(C)[None] >= (torch.rand(B, 1, generator=g) * C).long()) & (torch.arange(B)[:, None] % 2 == 1)
    return torch.where(pad[:, None], float("-inf"), rows)


@OVERFLOW_OK
@pytest.mark.parametrize("search", [SEARCH_BISECT, SEARCH_INTERP])
@pytest.mark.parametrize("C", [5, 16, 300, 2500])
def test_threshold_searches_pick_the_reference_sets_on_hard_rows(search, C):
    """Both threshold searches on `hard_rows` (one GQA group per head, so each head's picks are
    checked), k = 0, 1, 2, 3, C / 32, C / 2, C - 2, C - 1, C and C + 3 on the batch rows: the
    reference's set (stable argsort: ties to the lower chunk, never -inf), outputs poisoned; the
    interpolation never spends more than its 64 reductions, nor more than 2 beyond the 32
    bisection steps' worth on any of these rows."""
    from types import SimpleNamespace

    from gsa_rag.selection import choose_chunks

    g = torch.Generator().manual_seed(1000 * C + search)
    k = torch.tensor([0, 1, 2, 3, max(1, C // 32), C // 2, max(0, C - 2), C - 1, C, C + 3])
    B = len(k)
    scores = hard_rows(B, C, g)
    Hq = scores.shape[1]
    sizes = torch.randint(1, 4, (B, C), generator=g)
    plan = SimpleNamespace(k=k.to(DEVICE), chunk_ptr=torch.cat([torch.zeros(B, 1, dtype=torch.long), sizes.cumsum(-1)], 1).int().to(DEVICE))
    stats = torch.full((B, Hq, 2), -1, dtype=torch.int32, device=DEVICE)
    got, got_sizes = topk_union_triton(scores.to(DEVICE), plan, Hq, search=search, stats=stats)
    want = choose_chunks(scores[:, :, None], k=k)[:, :, 0]
    for h in range(Hq):
        assert torch.equal(got[:, h].cpu(), want[:, h]), (C, search, h)
    assert torch.equal(got_sizes.cpu(), torch.where(want, sizes[:, None].int(), 0))
    steps = stats[..., 0].cpu()
    assert bool((steps >= 0).all()) and bool((stats[..., 1].cpu() > steps).all())
    assert int(steps.max()) <= (34 if search == SEARCH_INTERP else 32), steps


@OVERFLOW_OK
@pytest.mark.parametrize("search,C", [(SEARCH_BISECT, 70), (SEARCH_INTERP, 300)])
def test_streamed_rows_pick_the_reference_sets(search, C, monkeypatch):
    """The select kernel reading its row 64 scores at a time at every pass (STREAM: rows past
    TOPK_MAX_CHUNKS, any length) picks what the reference picks on `hard_rows`: ties straddling
    tiles (the lowest chunks first, counted across tiles), -inf padding, every k; GQA groups of
    1 and 5 heads, so the union tail walks its tiles too, placing chunks by the prefix sum
    (carried across tiles) and by block sums."""
    from types import SimpleNamespace

    from gsa_rag.selection import choose_chunks, union_over_groups

    monkeypatch.setattr(gist_select, "STREAM_TILE", 64)
    g = torch.Generator().manual_seed(C + search)
    k = torch.tensor([0, 1, C // 32, C // 2, C - 1, C + 3])
    B = len(k)
    scores = hard_rows(B, C, g)
    Hq = scores.shape[1]
    sizes = torch.randint(1, 4, (B, C), generator=g)
    plan = SimpleNamespace(k=k.to(DEVICE), chunk_ptr=torch.cat([torch.zeros(B, 1, dtype=torch.long), sizes.cumsum(-1)], 1).int().to(DEVICE))
    for G, ends_mode in ((1, ENDS_BLOCKS), (5, ENDS_PREFIX)):
        got, got_sizes = topk_union_triton(scores.to(DEVICE), plan, Hq // G, search=search, ends_mode=ends_mode,
                                           stream=True)
        want = union_over_groups(choose_chunks(scores[:, :, None], k=k), Hq // G)[:, :, 0]
        assert torch.equal(got.cpu(), want), (C, search, G)
        assert torch.equal(got_sizes.cpu(), torch.where(want, sizes[:, None].int(), 0)), (C, search, G)


def test_rows_stream_past_the_register_limit_and_tiles_are_checked(monkeypatch):
    from types import SimpleNamespace

    assert not gist_select.streams_rows(gist_select.TOPK_MAX_CHUNKS)
    assert gist_select.streams_rows(gist_select.TOPK_MAX_CHUNKS + 1)
    scores = torch.zeros(1, 1, 8, device=DEVICE)
    plan = SimpleNamespace(k=torch.ones(1, dtype=torch.long, device=DEVICE),
                           chunk_ptr=torch.arange(9, dtype=torch.int32, device=DEVICE)[None])
    for name, tile in (("STREAM_TILE", 96), ("UNION_TILE", 32)):
        monkeypatch.setattr(gist_select, name, tile)
        with pytest.raises(ValueError, match=f"{name} must be a power of two"):
            topk_union_triton(scores, plan, 1, stream=True, union_kernel=True)
        monkeypatch.undo()


# a row of 100 eighths (value * 8: copies) on which an interpolation search that moved hi onto the
# largest score below an empty probe, instead of one key above it, picked the wrong set at k = 51
# (found by fuzzing such a mutation; the row's order does not matter, its sums are exact)
TIED_GROUPS_ROW = [(-59, 1), (-56, 3), (-52, 26), (-50, 1), (-49, 1), (-46, 22), (-45, 1), (-39, 1), (-37, 2),
                   (-36, 1), (-34, 1), (-27, 1), (-21, 3), (-19, 2), (-18, 1), (-15, 1), (-14, 1), (-12, 15),
                   (-11, 1), (-9, 1), (-8, 1), (-7, 1), (-5, 1), (-3, 1), (1, 1), (2, 1), (3, 1), (5, 2), (9, 1),
                   (12, 1), (15, 1), (16, 2)]


@pytest.mark.parametrize("search", [SEARCH_BISECT, SEARCH_INTERP])
def test_threshold_searches_pick_the_reference_sets_for_every_k_on_tied_groups(search):
    """Rows of a few tied groups (3 to 30 copies of a value) among distinct scores, each with every
    k from 0 to past its length (one batch row per k, -inf padding to the longest): ties straddle
    the k-th place at many k while the bracket's ends are still far from it, where an end moved
    onto the wrong side of a tied group shows. TIED_GROUPS_ROW and two random rows, shuffled."""
    from types import SimpleNamespace

    from gsa_rag.selection import choose_chunks

    g = torch.Generator().manual_seed(7 + search)
    rows = [torch.cat([torch.full((n,), v / 8) for v, n in TIED_GROUPS_ROW])]
    for trial in range(2):
        groups = int(torch.randint(1, 5, (), generator=g))
        values = torch.randint(-40, 40, (groups,), generator=g) / 4
        body = torch.randint(-60, 20, (int(torch.randint(0, 60, (), generator=g)),), generator=g) / 8
        rows.append(torch.cat([values.repeat_interleave(torch.randint(3, 30, (groups,), generator=g)), body]))
    C = max(len(r) for r in rows)
    scores, k = [], []
    for r in rows:
        r = torch.cat([r[torch.randperm(len(r), generator=g)], torch.full((C - len(r),), float("-inf"))])
        scores.append(r.expand(len(r) + 2, C))
        k.append(torch.arange(len(r) + 2))
    scores, k = torch.cat(scores)[:, None].contiguous(), torch.cat(k)
    B = len(k)
    plan = SimpleNamespace(k=k.to(DEVICE), chunk_ptr=torch.arange(C + 1, dtype=torch.int32).expand(B, -1).contiguous().to(DEVICE))
    got, _ = topk_union_triton(scores.to(DEVICE), plan, 1, search=search)
    want = choose_chunks(scores[:, :, None], k=k)[:, :, 0]
    wrong = [(i, int(k[i])) for i in range(B) if not torch.equal(got[i].cpu(), want[i])]
    assert not wrong, wrong


@OVERFLOW_OK
def test_interpolation_search_at_full_width():
    """C = TOPK_MAX_CHUNKS (16384, the widest row in registers): the interpolation search picks the
    reference's set on `hard_rows` with k = 0, 1, 512 and C, as the bisection does."""
    from types import SimpleNamespace

    from gsa_rag.selection import choose_chunks

    g = torch.Generator().manual_seed(16384)
    C = gist_select.TOPK_MAX_CHUNKS
    k = torch.tensor([0, 1, 512, C])
    scores = hard_rows(len(k), C, g)
    B, Hq, _ = scores.shape
    plan = SimpleNamespace(k=k.to(DEVICE), chunk_ptr=torch.arange(C + 1, dtype=torch.int32).expand(B, -1).contiguous().to(DEVICE))
    want = choose_chunks(scores[:, :, None], k=k)[:, :, 0]
    for search in (SEARCH_INTERP, SEARCH_BISECT):
        got, _ = topk_union_triton(scores.to(DEVICE), plan, Hq, search=search)
        assert torch.equal(got.cpu(), want), search


def search_reductions(C: int, rows: int, seed: int) -> dict[int, torch.Tensor]:
    """Per search, the threshold search's block reductions (the select kernel's STATS output) on
    `rows` random-normal rows of C chunks with k = C / 32; both searches' picks are the reference's."""
    from types import SimpleNamespace

    from gsa_rag.selection import choose_chunks

    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, rows, C, generator=g)
    k = torch.tensor([C // 32])
    plan = SimpleNamespace(k=k.to(DEVICE), chunk_ptr=torch.arange(C + 1, dtype=torch.int32)[None].to(DEVICE))
    want = choose_chunks(scores[:, :, None], k=k)[:, :, 0]
    out = {}
    for search in (SEARCH_BISECT, SEARCH_INTERP):
        stats = torch.full((1, rows, 2), -1, dtype=torch.int32, device=DEVICE)
        got, _ = topk_union_triton(scores.to(DEVICE), plan, rows, search=search, stats=stats)
        assert torch.equal(got.cpu(), want), search
        out[search] = stats[0].cpu()
    return out


@pytest.mark.parametrize("C", [4096, 16384])
def test_interpolation_search_needs_far_fewer_reductions_on_normal_rows(C):
    """On random-normal rows of 4K-16K chunks with k = C / 32 (the decode benchmark's ratio) the
    interpolation search runs at most a third of the bisection's reductions on average, and its
    slowest row (the kernel waits for its slowest program) stays under the bisection's mean."""
    counts = search_reductions(C, 32, seed=C)
    bisect, interp = (counts[s][:, 0].float() for s in (SEARCH_BISECT, SEARCH_INTERP))
    assert interp.mean() * 3 <= bisect.mean(), (bisect.tolist(), interp.tolist())
    assert interp.max() < bisect.mean(), (bisect.tolist(), interp.tolist())
    # distinct scores: the interpolation always ends on an exact split, so the pick runs no tie
    # rule (the bisection's two sums); the bisection's pick is its search, the count and those sums
    assert torch.equal(counts[SEARCH_INTERP][:, 1], counts[SEARCH_INTERP][:, 0] + 1)
    assert torch.equal(counts[SEARCH_BISECT][:, 1], counts[SEARCH_BISECT][:, 0] + 3)


@pytest.mark.parametrize("ends_mode,search", [(ENDS_PREFIX, SEARCH_BISECT), (ENDS_BLOCKS, SEARCH_BISECT),
                                              (ENDS_BLOCKS, SEARCH_INTERP)])
def test_fused_and_torch_topk_paths_give_the_same_lists(ends_mode, search, monkeypatch):
    """select_index_list_triton with the fused select kernel (placing chunks by the prefix sum or
    by block sums; either threshold search) and with torch.topk + mark + cumsum: the same lists,
    in the same order."""
    from gsa_rag.kernels.bench import synthetic_layout

    monkeypatch.setattr(gist_select, "SEARCH", search)

    config = GistConfig(chunk_size=4, sink=4, k_policy="adaptive", adaptive_ratio=2.0)
    layout = synthetic_layout(3, 900, 4, device=DEVICE).append(torch.full((3, 1), 5, device=DEVICE))
    B, T = layout.input_ids.shape
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, 8, 16, generator=g).to(DEVICE), torch.randn(B, 2, T, 16, generator=g).to(DEVICE)
    plan = DecodePlan.build(layout, config, 4)
    lists = [select_index_list_triton(q, k, layout, plan, config, fused_topk=f, ends_mode=ends_mode)
             for f in (True, False)]
    assert torch.equal(lists[0][1], lists[1][1])
    assert as_sets(*lists[0], B, 2) == as_sets(*lists[1], B, 2)
    assert all(torch.equal(lists[0][0][b, h, :n], lists[1][0][b, h, :n])
               for b in range(B) for h in range(2) for n in [int(lists[0][1][b, h])])


def ordered_list(plan, selected, b, h):
    """The key list the fast path writes: base, then each selected chunk's extra columns by chunk."""
    cols = plan.base[b, : int(plan.base_len[b])].tolist()
    ptr, chunk_cols = plan.chunk_ptr[b].tolist(), plan.chunk_cols[b].tolist()
    for c in torch.nonzero(selected[b, h]).flatten().tolist():
        cols += chunk_cols[ptr[c] : ptr[c + 1]]
    return cols


@pytest.mark.parametrize("ends_mode,search", [(ENDS_PREFIX, SEARCH_BISECT), (ENDS_BLOCKS, SEARCH_BISECT),
                                              (ENDS_BLOCKS, SEARCH_INTERP)])
def test_fused_select_writes_the_reference_lists_in_order(ends_mode, search, monkeypatch):
    """scores -> select kernel -> expansion into outputs poisoned with -1: exactly the list of the
    reference's choice (stable argsort, ties to the lower chunk; GQA union) in the fast path's
    order, its length, nothing written past it. Chunks placed by the prefix sum and by block sums
    (ENDS_BLOCKS: each expansion block adds the sums of the blocks before it); the bisection and
    the interpolation search (gist_select.SEARCH). Rows of fewer than 64 chunks (random layouts:
    rows with 0 or 1 chunks, k above the chunks there), of 150 (three blocks, the last one short)
    and of 128 (whole blocks); batch 3; G 1 and 4; integer scores (many exact ties) and k per row
    from 0 up. Each selection expanded with 64, 128 and 256 chunks per expansion program."""
    import dataclasses

    monkeypatch.setattr(gist_select, "SEARCH", search)

    from gsa_rag.kernels.bench import synthetic_layout
    from gsa_rag.selection import choose_chunks, union_over_groups

    g = torch.Generator().manual_seed(ends_mode)
    cases = [random_layout(seed + 60, batch=3) for seed in range(3)]
    for n in (150, 128):
        layout = synthetic_layout(3, 4 + 3 * n, 2, device=DEVICE).append(torch.full((3, 1), 5, device=DEVICE))
        cases.append((layout, GistConfig(chunk_size=2, sink=4)))
    for i, (layout, config) in enumerate(cases):
        config = dataclasses.replace(config, k_policy="fixed", top_k=12)
        for Hkv, G in ((3, 1), (2, 4)):
            B, T = layout.input_ids.shape
            Hq = Hkv * G
            plan = DecodePlan.build(layout, config, G)
            k_row = torch.randint(0, 13, (B,), generator=g)
            k_row[0] = 12
            plan = dataclasses.replace(plan, k=k_row.to(DEVICE), uniform_k=False)  # k <= k_max: the capacity holds
            span = 2 if i % 2 else 8  # integer q, k: exact scores, few distinct values (ties) or more
            q = torch.randint(-span, span + 1, (B, Hq, 16), generator=g).float().to(DEVICE)
            k = torch.randint(-span, span + 1, (B, Hkv, T, 16), generator=g).float().to(DEVICE)
            scores = gist_scores_ref(q, k, layout.gist_index, layout.gist_valid)
            selected = union_over_groups(choose_chunks(scores[:, :, None].cpu(), k=k_row), Hkv)[:, :, 0]
            sizes, ends = select_sizes_triton(q, k, layout, plan, ends_mode)
            selected = selected.to(DEVICE)
            # one expansion program per 64 chunks, and per 128 / 256 (several sum blocks each)
            for per in (64, 128, 256):
                index, lengths = expand_into_poisoned(plan, sizes, ends, ends_mode, per)
                assert_expansion_is_the_reference(plan, selected, T, index, lengths, (i, Hkv, per))


def expand_into_poisoned(plan, sizes, ends, ends_mode, per):
    """`_expand_launch` of union sizes int32 [B, Hkv, C] and their ends into outputs poisoned with
    -1, with room past the capacity (a misplaced chunk lands there, not out of bounds)."""
    B, Hkv, _ = sizes.shape
    index = torch.full((B, Hkv, plan.capacity + plan.chunk_cols.shape[1]), -1, dtype=torch.int32, device=DEVICE)
    lengths = torch.full((B, Hkv), -1, dtype=torch.int32, device=DEVICE)
    _expand_launch(plan, sizes, ends, ends_mode, out=(index[..., : plan.capacity], lengths), chunks_per_program=per)
    return index, lengths


def expand_poisoned(plan, selected, ends_mode, per):
    """`expand_into_poisoned` of a selection bool [B, Hkv, C] (its sizes and ends made here)."""
    sizes = torch.where(selected, plan.chunk_size[:, None, :], 0).to(torch.int32).contiguous()
    ends = torch.cumsum(sizes, -1, dtype=torch.int32) if ends_mode == ENDS_PREFIX else gist_select.block_sums(sizes)
    return expand_into_poisoned(plan, sizes, ends.contiguous(), ends_mode, per)


def assert_expansion_is_the_reference(plan, selected, T, index, lengths, what):
    """The fast path's list (base, then chunk by chunk), the reference's set and length, nothing
    written past the length."""
    ref_index, ref_len = build_index_list_ref(plan, selected, T)
    assert torch.equal(lengths, ref_len), what
    for b in range(selected.shape[0]):
        for h in range(selected.shape[1]):
            n = int(lengths[b, h])
            want = ordered_list(plan, selected, b, h)
            assert sorted(want) == ref_index[b, h, :n].tolist(), (what, b, h)
            assert index[b, h, :n].tolist() == want, (what, b, h)
            assert bool((index[b, h, n:] == -1).all()), (what, b, h)


def test_contiguous_expansion_equals_the_gather_and_the_reference(monkeypatch):
    """Where every chunk's extra columns are one run (synthetic benchmark layouts, random engine
    layouts) the plan says so, its chunk_first is each chunk's first extra column, and the
    expansion computing chunk_first[c] + t writes exactly the lists of the CSR gather
    (gist_select.EXPAND_CONTIGUOUS off) and of the reference; placing chunks by prefix sums and by
    block sums, 64 and 128 chunks a program. It reads no chunk_cols: with them overwritten the
    lists stay, while the gather's change. The cached plan of a later step carries both fields."""
    import dataclasses

    from gsa_rag.kernels.bench import synthetic_layout

    def tail(layout):
        return layout.append(torch.full((layout.batch_size, 1), 5, device=DEVICE))

    cases = [tail(synthetic_layout(3, 4 + 3 * 150, 2, device=DEVICE)), tail(synthetic_layout(2, 300, 8, device=DEVICE)),
             tail(synthetic_layout(2, 60, 5, sink=0, tail=3, device=DEVICE))]
    cases += [random_layout(seed + 80, batch=3, kv_reuse=seed % 2 == 1)[0] for seed in range(4)]
    g = torch.Generator().manual_seed(7)
    for i, layout in enumerate(cases):
        config = GistConfig(chunk_size=2, sink=4, k_policy="top_p")
        plan = DecodePlan.build(layout, config, 2)
        assert plan.contiguous, i
        B, T = layout.input_ids.shape
        C = layout.gist_index.shape[1]
        size = plan.chunk_size
        first = plan.chunk_cols.long().gather(1, plan.chunk_ptr[:, :C].long().clamp(max=plan.chunk_cols.shape[1] - 1))
        assert torch.equal(torch.where(size > 0, plan.chunk_first, -1), torch.where(size > 0, first.int(), -1)), i
        later = DecodePlan.build(layout.append(torch.full((B, 1), 7, device=DEVICE)), config, 2)
        assert later.contiguous and later.chunk_first is plan.chunk_first or layout.__dict__.get("_lineage") is None
        selected = torch.rand(B, 2, C, generator=g).to(DEVICE) < 0.4
        selected[0, 0] = True  # every chunk of one row
        for ends_mode in (ENDS_PREFIX, ENDS_BLOCKS):
            for per in (64, 128):
                lists = {}
                for contiguous in (True, False):
                    monkeypatch.setattr(gist_select, "EXPAND_CONTIGUOUS", contiguous)
                    lists[contiguous] = expand_poisoned(plan, selected, ends_mode, per)
                    assert_expansion_is_the_reference(plan, selected, T, *lists[contiguous],
                                                      (i, ends_mode, per, contiguous))
                assert torch.equal(lists[True][0], lists[False][0]) and torch.equal(lists[True][1], lists[False][1])
        # the contiguous path never reads chunk_cols: overwritten, the lists stay (the gather's do not)
        blind = dataclasses.replace(plan, chunk_cols=torch.full_like(plan.chunk_cols, T + 1))
        for contiguous in (True, False):
            monkeypatch.setattr(gist_select, "EXPAND_CONTIGUOUS", contiguous)
            index, _ = expand_poisoned(blind, selected, ENDS_BLOCKS, 64)
            assert torch.equal(index, lists[True][0]) == (contiguous or plan.chunk_cols.shape[1] == 0), (i, contiguous)


def _chunk_with_a_gap(kind):
    """A synthetic layout (chunk 4, batch 2) of which one row's chunk 2 is not one run of columns:
    "sink", a raw token inside it is a sink (base, so left out of the chunk's extra columns);
    "swap", its last raw token and the first of chunk 3 trade chunks."""
    import dataclasses

    from gsa_rag.kernels.bench import synthetic_layout

    layout = synthetic_layout(2, 4 + 5 * 12, 4, device=DEVICE)
    start = 4 + 2 * 5  # chunk 2: columns start..start+3 raw, start+4 its gist
    if kind == "sink":
        is_sink = layout.is_sink.clone()
        is_sink[1, start + 1] = True
        layout = dataclasses.replace(layout, is_sink=is_sink)
    else:
        chunk_id = layout.chunk_id.clone()
        chunk_id[0, start + 3], chunk_id[0, start + 5] = 3, 2
        layout = dataclasses.replace(layout, chunk_id=chunk_id)
    return layout.append(torch.full((2, 1), 5, device=DEVICE))


@pytest.mark.parametrize("kind", ["sink", "swap"])
def test_expansion_gathers_chunks_that_are_not_one_run(kind, monkeypatch):
    """A plan with a chunk whose extra columns have a gap is not `contiguous`: the expansion
    gathers through the CSR offsets even with EXPAND_CONTIGUOUS on and writes the reference's
    lists (both ways of placing chunks), where computing first + t would not (checked by forcing
    the flag)."""
    import dataclasses

    monkeypatch.setattr(gist_select, "EXPAND_CONTIGUOUS", True)
    layout = _chunk_with_a_gap(kind)
    plan = DecodePlan.build_full(layout, GistConfig(chunk_size=4, sink=4, k_policy="top_p"), 2)
    assert not plan.contiguous
    B, T = layout.input_ids.shape
    C = layout.gist_index.shape[1]
    g = torch.Generator().manual_seed(3)
    for trial in range(3):
        selected = torch.rand(B, 2, C, generator=g).to(DEVICE) < 0.5
        selected[:, :, 2:4] = trial != 2  # the chunks with a gap (2; 3 too by "swap"), once neither
        for ends_mode in (ENDS_PREFIX, ENDS_BLOCKS):
            index, lengths = expand_poisoned(plan, selected, ends_mode, 64)
            assert_expansion_is_the_reference(plan, selected, T, index, lengths, (kind, trial, ends_mode))
            forced = expand_poisoned(dataclasses.replace(plan, contiguous=True), selected, ends_mode, 64)
            assert torch.equal(forced[0], index) == (trial == 2), (kind, trial, ends_mode)


# --------------------------------------------------------------------------- sparse decode


def random_lists(B, H, T, cap, g):
    index = torch.stack([torch.stack([torch.randperm(T, generator=g)[:cap] for _ in range(H)]) for _ in range(B)])
    lengths = torch.randint(1, cap + 1, (B, H), generator=g)
    lengths[0, 0] = 1  # one key only (the query itself, in the engine)
    lengths[-1, -1] = cap
    return index.int().to(DEVICE), lengths.int().to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 4, 2, 64, 120, 50), (1, 9, 3, 64, 60, 33), (3, 8, 2, 128, 90, 64), (2, 32, 8, 128, 40, 17)])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_sparse_decode_matches_reference(dtype, shape, splits):
    B, Hq, Hkv, D, T, cap = shape
    g = torch.Generator().manual_seed(hash((shape, splits)) % 10_000)
    q = torch.randn(B, Hq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
    shared = splits == 3 and Hkv > 2  # one list for every head (non-selecting layers)
    index, lengths = random_lists(B, 1 if shared else Hkv, T, cap, g)
    ref = sparse_decode_ref(q.double(), k.double(), v.double(), index, lengths)
    out = torch.full((B, Hq, D), float("nan"), dtype=dtype, device=DEVICE)
    sparse_decode_triton(q, k, v, index, lengths, num_splits=splits, out=out)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("block_n,splits", [(16, 40), (16, None), (None, None)])
def test_sparse_decode_many_splits_and_blocks(block_n, splits):
    """Long lists: many blocks per split, more splits than the combine's block of 16, empty
    trailing splits of short heads, and the default split policy."""
    g = torch.Generator().manual_seed(7 + (splits or 0) + (block_n or 0))
    B, Hq, Hkv, D, T, cap = 2, 8, 2, 64, 700, 600
    q = torch.randn(B, Hq, D, generator=g).to(DEVICE, torch.bfloat16)
    k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, torch.bfloat16)
    v = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, torch.bfloat16)
    index, lengths = random_lists(B, Hkv, T, cap, g)
    ref = sparse_decode_ref(q.double(), k.double(), v.double(), index, lengths)
    out = torch.full((B, Hq, D), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    sparse_decode_triton(q, k, v, index, lengths, num_splits=splits, out=out, block_n=block_n)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_split_width_splits_a_wider_list_as_the_narrow_one():
    """A CUDA graph's list is wider than any step fills (gsa_rag.graph_decode): sized for the
    narrow width, the splits hold the same entries, so the output is the narrow list's, bit for
    bit (the trailing splits are empty, and the combine sums 16 splits at a time either way). The
    widths are picked so that the default splits of the two differ on this device; fp32, as a bf16
    output could round two different sums alike."""
    from gsa_rag.kernels.sparse_decode import default_split_len, num_sms

    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, D = 1, 4, 2, 64
    narrow = triton.cdiv(2 * num_sms(torch.device(DEVICE)), B * Hkv) * 128  # splits of 128 entries
    wide, T = 2 * narrow, 2 * narrow + 100  # splits of 256 by default
    assert default_split_len(narrow, B * Hkv, 64, torch.device(DEVICE)) != default_split_len(wide, B * Hkv, 64, torch.device(DEVICE))
    q = torch.randn(B, Hq, D, generator=g).to(DEVICE, torch.float32)
    k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, torch.float32)
    v = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, torch.float32)
    index, _ = random_lists(B, Hkv, T, wide, g)
    lengths = torch.full((B, Hkv), narrow - 3, dtype=torch.int32, device=DEVICE)
    want = sparse_decode_triton(q, k, v, index[..., :narrow].contiguous(), lengths)
    got = torch.full((B, Hq, D), float("nan"), dtype=torch.float32, device=DEVICE)
    sparse_decode_triton(q, k, v, index, lengths, out=got, split_width=narrow)
    assert torch.equal(got, want)


def test_sparse_decode_reads_strided_cache_and_writes_strided_output():
    """The HF cache layer tensor may be a view; the output goes straight into [B, 1, Hq, D]."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D, T = 2, 6, 2, 64, 80
    big_k = torch.randn(B, Hkv, T + 16, D, generator=g).to(DEVICE, torch.float16)
    big_v = torch.randn(B, Hkv, T + 16, D, generator=g).to(DEVICE, torch.float16)
    k, v = big_k[:, :, :T], big_v[:, :, :T]
    q = torch.randn(B, 1, Hq, D, generator=g).to(DEVICE, torch.float16).transpose(1, 2)[:, :, 0]
    index, lengths = random_lists(B, Hkv, T, 30, g)
    out = torch.full((B, 1, Hq, D), float("nan"), dtype=torch.float16, device=DEVICE)
    sparse_decode_triton(q, k, v, index, lengths, scale=0.1, out=out[:, 0])
    ref = sparse_decode_ref(q.double(), k.double(), v.double(), index, lengths, scale=0.1)
    assert rel_err(out[:, 0], ref) < TOL[torch.float16]


# --------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("permute", [False, True])
def test_gist_prefill_equals_dense_mask_attention(permute):
    for seed in range(2):
        layout, config = random_layout(seed + 30, kv_reuse=seed == 1)
        B, T = layout.input_ids.shape
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(B, 4, T, 16, generator=g).to(DEVICE)
        k = torch.randn(B, 2, T, 16, generator=g).to(DEVICE)
        v = torch.randn(B, 2, T, 16, generator=g).to(DEVICE)
        ref = gist_prefill_ref(q.double(), k.double(), v.double(), layout, config.num_previous_chunks)
        out = gist_prefill(q, k, v, layout, config.num_previous_chunks, permute=permute,
                           block_size=16 if DEVICE == "cpu" else 128)  # compiled flex wants 128
        assert rel_err(out, ref) < 1e-5


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("family,meta", [(LlamaConfig, ()), (Qwen2Config, ()), (LlamaConfig, (4,))])
def test_engine_decode_with_kernels_equals_reference(family, meta, monkeypatch):
    """A tiny random model: prefill, then decode steps with GSA_RAG_KERNELS=1 and =0, with one
    gist level and with H-GSA (meta-gists over 4 gists)."""
    from transformers import AutoModelForCausalLM

    import gsa_rag.attention  # noqa: F401  (registers "gsa")
    from gsa_rag.generation import forward

    torch.manual_seed(0)
    model_config = family(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation="gsa").eval().to(DEVICE)
    for seed in range(2):
        config = GistConfig(chunk_size=4, sink=2, top_k=2, meta_chunks=meta)
        rng = random.Random(seed)
        layout = build_layout([random_segments(rng, max_passages=4, max_len=40) for _ in range(2)],
                              config, FakeTokenizer()).to(DEVICE)
        tokens = torch.randint(1, 990, (3, 2, 1), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        logits = {}
        for mode in ("0", "1"):
            monkeypatch.setenv("GSA_RAG_KERNELS", mode)
            cache, lay, steps = DynamicCache(), layout, []
            with torch.no_grad():
                forward(model, lay, lay.seq_len, cache, config)
                for token in tokens:  # the same tokens in both modes
                    lay = lay.append(token)
                    out, state = forward(model, lay, 1, cache, config)
                    steps.append(out.logits[:, -1])
            logits[mode] = torch.stack(steps)
            assert bool(getattr(state, "_decode_plan", None)) == (mode == "1"), "the kernel path did not run"
        torch.testing.assert_close(logits["1"], logits["0"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [24, 8])
def test_head_dims_the_kernels_cannot_take_fall_back_to_the_reference(head_dim, monkeypatch):
    """Regression: the kernels index the head dim with tl.arange(0, D) (a power of two) and
    tl.dot (D >= 16); a model with another head dim (e.g. 80, 96, 100) crashed on CUDA
    instead of taking the reference path."""
    monkeypatch.setenv("GSA_RAG_KERNELS", "1")
    layout, config = random_layout(50)
    config = GistConfig(chunk_size=config.chunk_size, sink=config.sink, top_k=2)
    B, T = layout.input_ids.shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, 4, 1, head_dim, generator=g).to(DEVICE)
    k, v = (torch.randn(B, 2, T, head_dim, generator=g).to(DEVICE) for _ in range(2))
    module = torch.nn.Module()
    module.layer_idx = 1
    state = GistState.for_new_tokens(layout, 1, config)
    assert dispatch.sparse_decode_attention(module, q, k, v, 0.25, state) is None


def test_kernel_path_gives_the_hook_the_engine_mask(monkeypatch):
    """Gist memory's hook (fetch offloaded raw KV) sees the same visible columns on both paths."""
    monkeypatch.setenv("GSA_RAG_KERNELS", "1")
    layout, config = random_layout(50)
    config = GistConfig(chunk_size=config.chunk_size, sink=config.sink, top_k=2)
    B, T = layout.input_ids.shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, 4, 1, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(B, 2, T, 16, generator=g).to(DEVICE) for _ in range(2))
    seen = []
    state = GistState.for_new_tokens(layout, 1, config)
    state.hook = lambda layer, query, key, value, mask: seen.append(mask)
    module = torch.nn.Module()
    module.layer_idx = 1
    out, _ = dispatch.sparse_decode_attention(module, q, k, v, 0.25, state)
    want = GistState.for_new_tokens(layout, 1, config).mask_for_layer(1, q, k)
    assert len(seen) == 1 and torch.equal(seen[0], want)
    assert torch.equal(state.attended[1], want[:, :, -1].sum(-1).float())
    assert out.shape == (B, 1, 4, 16) and not out.isnan().any()


@pytest.mark.parametrize("ends_mode,union_kernel", [(ENDS_PREFIX, False), (ENDS_BLOCKS, False), (ENDS_BLOCKS, True)])
@pytest.mark.parametrize("search", [SEARCH_BISECT, SEARCH_INTERP])
def test_select_kernel_on_a_row_without_chunks_writes_nothing_out_of_bounds(ends_mode, union_kernel, search):
    """C == 0 (no chunk closed yet): the union's `ends` output has no room, so nothing may be
    stored there (the block-sum tail once stored one sum unmasked: an illegal address on a GPU);
    the union by each group's last select program, or by a launch of its own."""
    B, Hq, Hkv = 2, 4, 2
    scores = torch.empty(B, Hq, 0, device=DEVICE)
    guard = torch.full((B, Hkv, 1), -7, dtype=torch.int32, device=DEVICE)  # ends' storage, one slot past its 0 width
    ends = guard[:, :, :0]
    sizes = torch.empty(B, Hkv, 0, dtype=torch.int32, device=DEVICE)
    picks = torch.empty(B, Hq, 0, dtype=torch.int8, device=DEVICE)
    counters = torch.zeros(B * Hkv, dtype=torch.int32, device=DEVICE)
    k = torch.full((B,), 3, dtype=torch.long, device=DEVICE)
    ptr = torch.zeros(B, 1, dtype=torch.int32, device=DEVICE)
    topk_union_launch(scores, k, ptr, ptr.stride(0), picks, sizes, ends, counters, Hkv, ends_mode=ends_mode, search=search,
                      union_kernel=union_kernel)
    assert bool((guard == -7).all())
    assert bool((counters == (0 if union_kernel else Hq // Hkv)).all())  # the tail ran where it is the union
