"""H-GSA decode through the kernels (gsa_rag.kernels.hier_select) against the engine's reference.

The reference is the engine's own mask for the decode row (`GistState.mask_for_layer`:
`select_hierarchical` + `dense_unfold_mask(..., sections)`); fresh random inputs every case,
outputs poisoned with NaN before every kernel run. Without CUDA the kernels run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay small.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton not installed")

from fakes import FakeTokenizer, random_segments
from gsa_rag.kernels import dispatch, gist_select
from gsa_rag.kernels.bench import synthetic_hier_layout
from gsa_rag.kernels.gist_select import DecodePlan
from gsa_rag.kernels.hier_select import HierPlan, select_hier_index_list, select_hier_index_list_triton
from gsa_rag.kernels.sparse_decode import sparse_decode_triton

from gsa_rag.attention import GistState
from gsa_rag.config import GistConfig
from gsa_rag.layout import build_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    dispatch._interpreter_compat()
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}  # as tests/test_kernels.py
# (chunk_size, *meta_chunks): H-GSA 16x and 32x (two levels), 16x over three levels
HIERARCHIES = [(4, 4), (8, 4), (4, 2, 2)]


def random_hier_layout(seed: int, hierarchy: tuple[int, ...], policy: str = "fixed", beam: bool = False):
    """Two sequences of different lengths (left padding), context then question, one generated token.
    beam: sections kept above the chunks = top_k + 2 (GistConfig.section_top_k)."""
    rng = random.Random(seed)
    top_k = rng.randrange(1, 4)
    config = GistConfig(chunk_size=hierarchy[0], meta_chunks=hierarchy[1:], sink=rng.randrange(0, 5),
                        num_previous_chunks=rng.randrange(0, 3), word_aware=rng.random() < 0.5,
                        top_k=top_k, k_policy=policy, top_p=0.5, section_top_k=top_k + 2 if beam else None)
    rows = [random_segments(rng, max_passages=4, max_len=rng.choice([30, 120])) for _ in range(2)]
    layout = build_layout(rows, config, FakeTokenizer())
    layout = layout.append(torch.randint(1, 990, (2, 1), generator=torch.Generator().manual_seed(seed)))
    return layout.to(DEVICE), config


def decode_inputs(layout, seed: int, Hq: int = 4, Hkv: int = 2, D: int = 16):
    """Fresh random query [B, Hq, D] and key cache [B, Hkv, T, D] for the layout's decode step."""
    g = torch.Generator().manual_seed(seed)
    B, T = layout.input_ids.shape
    return torch.randn(B, Hq, D, generator=g).to(DEVICE), torch.randn(B, Hkv, T, D, generator=g).to(DEVICE)


def reference_rows(layout, config, q, k, layer):
    """bool [B, Hkv, T]: the decode row of the engine's mask, per KV head."""
    state = GistState.for_new_tokens(layout, 1, config)
    return state.mask_for_layer(layer, q[:, :, None], k)[:, :, -1].expand(-1, k.shape[1], -1)


def as_sets(index, lengths, B, H):
    index, lengths = index.expand(B, H, -1), lengths.expand(B, H)
    return [[sorted(index[b, h, : lengths[b, h]].tolist()) for h in range(H)] for b in range(B)]


def assert_lists_are_the_mask(index, lengths, want, context):
    B, H, _ = want.shape
    assert index.shape[-1] >= int(lengths.max()), context
    got = as_sets(index, lengths, B, H)
    for b in range(B):
        for h in range(H):
            assert len(got[b][h]) == int(lengths.expand(B, H)[b, h]) == len(set(got[b][h])), context  # no column twice
            assert got[b][h] == torch.nonzero(want[b, h]).flatten().tolist(), (context, b, h)


@pytest.mark.parametrize("hierarchy,policy,beam,streamed", [
    *[(h, policy, beam, False) for h in HIERARCHIES for policy, beam in (("fixed", False), ("top_p", False),
                                                                          ("fixed", True))],
    ((4, 2, 2), "fixed", False, True)])
