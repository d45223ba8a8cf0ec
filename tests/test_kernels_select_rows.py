"""The selection of a question's rows through the decode path's kernels
(gsa_rag.kernels.gist_select.select_rows_triton) against the reference, selection.ChunkSelector.

Without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1). Integer
queries and keys make the scores exact, so ties straddle the k-th place and the sets must match
exactly (ties to the lower chunk index); normal inputs check the general case.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton not installed")

from gsa_rag.kernels import dispatch
from gsa_rag.kernels.gist_select import select_rows_triton

from gsa_rag.config import GistConfig
from gsa_rag.selection import ChunkSelector

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    dispatch._interpreter_compat()  # run-time loop bounds under Triton's interpreter


def inputs(Hq, Hkv, R, T, D, C, exist, integer, g):
    if integer:  # few distinct scores: many exact ties
        q = torch.randint(-2, 3, (1, Hq, R, D), generator=g).float()
        k = torch.randint(-2, 3, (1, Hkv, T, D), generator=g).float()
    else:
        q, k = torch.randn(1, Hq, R, D, generator=g), torch.randn(1, Hkv, T, D, generator=g)
    gist_index = torch.sort(torch.randperm(T, generator=g)[:C]).values[None]
    gist_valid = torch.arange(C)[None] < exist
    return q, k, gist_index, gist_valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,R,C,exist", [
    (8, 2, 5, 40, 40),     # G 4
    (4, 4, 3, 70, 61),     # G 1; the last chunks missing
    (6, 2, 9, 33, 9),      # more rows, k near the chunks that exist
])
@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
def test_select_rows_kernel_picks_the_reference_sets(dtype, Hq, Hkv, R, C, exist, policy):
    T, D = 3 * C, 16
    config = GistConfig(chunk_size=4, sink=2, top_k=3, k_policy=policy, adaptive_ratio=2)
    g = torch.Generator().manual_seed(R * C)
    for trial in range(2):  # integer inputs (ties), then normal
        q, key, gist_index, gist_valid = inputs(Hq, Hkv, R, T, D, C, exist, integer=trial % 2 == 0, g=g)
        q, key = q.to(DEVICE, dtype), key.to(DEVICE, dtype)
        gist_index, gist_valid = gist_index.to(DEVICE), gist_valid.to(DEVICE)
        context_len = torch.tensor([T], device=DEVICE)
        selector = ChunkSelector(gist_index, gist_valid, context_len, config)
        want = selector(q, key)
        k = selector.chunks_per_head(Hq // Hkv).expand(R).contiguous()
        got = select_rows_triton(q, key, gist_index, gist_valid.sum(-1), k)
        assert got.shape == want.shape == (1, Hkv, R, C)
        assert torch.equal(got.cpu(), want.cpu()), (trial, (got != want).sum().item())


def test_select_rows_kernel_on_strided_rows_and_k_per_row():
    """Rows cut from a longer forward (a strided view, as attention.layer_mask passes them), and
    a k of its own for each row (0 picks nothing, past the chunks that exist picks them all)."""
    Hq, Hkv, R, C, D = 4, 2, 4, 20, 16
    g = torch.Generator().manual_seed(1)
    q, key, gist_index, gist_valid = inputs(Hq, Hkv, R + 3, 60, D, C, 15, integer=True, g=g)
    rows = q.to(DEVICE)[:, :, 3:]
    key, gist_index = key.to(DEVICE), gist_index.to(DEVICE)
    k = torch.tensor([0, 1, 4, 99], device=DEVICE)
    got = select_rows_triton(rows, key, gist_index, torch.tensor([15], device=DEVICE), k)
    for r, kr in enumerate(k.tolist()[1:], start=1):  # k = 0: no config can ask for it; row 0 is checked below
        want = ChunkSelector(gist_index, gist_valid.to(DEVICE), torch.tensor([60], device=DEVICE),
                             GistConfig(chunk_size=4, sink=2, top_k=kr))(rows[:, :, r : r + 1], key)
        assert torch.equal(got[:, :, r : r + 1].cpu(), want.cpu()), r
    assert not got[:, :, 0].any() and got[0, :, 3, :15].all() and not got[0, :, 3, 15:].any()
    with pytest.raises(ValueError, match="one sequence"):
        select_rows_triton(torch.cat([rows, rows]), key, gist_index, torch.tensor([15], device=DEVICE), k)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs a CUDA GPU with 40 GB: the scores of this case hold 2.3e9 entries")
def test_select_rows_kernel_past_two_billion_scores():
    """Regression: the scores kernel offset its batch (the question rows) in int32, so once
    rows x query heads x chunks passed 2^31 (a 1,100-token question over 512K tokens at chunk 8)
    it wrote out of bounds (CUDA: illegal memory access). Some rows against the reference."""
    Hq, Hkv, R, C, D = 32, 8, 1100, 65536, 64
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(1, Hq, R, D, device=DEVICE, generator=g, dtype=torch.bfloat16)
    key = torch.randn(1, Hkv, C, D, device=DEVICE, generator=g, dtype=torch.bfloat16)
    gist_index = torch.arange(C, device=DEVICE)[None]
    gist_valid = torch.ones(1, C, dtype=torch.bool, device=DEVICE)
    config = GistConfig(chunk_size=8, top_k=4)
    selector = ChunkSelector(gist_index, gist_valid, torch.tensor([C], device=DEVICE), config)
    k = selector.chunks_per_head(Hq // Hkv).expand(R).contiguous()
    got = select_rows_triton(q, key, gist_index, gist_valid.sum(-1), k)
    torch.cuda.synchronize()
    for r in (0, R // 2, R - 1):
        want = selector(q[:, :, r : r + 1], key)
        assert torch.equal(got[:, :, r : r + 1], want), r
