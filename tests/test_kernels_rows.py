"""The few-rows masked attention kernel (gsa_rag.kernels.masked_rows) against its reference and
against the engine's attention of a question's rows (gsa_rag.attention).

Without CUDA the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1). Outputs
are poisoned with NaN before every run; errors are ||out - ref|| / ||ref|| against a float64
reference on the same (rounded) inputs: fp32 <= 1e-5, fp16 <= 2e-3, bf16 <= 1e-2.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton not installed")

from gsa_rag.kernels import dispatch, masked_rows
from gsa_rag.kernels.masked_rows import masked_rows_ref, masked_rows_triton
from gsa_rag.kernels.sparse_decode import combine_splits

from gsa_rag.attention import LayerMask, _sdpa_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    dispatch._interpreter_compat()  # run-time loop bounds under Triton's interpreter
BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def float64_reference(q, k, v, mask, scale, tail_mask=None):
    return masked_rows_ref(q.double(), k.double(), v.double(), mask, scale, tail_mask)


def random_mask(B, H, R, T, seen, g):
    """Each row sees about `seen` of the keys and at least one; some rows see only keys in the
    first few columns (later splits hold nothing for them)."""
    mask = torch.rand(B, H, R, T, generator=g) < seen
    mask[..., 0] = True
    mask[:, :, ::3, 6:] = False
    return mask


def rel_err(got, want):
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,R,T,D,per_head", [
    (2, 8, 2, 5, 150, 16, True),    # G 4: 20 folded rows, one block
    (1, 4, 4, 3, 70, 32, False),    # G 1, one mask row for every head
    (1, 6, 2, 23, 133, 16, True),   # 69 folded rows: several row blocks, the last one short
])
def test_masked_rows_kernel_equals_the_reference(dtype, B, Hq, Hkv, R, T, D, per_head):
    g = torch.Generator().manual_seed(R * T)
    q = torch.randn(B, Hq, R, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
    mask = random_mask(B, Hkv if per_head else 1, R, T, 0.3, g).to(DEVICE)
    scale = 1 / math.sqrt(D)
    want = float64_reference(q, k, v, mask, scale)
    # splits x key block: one split; a few; the default; many splits of 16 keys
    for splits, block_m, block_n in ((1, None, 64), (1, 16, 16), (3, None, 64), (None, 16, 64), (12, 16, 16)):
        # poisoned, and strided as the engine's [B, R, Hq, D] output seen as [B, Hq, R, D]
        out = torch.full((B, R, Hq, D), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
        got = masked_rows_triton(q, k, v, mask, scale, num_splits=splits, out=out, block_m=block_m, block_n=block_n)
        assert got.data_ptr() == out.data_ptr()
        assert not got.isnan().any(), (splits, block_m)
        assert rel_err(got, want) <= BOUND[dtype], (splits, block_m, rel_err(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,R,start,T,D,shared_heads,tail_heads,shared_rows", [
    (1, 4, 4, 40, 16, 90, 16, 1, 4, "all"),     # G 1: start on a 16-row block's edge, inside a 64-row one
    (1, 4, 4, 40, 23, 90, 16, 1, 1, "start"),   # G 1: start inside a block; a shared mask of `start` rows
    (2, 8, 2, 9, 4, 150, 16, 1, 2, "all"),      # G 4: the folded rows of each head straddle start
    (1, 6, 2, 11, 0, 70, 32, 1, 2, "all"),      # start 0: every row reads the tail
    (1, 6, 2, 11, 7, 133, 16, 2, 1, "start"),   # a per-head shared part, one tail row for every head
])
def test_masked_rows_kernel_with_a_tail_mask_equals_the_reference(dtype, B, Hq, Hkv, R, start, T, D, shared_heads,
                                                                  tail_heads, shared_rows):
    """Rows before `start` under `mask`, the rest under `tail_mask` (a LayerMask's two parts), in
    one launch: the reference of the joined mask, which is the two parts' references stacked."""
    g = torch.Generator().manual_seed(R * T + start)
    q = torch.randn(B, Hq, R, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
    # the shared mask's rows past `start` (when it has them) differ from the tail's: reading them is wrong
    shared = random_mask(B, shared_heads, R, T, 0.3, g).to(DEVICE)
    if shared_rows == "start":
        shared = shared[:, :, :start]
    # the tail's columns of a wider mask: its row stride is its own (the shared mask's is T)
    # (sliced on the device: .to("cuda") of the strided view would copy it contiguous)
    tail = random_mask(B, tail_heads, R - start, T + 5, 0.5, g).to(DEVICE)[..., :T]
    assert tail.stride(2) != shared.stride(2)
    scale = 1 / math.sqrt(D)
    want = float64_reference(q, k, v, shared, scale, tail)
    by_part = torch.cat([float64_reference(q[:, :, :start], k, v, shared[:, :, :start], scale),
                         float64_reference(q[:, :, start:], k, v, tail, scale)], 2)
    torch.testing.assert_close(want, by_part)
    # one split (normalised in the kernel), the default, many splits of 16 keys
    for splits, block_m, block_n in ((1, None, 64), (None, 16, 64), (12, 16, 16)):
        out = torch.full((B, R, Hq, D), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
        got = masked_rows_triton(q, k, v, shared, scale, num_splits=splits, out=out, block_m=block_m,
                                 block_n=block_n, tail_mask=tail)
        assert got.data_ptr() == out.data_ptr()
        assert not got.isnan().any(), (splits, block_m)
        assert rel_err(got, want) <= BOUND[dtype], (splits, block_m, rel_err(got, want))


def test_masked_rows_kernel_with_parts_of_different_column_strides():
    """A tail mask stored keys-major (column stride != the shared mask's) reads the same keys."""
    B, Hq, Hkv, R, start, T, D = 1, 4, 2, 7, 3, 80, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, Hq, R, D, generator=g).to(DEVICE)
    k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE)
    v = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE)
    shared = random_mask(B, 1, R, T, 0.3, g).to(DEVICE)
    tail = random_mask(B, Hkv, R - start, T, 0.3, g).transpose(2, 3).contiguous().transpose(2, 3).to(DEVICE)
    assert tail.stride(3) != shared.stride(3)
    want = float64_reference(q, k, v, shared, None, tail)
    for splits in (1, 3):
        out = torch.full((B, Hq, R, D), float("nan"), device=DEVICE)
        got = masked_rows_triton(q, k, v, shared, num_splits=splits, out=out, tail_mask=tail)
        assert rel_err(got, want) <= BOUND[torch.float32], (splits, rel_err(got, want))


