import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_rag.config import GistConfig
from gsa_rag.selection import ChunkSelector, adaptive_k, choose_chunks, gist_scores, select_chunks, union_over_groups


def random_problem(seed, B=2, Hq=4, Hkv=2, Tq=3, T=40, C=6, D=8):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, Hq, Tq, D, generator=g)
    key = torch.randn(B, Hkv, T, D, generator=g)
    num_chunks = torch.randint(0, C + 1, (B,), generator=g)
    gist_index = torch.stack([torch.randperm(T, generator=g)[:C].sort().values for _ in range(B)])
    gist_valid = torch.arange(C)[None] < num_chunks[:, None]
    return query, key, gist_index, gist_valid


def test_scores_are_raw_dot_products_with_gist_keys():
    query, key, gist_index, gist_valid = random_problem(0)
    scores = gist_scores(query, key, gist_index, gist_valid)
    b, h, t, c = 1, 3, 2, 0
    if gist_valid[b, c]:
        want = query[b, h, t] @ key[b, h // 2, gist_index[b, c]]
        torch.testing.assert_close(scores[b, h, t, c], want)
    assert torch.isinf(scores[~gist_valid[:, None, None, :].expand_as(scores)]).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 10), st.sampled_from(["fixed", "adaptive", "top_p"]))
def test_selection_never_picks_missing_chunks_and_unions_groups(seed, k, policy):
    query, key, gist_index, gist_valid = random_problem(seed)
    config = GistConfig(k_policy=policy, top_k=k, top_p=0.5)
    selected = select_chunks(query, key, gist_index, gist_valid, torch.tensor([40, 13]), config)
    assert selected.shape == (2, 2, 3, 6)
    assert not (selected & ~gist_valid[:, None, None, :]).any()
    # each row with chunks selects at least one (k >= 1, top_p keeps the best)
    has = gist_valid.any(-1)
    assert selected.any(-1)[has].all()
    if policy == "fixed":
        per_head = choose_chunks(gist_scores(query, key, gist_index, gist_valid), k=torch.full((2,), k))
        n = gist_valid.sum(-1).clamp(max=k)
        assert torch.equal(per_head.sum(-1), n[:, None, None].expand(2, 4, 3))
        assert torch.equal(selected, union_over_groups(per_head, 2))


