"""The tail-row mask kernel (gsa_rag.kernels.recall_mask) against its reference, on fresh random
inputs. Without CUDA it runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1). The
engine-level check (the masks of every layer through the select and mask kernels equal the
reference's) is tests/test_attention.py::test_tail_rows_choose_the_same_chunks_through_the_select_kernels."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton not installed")

from gsa_rag.kernels.recall_mask import tail_mask_ref, tail_mask_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("Hkv,R,T,C,block", [(2, 5, 150, 12, 64), (1, 1, 40, 3, 1024), (3, 7, 333, 40, 128)])
def test_tail_mask_kernel_equals_the_reference(Hkv, R, T, C, block):
    g = torch.Generator().manual_seed(R * T + C)
    sizes = torch.randint(0, 3, (R, Hkv, C), generator=g, dtype=torch.int32) * (torch.rand(R, Hkv, C, generator=g) < 0.4)
    base = torch.rand(1, 1, R, T, generator=g) < 0.2
    gate = torch.rand(1, 1, R, T, generator=g) < 0.6
    chunk_of = torch.randint(0, C, (T,), generator=g, dtype=torch.int32)
    chunk_of[~gate[0, 0].any(0)] = C + 1000  # a column no row gates need not name a chunk: never read
    # the select kernel's union is [R, Hkv, C] with its own strides: a view of a wider buffer here
    wide = torch.zeros(R, Hkv, C + 5, dtype=torch.int32)
    wide[..., :C] = sizes
    args = [t.to(DEVICE) for t in (wide[..., :C], base, gate, chunk_of)]
    want = tail_mask_ref(args[0], args[1], args[2], args[3].clamp(max=C - 1))
    got = tail_mask_triton(*args, block=block)
    assert got.dtype == torch.bool and got.shape == (1, Hkv, R, T)
    assert torch.equal(got, want)
    assert got.any() and not got.all()  # both outcomes occur


def test_tail_mask_kernel_refuses_bad_shapes():
    sizes = torch.zeros(2, 1, 4, dtype=torch.int32)
    ok = torch.zeros(1, 1, 2, 10, dtype=torch.bool)
    chunk_of = torch.zeros(10, dtype=torch.int32)
    with pytest.raises(ValueError, match="must be"):
        tail_mask_triton(sizes, ok[:, :, :1], ok, chunk_of)
    with pytest.raises(ValueError, match="contiguous int32"):
        tail_mask_triton(sizes, ok, ok, chunk_of.long())