def test_masked_rows_kernel_on_single_keys_and_rows_that_see_nothing():
    """A row that sees one key returns that key's value exactly; a row that sees no key is NaN
    (SDPA's math path gives NaN too); the mask of one head never leaks into another."""
    B, Hq, Hkv, R, T, D = 1, 4, 2, 3, 100, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hq, R, D, generator=g).to(DEVICE)
    k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE)
    v = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE)
    mask = torch.zeros(B, Hkv, R, T, dtype=torch.bool)
    mask[0, 0, 0, 97] = True    # KV head 0, row 0: one key in the last split
    mask[0, 1, 0, 3] = True     # KV head 1, row 0: another key
    mask[0, :, 1, :] = True     # row 1: everything
    mask = mask.to(DEVICE)      # row 2: nothing
    for splits in (4, 1):  # through the combine; normalised in the kernel itself
        got = masked_rows_triton(q, k, v, mask, num_splits=splits)
        torch.testing.assert_close(got[0, 0:2, 0], v[0, 0, 97].expand(2, D))  # query heads 0, 1 share KV head 0
        torch.testing.assert_close(got[0, 2:4, 0], v[0, 1, 3].expand(2, D))
        torch.testing.assert_close(got[:, :, 1], masked_rows_ref(q, k, v, mask)[:, :, 1], atol=1e-5, rtol=1e-5)
        assert got[:, :, 2].isnan().all()


@pytest.mark.parametrize("R,S", [(1, 40), (5, 3), (37, 4), (9, 20)])
def test_combine_merges_split_partials_as_one_softmax(R, S):
    """sparse_decode.combine_splits on fresh random partials, blocks of rows a program (a row
    block cut short; more splits than its block of splits), some splits empty (m = -inf, l = 0,
    acc = 0, as the kernels store them), one row empty everywhere (NaN): against the merge in
    float64, into a poisoned strided output."""
    B, Hq, D = 2, 3, 32
    g = torch.Generator().manual_seed(R * S)
    m = torch.randn(B, Hq, R, S, generator=g) * 4
    l = torch.rand(B, Hq, R, S, generator=g) + 0.5
    acc = torch.randn(B, Hq, R, S, D, generator=g)
    empty = torch.rand(B, Hq, R, S, generator=g) < 0.3
    empty[..., 0] = False
    empty[0, 1, R - 1] = True  # a row no split saw
    m[empty], l[empty], acc[empty] = float("-inf"), 0.0, 0.0
    w = torch.exp2(m.double() - m.double().amax(-1, keepdim=True))
    want = (acc.double() * w[..., None]).sum(-2) / (l.double() * w).sum(-1, keepdim=True)
    # poisoned with 7 (not NaN, the empty row's answer), with one batch more behind the output that
    # nothing may write: rows past R of a row block are masked, not spilled into the next batch
    big = torch.full((B + 1, R, Hq, D), 7.0, device=DEVICE)
    out = big[:B].transpose(1, 2)
    combine_splits(m.to(DEVICE), l.to(DEVICE), acc.to(DEVICE), out)
    assert bool((big[B] == 7.0).all())
    assert out[0, 1, R - 1].isnan().all()
    want[0, 1, R - 1] = 0.0
    out[0, 1, R - 1] = 0.0
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=1e-5)
    combine_splits(m[:, :, :0].to(DEVICE), l[:, :, :0].to(DEVICE), acc[:, :, :0].to(DEVICE), out[:, :, :0])  # no rows