@pytest.mark.parametrize("policy", ["fixed", "adaptive", "top_p"])
def test_one_selector_serves_every_layer_as_the_reference_would(policy):
    """The attention keeps one ChunkSelector per forward (its k and gist columns worked out at the
    first layer): each later layer's queries and keys, and a change of heads (group size 2 -> 1,
    which changes adaptive k), give choose_chunks over gist_scores, united per KV head."""
    _, _, gist_index, gist_valid = random_problem(3, C=24)
    gist_valid[0] = True  # 24 chunks: adaptive k (below its cap of 6) is 3 at group size 2, 5 at 1
    context_len = torch.tensor([8, 13])
    config = GistConfig(k_policy=policy, top_k=2, top_p=0.5, adaptive_ratio=1, chunk_size=2)
    selector = ChunkSelector(gist_index, gist_valid, context_len, config)
    g = torch.Generator().manual_seed(7)
    for layer, (Hq, Hkv) in enumerate([(4, 2), (4, 2), (4, 2), (2, 2), (6, 3)]):
        q = torch.randn(2, Hq, 3, 8, generator=g)
        k = torch.randn(2, Hkv, 40, 8, generator=g)
        scores = gist_scores(q, k, gist_index, gist_valid)
        if policy == "top_p":
            chosen = choose_chunks(scores, top_p=0.5, scale=1 / math.sqrt(8))
        else:
            per_row = adaptive_k(context_len, gist_valid.sum(-1), Hq // Hkv, config) if policy == "adaptive" else None
            chosen = choose_chunks(scores, k=per_row if per_row is not None else torch.full((2,), 2))
        assert torch.equal(selector(q, k), union_over_groups(chosen, Hkv)), layer


def test_k_at_least_number_of_chunks_selects_all():
    query, key, gist_index, gist_valid = random_problem(1)
    selected = select_chunks(query, key, gist_index, gist_valid, torch.tensor([40, 40]), GistConfig(top_k=6))
    assert torch.equal(selected, gist_valid[:, None, None, :].expand_as(selected))


def test_top_k_takes_the_highest_scores():
    scores = torch.tensor([[[[0.1, 5.0, -1.0, 3.0, float("-inf")]]]])
    chosen = choose_chunks(scores, k=torch.tensor([2]))
    assert chosen.flatten().tolist() == [False, True, False, True, False]
    # top_p: one dominant chunk is enough
    chosen = choose_chunks(torch.tensor([[[[0.0, 50.0, 0.0]]]]), top_p=0.9)
    assert chosen.flatten().tolist() == [False, True, False]


def test_gqa_union():
    chosen = torch.zeros(1, 4, 1, 3, dtype=torch.bool)
    chosen[0, 0, 0, 0] = chosen[0, 1, 0, 2] = chosen[0, 3, 0, 1] = True
    assert union_over_groups(chosen, 2)[0, :, 0].tolist() == [[True, False, True], [False, True, False]]


@pytest.mark.parametrize("L,chunks,G,c,ratio", [(1000, 100, 3, 8, 8.0), (100, 10, 1, 8, 2.0), (50000, 6000, 4, 16, 8.0), (10, 1, 2, 8, 8.0)])
def test_adaptive_k_formula(L, chunks, G, c, ratio):
    config = GistConfig(chunk_size=c, adaptive_ratio=ratio)
    k = adaptive_k(torch.tensor([L]), torch.tensor([chunks]), G, config)
    assert k.item() == min(math.floor(L / (ratio * G * c)) + 1, max(1, chunks // 4))


def test_position_free_experiment_patches_what_selection_scores_through(monkeypatch):
    """benchmarks/selection_diagnosis.py --position-free swaps the scoring function: it must be the
    one select_chunks (and H-GSA's gist_scores) call, and it must drop the RoPE distance."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    from gsa_rag import selection

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "selection_diagnosis.py"
    spec = importlib.util.spec_from_file_location("selection_diagnosis", path)
    diagnosis = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnosis)

    class Rotator:  # KeyRotator stand-in: "rotating" by -position subtracts it from every entry
        def __init__(self, model):
            pass

        def rotate(self, x, positions):
            return x + positions.to(x.dtype).view(*([1] * (x.dim() - 2)), -1, 1)

    monkeypatch.setattr("gsa_rag.cache.KeyRotator", Rotator)
    monkeypatch.setattr(selection, "_gist_scores", selection._gist_scores)  # restored after the test
    query, key, gist_index, gist_valid = random_problem(5, B=1)
    layout = SimpleNamespace(batch_size=1, position_ids=torch.arange(40)[None] * 3)
    plain = select_chunks(query, key, gist_index, gist_valid, torch.tensor([40]), GistConfig(top_k=2))
    diagnosis.position_free_scoring(SimpleNamespace(model=None), {"layout": layout})
    # the scores of the query and gist keys each taken back by its own position
    q0 = query - layout.position_ids[0, -query.shape[2]:].float().view(1, 1, -1, 1)
    k0 = torch.gather(key, 2, gist_index[:, None, :, None].expand(1, key.shape[1], -1, key.shape[-1]))
    k0 = k0 - layout.position_ids[0].gather(0, gist_index[0]).float().view(1, 1, -1, 1)
    want = (q0.view(1, 2, 2, 3, -1) @ k0[:, :, None].transpose(-1, -2)).view(1, 4, 3, -1)  # G = 2 heads per KV head
    want = want.masked_fill(~gist_valid[:, None, None, :], float("-inf"))
    chosen = union_over_groups(choose_chunks(want, k=torch.tensor([2])), 2)
    free = select_chunks(query, key, gist_index, gist_valid, torch.tensor([40]), GistConfig(top_k=2))
    assert torch.equal(free, chosen) and not torch.equal(free, plain)
    assert torch.allclose(selection.gist_scores(query, key, gist_index, gist_valid), want)
