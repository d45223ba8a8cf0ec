"""The KV placement kernel (gsa_rag.kernels.kv_place) against its reference, and gist memory's
question buffers assembled through it.

Without CUDA the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1). Buffers
are poisoned with NaN before every run, so a column written by one side only shows. Values are
copied, so they must match exactly; keys are rotated in float32 and rounded once to the buffer's
dtype, so they may differ by the rounding of that last step (the interpreter truncates to bf16
where torch rounds to nearest; on a GPU a fused multiply-add may round differently).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton not installed")

from gsa_rag.kernels import dispatch, kv_place
from gsa_rag.kernels.kv_place import place_rotated_ref, place_rotated_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    dispatch._interpreter_compat()
KEY_RTOL = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}  # one rounding of the result


def random_case(L, H, D, T, sizes, dtype, g, strided: int | None = None):
    """Parts of `sizes` columns placed at distinct random columns of a T-column buffer; the part
    numbered `strided` is a transposed view (its rows still contiguous, its strides its own)."""
    k_parts, v_parts = [], []
    for i, n in enumerate(sizes):
        if i == strided:
            k_parts.append(torch.randn(L, n, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2))
            v_parts.append(torch.randn(L, n, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2))
        else:
            k_parts.append(torch.randn(L, H, n, D, generator=g).to(DEVICE, dtype))
            v_parts.append(torch.randn(L, H, n, D, generator=g).to(DEVICE, dtype))
    N = sum(sizes)
    columns = torch.randperm(T, generator=g)[:N]
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    angle = torch.randn(len(sizes), D // 2, generator=g) * 3
    angle = torch.cat([angle, angle], -1)
    return columns, owner, k_parts, v_parts, angle.cos().to(DEVICE), angle.sin().to(DEVICE)


def poisoned(L, H, T, D, dtype):
    return (torch.full((L, 1, H, T, D), float("nan"), dtype=dtype, device=DEVICE),
            torch.full((L, 1, H, T, D), float("nan"), dtype=dtype, device=DEVICE))


def assert_placed_alike(got, want, dtype):
    (gk, gv), (wk, wv) = got, want
    assert torch.equal(gk.isnan(), wk.isnan()) and torch.equal(gv.isnan(), wv.isnan())  # the same columns written
    assert torch.equal(gv.nan_to_num(), wv.nan_to_num())
    torch.testing.assert_close(gk.nan_to_num().float(), wk.nan_to_num().float(), rtol=KEY_RTOL[dtype], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L,H,D,T,sizes,strided", [
    (2, 3, 16, 40, [5, 0, 7, 9], 2),        # an empty part, a strided one
    (1, 2, 64, 300, [1, 130, 33], None),    # several column blocks, one part of a single column
    (3, 1, 32, 12, [12], 0),                # every column written, one strided part
])
def test_kernel_places_what_the_reference_places(dtype, L, H, D, T, sizes, strided):
    g = torch.Generator().manual_seed(sum(sizes) * D)
    columns, owner, k_parts, v_parts, cos, sin = random_case(L, H, D, T, sizes, dtype, g, strided)
    want = poisoned(L, H, T, D, dtype)
    place_rotated_ref(*want, columns, owner, k_parts, v_parts, cos, sin)
    for block_n in (16, 32, 128):
        got = poisoned(L, H, T, D, dtype)
        place_rotated_triton(*got, columns, owner, k_parts, v_parts, cos, sin, block_n=block_n)
        assert_placed_alike(got, want, dtype)
    assert not want[0].isnan().all()  # something was placed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parts_take_their_rotation_rows_from_a_table(dtype):
    """rows=: part p is rotated by row rows[p] of a table of rotations (gist memory's shift
    table; a resident and a raw part of one passage share a row), in both paths."""
    g = torch.Generator().manual_seed(11)
    sizes = [4, 0, 9, 3, 6]
    columns, owner, k_parts, v_parts, _, _ = random_case(2, 2, 32, 40, sizes, dtype, g, strided=3)
    angle = torch.randn(7, 16, generator=g) * 3
    table_cos, table_sin = torch.cat([angle, angle], -1).cos().to(DEVICE), torch.cat([angle, angle], -1).sin().to(DEVICE)
    rows = [6, 0, 2, 6, 3]
    want = poisoned(2, 2, 40, 32, dtype)
    place_rotated_ref(*want, columns, owner, k_parts, v_parts, table_cos[rows], table_sin[rows])  # rows gathered first
    via_rows = poisoned(2, 2, 40, 32, dtype)
    place_rotated_ref(*via_rows, columns, owner, k_parts, v_parts, table_cos, table_sin, rows=rows)
    assert torch.equal(via_rows[0].nan_to_num(), want[0].nan_to_num()) and torch.equal(via_rows[1].nan_to_num(), want[1].nan_to_num())
    got = poisoned(2, 2, 40, 32, dtype)
    place_rotated_triton(*got, columns, owner, k_parts, v_parts, table_cos, table_sin, rows=rows)
    assert_placed_alike(got, want, dtype)
    wrong = poisoned(2, 2, 40, 32, dtype)  # the rows matter: part 0 by row 0 instead of 6
    place_rotated_ref(*wrong, columns, owner, k_parts, v_parts, table_cos, table_sin, rows=[0, 0, 2, 6, 3])
    assert not torch.allclose(wrong[0].nan_to_num(), want[0].nan_to_num())


def test_parts_of_another_dtype_are_converted_first():
    g = torch.Generator().manual_seed(3)
    columns, owner, k_parts, v_parts, cos, sin = random_case(2, 2, 16, 30, [4, 6], torch.float32, g)
    k_parts[1], v_parts[1] = k_parts[1].half(), v_parts[1].half()
    want, got = poisoned(2, 2, 30, 16, torch.float32), poisoned(2, 2, 30, 16, torch.float32)
    place_rotated_ref(*want, columns, owner, k_parts, v_parts, cos, sin)
    place_rotated_triton(*got, columns, owner, k_parts, v_parts, cos, sin)
    assert_placed_alike(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parts_off_16_byte_rows_are_read_element_by_element(dtype):
    """The kernel loads 16 bytes at a time only when every part's rows start on 16 bytes (their
    addresses come from a table the compiler cannot see into); a part one element off its
    storage's start (and a head dim whose rows are 8 bytes) takes the element-wise loads and
    places the same. Under the interpreter the hint does nothing, so there this checks the
    predicate and the placement; on a GPU a wrong hint would read misaligned rows."""
    from gsa_rag.kernels.kv_place import _part_table

    def rows_on_16_bytes(k_parts, v_parts):  # the launch's ALIGN flag for these parts
        return _part_table(list(k_parts), list(v_parts), [0] * len(k_parts), dtype)[1]

    g = torch.Generator().manual_seed(12)
    L, H, T = 2, 2, 30
    for D, sizes in ((16, [4, 6]), (4, [3, 5])):
        columns, owner, k_parts, v_parts, cos, sin = random_case(L, H, D, T, sizes, dtype, g)
        flat = torch.empty(2 * k_parts[1].numel() + 1, dtype=dtype, device=DEVICE)
        off_k = flat[1:1 + k_parts[1].numel()].view_as(k_parts[1]).copy_(k_parts[1])
        off_v = flat[1 + k_parts[1].numel():].view_as(v_parts[1]).copy_(v_parts[1])
        assert not rows_on_16_bytes([off_k], [off_v])
        assert rows_on_16_bytes([k_parts[0]], [v_parts[0]]) == (D * 2 % 16 == 0)
        # aligned base and column stride, but a head (or layer) stride of 5 rows + 1 element
        odd = torch.empty(L * H * (5 * D + 1), dtype=dtype, device=DEVICE)
        by_head = odd.as_strided((L, H, 5, D), (H * (5 * D + 1), 5 * D + 1, D, 1))
        by_layer = odd.as_strided((L, 1, 5, D), (5 * D + 1, 5 * D + 1, D, 1))
        assert not rows_on_16_bytes([by_head], [by_head]) and not rows_on_16_bytes([by_layer], [by_layer])
        # every part aligned, or not
        assert rows_on_16_bytes(k_parts, v_parts) == (D * 2 % 16 == 0)
        assert not rows_on_16_bytes([k_parts[0], off_k], [v_parts[0], off_v])
        assert not rows_on_16_bytes([k_parts[0], by_head], [v_parts[0], by_head])
        want, got = poisoned(L, H, T, D, dtype), poisoned(L, H, T, D, dtype)
        place_rotated_ref(*want, columns, owner, k_parts, v_parts, cos, sin)
        place_rotated_triton(*got, columns, owner, [k_parts[0], off_k], [v_parts[0], off_v], cos, sin)
        assert_placed_alike(got, want, dtype)


def test_the_reference_rotates_in_blocks_as_it_would_at_once():
    g = torch.Generator().manual_seed(4)
    columns, owner, k_parts, v_parts, cos, sin = random_case(2, 2, 16, 50, [9, 11, 20], torch.float32, g)
    whole, blocks = poisoned(2, 2, 50, 16, torch.float32), poisoned(2, 2, 50, 16, torch.float32)
    place_rotated_ref(*whole, columns, owner, k_parts, v_parts, cos, sin)
    place_rotated_ref(*blocks, columns, owner, k_parts, v_parts, cos, sin, block_elements=2 * 2 * 16 * 3)  # 3 columns
    assert torch.equal(whole[0].nan_to_num(), blocks[0].nan_to_num())
    assert torch.equal(whole[1].nan_to_num(), blocks[1].nan_to_num())


def test_bad_buffers_are_refused():
    g = torch.Generator().manual_seed(5)
    columns, owner, k_parts, v_parts, cos, sin = random_case(1, 2, 16, 20, [3], torch.float32, g)
    keys, values = poisoned(1, 2, 20, 16, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        place_rotated_triton(keys.transpose(2, 3), values, columns, owner, k_parts, v_parts, cos, sin)
    odd_keys, odd_values = torch.zeros(1, 1, 2, 20, 12), torch.zeros(1, 1, 2, 20, 12)
    with pytest.raises(ValueError, match="power of two"):
        place_rotated_triton(odd_keys, odd_values, columns, owner, k_parts, v_parts, cos[:, :12], sin[:, :12])


def test_rotations_narrower_than_the_heads_are_refused():
    """Partial RoPE: the kernel would read past the rotation rows; both paths refuse instead."""
    from gsa_rag.kernels.kv_place import place_rotated

    from gsa_rag.errors import UnsupportedModelError

    g = torch.Generator().manual_seed(6)
    columns, owner, k_parts, v_parts, cos, sin = random_case(1, 2, 16, 20, [3, 4], torch.float32, g)
    keys, values = poisoned(1, 2, 20, 16, torch.float32)
    for mode in ("0", "1"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("GSA_RAG_KERNELS", mode)
            with pytest.raises(UnsupportedModelError, match="whole heads"):
                place_rotated(keys, values, columns, owner, k_parts, v_parts, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="a row for each of the 2 parts"):
        place_rotated_triton(keys, values, columns, owner, k_parts, v_parts, cos[:1], sin[:1])
    with pytest.raises(ValueError, match="a row for each of the 2 parts"):
        place_rotated_triton(keys, values, columns, owner, k_parts, v_parts, cos, sin, rows=[0, 2])
    with pytest.raises(ValueError, match="give each part its row"):
        place_rotated(keys, values, columns, owner, k_parts, v_parts, cos[:1], sin[:1])
    with pytest.raises(ValueError, match="rows must name one of the 2 rotations"):
        place_rotated(keys, values, columns, owner, k_parts, v_parts, cos, sin, rows=[0, -1])


def test_gist_memory_refuses_a_partial_rope_model_when_it_is_made():
    from test_memory import tiny_model
    from transformers import AutoTokenizer, PhiConfig

    from gsa_rag.config import GistConfig
    from gsa_rag.engine import GistEngine
    from gsa_rag.errors import UnsupportedModelError
    from gsa_rag.memory import GistMemory
    from gsa_rag.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    # Phi rotates the first half of each head only (partial_rotary_factor 0.5)
    engine = GistEngine(tiny_model(tokenizer, family=PhiConfig), tokenizer, GistConfig(chunk_size=4, sink=3))
    with pytest.raises(UnsupportedModelError, match="partial RoPE"):
        GistMemory(engine, progress=False)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("table", [True, False])
def test_gist_memory_assembles_a_question_through_the_kernel_as_through_the_reference(monkeypatch, offload, table):
    """The question buffers of `GistMemory.prepare` are the same whichever path places them, and
    the kernel path really runs the kernel (a spy counts its calls): with raw KV on the device or
    offloaded (resident columns only), rotations from the shift table or, past its bound, from
    the rotary embedding per passage."""
    from test_memory import PASSAGES, QUESTION, tiny_engine
    from transformers import AutoTokenizer

    from gsa_rag import cache as cache_module
    from gsa_rag.memory import GistMemory
    from gsa_rag.models import default_model_path

    if not table:
        monkeypatch.setattr(cache_module, "TABLE_MAX_ROWS", 4)  # every question's shifts pass it
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    engine = tiny_engine(tokenizer)
    engine.model.to(DEVICE)
    memory = GistMemory(engine, progress=False, offload=offload)
    ids = memory.add(PASSAGES)
    caches = {}
    calls = []
    real = kv_place.place_rotated_triton
    monkeypatch.setattr(kv_place, "place_rotated_triton", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for mode in ("0", "1"):
        monkeypatch.setenv("GSA_RAG_KERNELS", mode)
        caches[mode] = memory.prepare(QUESTION, ids)[1]
        assert len(calls) == (0 if mode == "0" else 1)  # resident and raw columns in one pass
    assert len(caches["0"].layers) == len(caches["1"].layers)
    for ref, got in zip(caches["0"].layers, caches["1"].layers, strict=True):
        assert torch.equal(ref.values, got.values)
        torch.testing.assert_close(got.keys, ref.keys, rtol=1e-6, atol=1e-6)


def test_to_device_copies_what_it_is_given():
    """dispatch.to_device: on CUDA through pinned memory without waiting for the stream (queued
    behind a kernel that is still running), elsewhere a plain copy; the values arrive either way."""
    host = torch.arange(1000, dtype=torch.int64)
    assert torch.equal(dispatch.to_device(host, "cpu"), host)
    if torch.cuda.is_available():
        busy = torch.randn(4096, 4096, device="cuda")
        busy @ busy  # a kernel still running when the copy is queued
        got = dispatch.to_device(host, "cuda")
        host += 1  # the copy was staged: changing the source afterwards does not reach it
        assert torch.equal(got.cpu(), torch.arange(1000, dtype=torch.int64))


def test_tensors_packed_into_one_buffer_come_back_as_they_were():
    """dispatch.pack_bytes / unpack_bytes (what to_device_together copies in one transfer): fresh
    tensors of every width a layout holds, odd lengths between them (so the 8-byte alignment of
    each start matters), empty ones and non-contiguous ones come back with their values, dtypes
    and shapes; the views share the one buffer. On CUDA, to_device_together itself (a layout's
    `to`: tests/test_layout_fast.py)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    tensors = [
        torch.randint(-2**40, 2**40, (2, 7), generator=gen),
        torch.rand(13, generator=gen) > 0.5,
        torch.randint(0, 9, (3, 5, 0), generator=gen),
        torch.randn(5, 3, generator=gen).t(),  # not contiguous
        torch.randint(-100, 100, (9,), generator=gen, dtype=torch.int32),
        torch.zeros(0, dtype=torch.bool),
        torch.randn(3, generator=gen, dtype=torch.float64),
    ]
    packed, starts = dispatch.pack_bytes(tensors)
    assert all(s % 8 == 0 for s in starts) and packed.dtype == torch.uint8
    back = dispatch.unpack_bytes(packed, tensors, starts)
    for t, b in zip(tensors, back, strict=True):
        assert b.dtype == t.dtype and b.shape == t.shape and torch.equal(b, t)
        assert b.numel() == 0 or b.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    assert [torch.equal(a, b) for a, b in zip(dispatch.to_device_together(tensors, "cpu"), tensors, strict=True)] == [True] * 7
    if torch.cuda.is_available():
        moved = dispatch.to_device_together(tensors, "cuda")
        for t, m in zip(tensors, moved, strict=True):
            assert m.device.type == "cuda" and m.dtype == t.dtype and torch.equal(m.cpu(), t)