def test_masked_rows_kernel_refuses_a_mask_of_the_wrong_shape():
    q = torch.zeros(1, 4, 3, 16, device=DEVICE)
    k = torch.zeros(1, 2, 50, 16, device=DEVICE)
    with pytest.raises(ValueError, match="mask must be bool"):
        masked_rows_triton(q, k, k, torch.ones(1, 2, 3, 49, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="mask must be bool"):
        masked_rows_triton(q, k, k, torch.ones(1, 3, 3, 50, dtype=torch.bool, device=DEVICE))
    shared = torch.ones(1, 1, 3, 50, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="tail_mask must be bool"):  # more tail rows than rows
        masked_rows_triton(q, k, k, shared, tail_mask=torch.ones(1, 2, 4, 50, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="tail_mask must be bool"):
        masked_rows_triton(q, k, k, shared, tail_mask=torch.ones(1, 3, 1, 50, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="mask must be bool"):  # 2 shared rows before a 1-row tail, 1 given
        masked_rows_triton(q, k, k, shared[:, :, :1], tail_mask=torch.ones(1, 2, 1, 50, dtype=torch.bool,
                                                                             device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_rows_equal_the_engine_attention_of_a_question(dtype):
    """attention._kernel_rows (a question's link rows under the shared mask, its question rows
    under per-KV-head masks) against the engine's SDPA path on the same LayerMask."""
    from gsa_rag.attention import _kernel_rows

    B, Hq, Hkv, T, D, shared_rows, tail_rows = 1, 8, 2, 120, 16, 9, 4
    g = torch.Generator().manual_seed(11)
    R = shared_rows + tail_rows
    q = torch.randn(B, Hq, R, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
    shared = random_mask(B, 1, R, T, 0.4, g)
    tail = random_mask(B, Hkv, tail_rows, T, 0.4, g)
    mask = LayerMask(shared.to(DEVICE), shared_rows, tail.to(DEVICE))
    scale = 1 / math.sqrt(D)
    got = _kernel_rows(q, k, v, mask, scale)  # [B, R, Hq, D]
    want = _sdpa_rows(q.double(), k.double(), v.double(), mask, scale, 0.0, True)
    assert got.shape == (B, R, Hq, D)
    assert rel_err(got, want) <= BOUND[dtype]
    only_shared = LayerMask(shared.to(DEVICE), R)  # a layer that does not select: no tail rows
    assert rel_err(_kernel_rows(q, k, v, only_shared, scale), _sdpa_rows(
        q.double(), k.double(), v.double(), only_shared, scale, 0.0, True)) <= BOUND[dtype]


class _Launches:
    """Counts the launches of the rows kernel (`kernel[grid](...)`) and passes them on."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start,tail_heads", [(5, 2), (3, 1), (0, 2), (7, None)],
                         ids=["tail-per-head", "tail-one-head", "start-0", "no-tail"])
def test_kernel_rows_launches_the_rows_kernel_once(monkeypatch, dtype, start, tail_heads):
    """attention._kernel_rows runs a question's shared and tail rows in one launch of the rows
    kernel (and at most one combine), giving what a launch per part gave."""
    from gsa_rag.attention import _kernel_rows

    # 7 rows: the interpreter's combine runs a program per (query head, row), most of this test's time
    B, Hq, Hkv, R, T, D = 1, 8, 2, 7, 120, 16
    g = torch.Generator().manual_seed(start + 17)
    q = torch.randn(B, Hq, R, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype)
    shared = random_mask(B, 1, R, T, 0.4, g).to(DEVICE)
    tail = None if tail_heads is None else random_mask(B, tail_heads, R - start, T, 0.4, g).to(DEVICE)
    mask = LayerMask(shared, start, tail)
    scale = 1 / math.sqrt(D)
    by_part = torch.full((B, R, Hq, D), float("nan"), dtype=dtype, device=DEVICE)
    if start > 0:  # a launch per part, as _kernel_rows ran them before
        masked_rows_triton(q[:, :, :start], k, v, shared[:, :, :start], scale, out=by_part[:, :start].transpose(1, 2))
    if tail is not None:
        masked_rows_triton(q[:, :, start:], k, v, tail, scale, out=by_part[:, start:].transpose(1, 2))
    assert not by_part.isnan().any()

    calls, combines = [], []
    real, real_combine = masked_rows.masked_rows_triton, masked_rows.combine_splits
    launches = _Launches(masked_rows._rows_split_kernel)
    monkeypatch.setattr(masked_rows, "masked_rows_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(masked_rows, "combine_splits", lambda *a: combines.append(1) or real_combine(*a))
    monkeypatch.setattr(masked_rows, "_rows_split_kernel", launches)
    got = _kernel_rows(q, k, v, mask, scale)
    assert (len(calls), launches.count) == (1, 1) and len(combines) <= 1
    assert got.shape == (B, R, Hq, D) and not got.isnan().any()
    assert rel_err(got, by_part.double()) <= BOUND[dtype]
    want = _sdpa_rows(q.double(), k.double(), v.double(), mask, scale, 0.0, True)
    assert rel_err(got, want) <= BOUND[dtype]
    if tail is not None and start > 0:  # a start its tail does not end at (a plug-in state's mask) is refused
        with pytest.raises(ValueError, match="LayerMask.start"):
            _kernel_rows(q, k, v, LayerMask(shared, start - 1, tail), scale)