def test_hier_key_list_is_the_engine_mask(hierarchy, policy, beam, streamed, monkeypatch):
    """Per (batch, KV head) the list holds exactly the reference mask's decode row: selecting
    and non-selecting layers, GQA 4 query / 2 KV heads, two rows of different lengths; with
    `beam`, more sections than chunks per head (section_top_k); `streamed`: every level's select
    kernel streams its candidate rows (as rows past TOPK_MAX_CHUNKS do)."""
    if streamed:
        monkeypatch.setattr(gist_select, "TOPK_MAX_CHUNKS", 0)
        monkeypatch.setattr(gist_select, "STREAM_TILE", 64)
    chose_fewer = 0
    for seed in range(4):
        layout, config = random_hier_layout(seed, hierarchy, policy, beam)
        q, k = decode_inputs(layout, seed)
        plan = HierPlan.build(layout, config, 2)
        for layer in (0, 1):
            want = reference_rows(layout, config, q, k, layer)
            index, lengths = select_hier_index_list(q, k, layout, plan, config, layer)
            assert_lists_are_the_mask(index, lengths, want, (hierarchy, policy, seed, layer))
        # the unfold walk (and the base copy) in steps of 4: offsets carried across steps (the default step
        # holds these rows whole)
        stepped = select_hier_index_list_triton(q, k, layout, plan, config, block=4)
        assert_lists_are_the_mask(*stepped, want, (hierarchy, policy, seed, "block 4"))
        unfolded = (want & ~layout.is_gist[:, None]).sum(-1)
        chose_fewer += int((unfolded < (layout.valid & ~layout.is_gist).sum(-1)[:, None]).sum())
    assert chose_fewer > 0, "every case unfolded everything: selection was not exercised"


@pytest.mark.parametrize("hierarchy", [(4, 4), (4, 2, 2)])
def test_cached_hier_plan_of_appended_layouts_equals_a_fresh_plan(hierarchy):
    """Decode steps grown by append reuse the lineage's plan: lists equal a fresh plan's and the mask."""
    layout, config = random_hier_layout(7, hierarchy)
    g = torch.Generator().manual_seed(7)
    first = None
    for step in range(3):
        layout = layout.append(torch.randint(1, 990, (layout.batch_size, 1), generator=g).to(DEVICE))
        plan = HierPlan.build(layout, config, 2)
        first = first or plan
        assert plan.child_ptr is first.child_ptr  # later steps: from the lineage cache, not rebuilt
        fresh = HierPlan._build(layout, config, 2, DecodePlan.build_full(layout, config, 2))
        assert plan.capacity == fresh.capacity and plan.slots == fresh.slots
        q, k = decode_inputs(layout, step)
        want = reference_rows(layout, config, q, k, 1)
        assert_lists_are_the_mask(*select_hier_index_list(q, k, layout, plan, config, 1), want, hierarchy)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "unwritten (poisoned) or NaN output"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def reference_attention(q, k, v, rows, scale):
    """float64 softmax attention of one decode row under bool rows [B, Hkv, T] -> [B, Hq, D]."""
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhtd->bht", q.double(), k) * scale
    s = s.masked_fill(~rows.repeat_interleave(G, 1), float("-inf"))
    return torch.einsum("bht,bhtd->bhd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hierarchy", HIERARCHIES)
