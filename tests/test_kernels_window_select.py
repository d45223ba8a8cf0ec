"""The window select (gsa_rag.kernels.window_select) against the reference's picks.

Each row's threshold and tie cut, turned back into picks, must be the reference's set (stable
argsort: ties to the lower chunk index, never a missing chunk) on rows that stress a threshold
search, whole or split over parts; the resolution path each row took is checked too, so that a
window that always missed (and fell back to the whole row) would fail here rather than only be
slow. Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton not installed")

from gsa_rag.kernels import gist_select, window_select
from gsa_rag.kernels.gist_select import ENDS_BLOCKS, ENDS_PREFIX, select_counters, topk_union_triton
from gsa_rag.kernels.window_select import PATH_ENDS, PATH_FIT, PATH_ROW, PATH_SAMPLE, window_select_launch
from test_kernels import DEVICE, OVERFLOW_OK, hard_rows

from gsa_rag.selection import choose_chunks, union_over_groups


def run(scores: torch.Tensor, k: torch.Tensor, part: int | None = None):
    """(picks bool [B, Hq, C], paths int [B * Hq], counters [B * Hq, 4]) of one launch, outputs poisoned."""
    B, Hq, C = scores.shape
    counters = select_counters(B, Hq, DEVICE).zero_()
    thresholds = torch.full((B * Hq,), float("nan"), device=DEVICE)
    cuts = torch.full((B * Hq,), -7, dtype=torch.int32, device=DEVICE)
    paths = torch.full((B * Hq,), -1, dtype=torch.int32, device=DEVICE)
    x = scores.to(DEVICE).contiguous()
    window_select_launch(x, k.to(DEVICE), counters, thresholds, cuts, part=part, paths=paths)
    x = x.view(B * Hq, C)
    t, cut = thresholds[:, None], cuts[:, None]
    ties = (x == t) & (torch.arange(C, device=DEVICE)[None] < cut)
    picks = (x > float("-inf")) & ((x > t) | ties)
    return picks.view(B, Hq, C).cpu(), paths.cpu(), counters.view(B * Hq, -1).cpu()


def reference(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return choose_chunks(scores[:, :, None], k=k)[:, :, 0]


@OVERFLOW_OK
@pytest.mark.parametrize("C,part", [(5, None), (300, None), (300, 64), (2500, None), (2500, 512)])
def test_window_select_picks_the_reference_sets_on_hard_rows(C, part):
    """`hard_rows` (normal, tied, outliers, denormals, all equal, +-0.0, magnitudes 1e-30..1e30, q.k,
    two clusters; -inf padding) with k = 0, 1, 2, 3, C / 32, C / 2, C - 2, C - 1, C, C + 3, each row
    one program or split over parts of 64 / 512 scores (so the last program of a row to arrive
    resolves it): the reference's set per row; every part arrived and counted its finite scores."""
    g = torch.Generator().manual_seed(C + (part or 0))
    k = torch.tensor([0, 1, 2, 3, max(1, C // 32), C // 2, max(0, C - 2), C - 1, C, C + 3])
    scores = hard_rows(len(k), C, g)
    got, paths, counters = run(scores, k, part)
    want = reference(scores, k)
    for b in range(len(k)):
        for h in range(scores.shape[1]):
            assert torch.equal(got[b, h], want[b, h]), (C, part, int(k[b]), h, int(paths[b * scores.shape[1] + h]))
    parts = 1 if part is None else -(-C // part)
    assert bool((counters[:, 0] == parts).all())
    assert torch.equal(counters[:, 3], torch.isfinite(scores).sum(-1).flatten().int())
    assert bool(((paths >= PATH_ENDS) & (paths <= PATH_ROW)).all())


@OVERFLOW_OK
def test_normal_rows_resolve_in_the_fit_window_and_others_in_the_sample_window():
    """Which way rows are resolved, on rows of 3,000 scores split over three parts, k = C / 8 (the
    decode benchmark's budget) and C / 50: normal rows and bf16 q . k rows from the normal fit's
    window; heavy-tailed rows (exponential, lognormal) from the sample's order statistics, never
    the whole row; every row the reference's set. A candidate list smaller than the window's
    (WINDOW_CAP 16) sends every row to the whole-row search, with the same picks; k = 0 and k past
    the finite scores need no search."""
    g = torch.Generator().manual_seed(7)
    B, C = 2, 3000
    k = torch.tensor([C // 8, C // 50])
    normal = torch.randn(B, 6, C, generator=g)
    q = torch.randn(B, 6, 64, generator=g).bfloat16().float()
    qk = torch.einsum("bhd,bcd->bhc", q, torch.randn(B, C, 64, generator=g).bfloat16().float())
    expo = -torch.log(torch.rand(B, 6, C, generator=g))
    lognormal = torch.exp(2 * torch.randn(B, 6, C, generator=g))
    for rows, fit_only in ((normal, True), (qk, True), (expo, False), (lognormal, False)):
        got, paths, _ = run(rows, k, part=1024)
        assert torch.equal(got, reference(rows, k))
        want = {PATH_FIT} if fit_only else {PATH_FIT, PATH_SAMPLE}
        assert set(paths.tolist()) <= want and (fit_only or PATH_SAMPLE in paths.tolist()), paths.tolist()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(window_select, "WINDOW_CAP", 16)
        mp.setattr(window_select, "WINDOW_CAP_SHARE", 0.0)
        got, paths, _ = run(normal, k, part=1024)
        assert torch.equal(got, reference(normal, k))
        assert set(paths.tolist()) == {PATH_ROW}
    ends = torch.tensor([0, C + 5])
    got, paths, _ = run(normal, ends, part=1024)
    assert torch.equal(got, reference(normal, ends))
    assert set(paths.tolist()) == {PATH_ENDS}


@OVERFLOW_OK
@pytest.mark.parametrize("G", [1, 3, 4])
def test_topk_union_through_the_window_select_is_the_reference_union(G, monkeypatch):
    """`topk_union_launch` with the window select and the union kernel reading the scores against
    the thresholds: the GQA union of the reference's sets, its sizes and block sums, on random,
    tied and -0.0 / +0.0 rows, k from 0 past the chunks that exist (UNION_TILE 64 chunks, so rows
    span several union programs; parts of 128 scores)."""
    monkeypatch.setattr(gist_select, "UNION_TILE", 64)
    monkeypatch.setattr(window_select, "WINDOW_PART_MIN", 128)
    g = torch.Generator().manual_seed(G)
    for trial in range(5):
        B, Hkv = 2, 2
        Hq = Hkv * G
        C = int(torch.randint(1, 700, (), generator=g))
        scores = torch.randn(B, Hq, C, generator=g)
        if trial % 3 == 0:
            scores = torch.randint(-3, 3, (B, Hq, C), generator=g).float()
        if trial % 4 == 1:
            scores = torch.where(scores > 1, -0.0, torch.where(scores < -1, 0.0, scores))
        num_chunks = torch.randint(0, C + 1, (B,), generator=g)
        num_chunks[0] = C
        scores = torch.where(torch.arange(C)[None, None] < num_chunks[:, None, None], scores, float("-inf"))
        k = torch.randint(0, C + 3, (B,), generator=g)
        sizes = torch.randint(1, 4, (B, C), generator=g)
        ptr = torch.cat([torch.zeros(B, 1, dtype=torch.long), sizes.cumsum(-1)], 1).int()
        plan = SimpleNamespace(k=k.to(DEVICE), chunk_ptr=ptr.to(DEVICE))
        got, got_sizes = topk_union_triton(scores.to(DEVICE), plan, Hkv, ends_mode=ENDS_BLOCKS, window=True)
        want = union_over_groups(choose_chunks(scores[:, :, None], k=k), Hkv)[:, :, 0]
        assert torch.equal(got.cpu(), want), (G, trial)
        assert torch.equal(got_sizes.cpu(), torch.where(want, sizes[:, None].int(), 0)), (G, trial)


@OVERFLOW_OK
def test_the_window_select_runs_where_the_search_would_stream_few_rows(monkeypatch):
    """By default (WINDOW_SELECT) the window select takes rows longer than TOPK_MAX_CHUNKS (which the
    search kernel streams) where they are at most half the SMs and the union runs apart; elsewhere
    the search kernel does. Either way the reference's union."""
    calls = []
    launch = gist_select.window_select_launch
    monkeypatch.setattr(gist_select, "window_select_launch", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    monkeypatch.setattr(gist_select, "TOPK_MAX_CHUNKS", 32)
    monkeypatch.setattr(gist_select, "STREAM_TILE", 64)
    monkeypatch.setattr(gist_select, "num_sms", lambda device: 8)  # 4 rows a batch row: batch 1 fits
    g = torch.Generator().manual_seed(3)
    for B, C, ends_mode, switch, want_window in ((1, 40, ENDS_BLOCKS, True, True), (1, 32, ENDS_BLOCKS, True, False),
                                                 (2, 40, ENDS_BLOCKS, True, False), (1, 40, ENDS_PREFIX, True, False),
                                                 (1, 40, ENDS_BLOCKS, False, False)):
        monkeypatch.setattr(gist_select, "WINDOW_SELECT", switch)
        scores = torch.randn(B, 4, C, generator=g)
        k = torch.full((B,), 5)
        ptr = torch.arange(C + 1, dtype=torch.int32, device=DEVICE).expand(B, -1)  # one row for all (stride 0)
        plan = SimpleNamespace(k=k.to(DEVICE), chunk_ptr=ptr)
        calls.clear()
        got, _ = topk_union_triton(scores.to(DEVICE), plan, 2, ends_mode=ends_mode)
        assert bool(calls) == want_window, (B, C, ends_mode, switch)
        assert torch.equal(got.cpu(), union_over_groups(choose_chunks(scores[:, :, None], k=k), 2)[:, :, 0])


def test_the_window_select_asks_for_what_it_needs():
    """It needs the union kernel (it writes no pick rows) and COUNTER_WORDS counters a row."""
    scores = torch.zeros(1, 2, 8, device=DEVICE)
    plan = SimpleNamespace(k=torch.ones(1, dtype=torch.long, device=DEVICE),
                           chunk_ptr=torch.arange(9, dtype=torch.int32, device=DEVICE)[None])
    with pytest.raises(ValueError, match="needs the union as a launch of its own"):
        topk_union_triton(scores, plan, 1, ends_mode=ENDS_PREFIX, window=True)
    out = torch.empty(2, device=DEVICE)
    with pytest.raises(ValueError, match="the window select needs 8"):
        window_select_launch(scores, plan.k, torch.zeros(4, dtype=torch.int32, device=DEVICE), out,
                             out.int())