def test_hier_decode_through_dispatch_equals_reference_attention(dtype, hierarchy, monkeypatch):
    """`sparse_decode_attention` takes hierarchical layouts (GSA_RAG_KERNELS=1): its output, and
    sparse flash-decode over its list into a poisoned buffer, equal float64 attention under the
    reference mask; the hook gets the reference mask."""
    monkeypatch.setenv("GSA_RAG_KERNELS", "1")
    layout, config = random_hier_layout(11 + len(hierarchy), hierarchy)
    B, T = layout.input_ids.shape
    Hq, Hkv, D = 4, 2, 32
    g = torch.Generator().manual_seed(hash((dtype, hierarchy)) % 10_000)
    q = torch.randn(B, Hq, 1, D, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    module = torch.nn.Module()
    module.layer_idx = 1
    seen = []
    state = GistState.for_new_tokens(layout, 1, config)
    state.hook = lambda layer, query, key, value, mask: seen.append(mask)
    out, _ = dispatch.sparse_decode_attention(module, q, k, v, 0.3, state)
    assert isinstance(state._decode_plan, HierPlan)
    want = GistState.for_new_tokens(layout, 1, config).mask_for_layer(1, q, k)
    assert len(seen) == 1 and torch.equal(seen[0], want)
    assert torch.equal(state.attended[1], want[:, :, -1].sum(-1).float())
    ref = reference_attention(q[:, :, 0], k, v, want[:, :, -1], 0.3)
    assert rel_err(out[:, 0], ref) < TOL[dtype]
    index, lengths = select_hier_index_list(q[:, :, 0], k, layout, state._decode_plan, config, 1)
    poisoned = torch.full((B, Hq, D), float("nan"), dtype=dtype, device=DEVICE)
    sparse_decode_triton(q[:, :, 0], k, v, index, lengths, 0.3, out=poisoned)
    assert rel_err(poisoned, ref) < TOL[dtype]


@pytest.mark.parametrize("hierarchy", [(4, 4), (4, 2, 2)])
@pytest.mark.parametrize("section_top_k", [None, 3])
def test_gist_keys_scored_per_step_do_not_grow_with_the_chunks(hierarchy, section_top_k):
    """The scoring kernel's own count of the gist keys it read: every top-level gist, and below
    it at most (units chosen one level up) x (children per section) per level, whatever the
    context; single-level GSA would read every chunk's gist. Context grows 8x."""
    chunk, meta = hierarchy[0], hierarchy[1:]
    config = GistConfig(chunk_size=chunk, meta_chunks=meta, sink=4, top_k=2, word_aware=False, section_top_k=section_top_k)
    Hq, Hkv, D = 4, 2, 16
    G = Hq // Hkv
    below_bound = sum(G * config.level_top_k(1) * c for c in meta)  # per level: G*k sections chosen, c children each
    counts = {}
    for context in (300, 2400):
        layout = synthetic_hier_layout(2, context, chunk, meta, device=DEVICE)
        layout = layout.append(torch.full((2, 1), 5, device=DEVICE))
        q, k = decode_inputs(layout, context, Hq, Hkv, D)
        plan = HierPlan.build(layout, config, G)
        scored = torch.zeros(layout.batch_size * Hkv, dtype=torch.int32, device=DEVICE)
        index, lengths = select_hier_index_list(q, k, layout, plan, config, 1, scored=scored)
        assert_lists_are_the_mask(index, lengths, reference_rows(layout, config, q, k, 1), context)
        top = int(layout.num_sections[0, -1])
        below = scored.cpu() - top
        assert bool((below > 0).all()) and bool((below <= below_bound).all()), (context, scored, top)
        counts[context] = (int(layout.num_chunks[0]), top, int(below.max()))
    (c1, _, _), (c8, top8, below8) = counts[300], counts[2400]
    assert c8 >= 7 * c1  # the context (and the chunks) grew ~8x
    assert below8 <= below_bound and top8 + below8 < c8 / 2  # far fewer keys than one per chunk
    assert top8 == -(-c8 // math.prod(meta))  # the top level: one gist per `ratio` chunks (one passage)


def test_dispatch_declines_what_the_hierarchical_kernels_do_not_serve(monkeypatch):
    """None (the reference path) for a hierarchical layout under an adaptive-k config (the
    reference takes a fixed k per level) and for a head dim the kernels cannot take."""
    monkeypatch.setenv("GSA_RAG_KERNELS", "1")
    layout, config = random_hier_layout(3, (4, 4))
    module = torch.nn.Module()
    module.layer_idx = 1
    adaptive = GistConfig(chunk_size=4, k_policy="adaptive")  # single-level config, hierarchical layout
    for cfg, D in ((adaptive, 16), (config, 24)):
        q, k = decode_inputs(layout, 0, D=D)
        state = GistState.for_new_tokens(layout, 1, cfg)
        assert dispatch.sparse_decode_attention(module, q[:, :, None], k, k, 0.25, state) is None
