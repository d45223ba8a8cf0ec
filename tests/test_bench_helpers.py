"""gsa_rag.kernels.bench's random-weight models: what benchmarks/decode_latency.py and
benchmarks/memory_ttft.py --arch time in place of downloaded checkpoints; benchmarks/select_kernel.py's
inputs and list check, and one small case through it (Triton's interpreter on the CPU)."""

import pytest
import torch

from gsa_rag.config import GistConfig
from gsa_rag.generation import forward
from gsa_rag.kernels.bench import ARCHS, random_model, synthetic_layout


def test_random_model_has_the_architecture_and_runs_a_gist_forward():
    model = random_model("smollm2-135m", layers=2, device="cpu", dtype=torch.float32, vocab_size=1000)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (2, 9, 3, 576)
    assert cfg.vocab_size == 1000 and not model.training
    again = random_model("smollm2-135m", layers=2, device="cpu", dtype=torch.float32, vocab_size=1000)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)  # seeded: every run times the same weights
    layout = synthetic_layout(2, 120, 8, device="cpu")
    with torch.no_grad():
        out, _ = forward(model, layout, layout.seq_len, None, GistConfig(chunk_size=8))
    assert out.logits.shape == (2, layout.seq_len, 1000) and bool(torch.isfinite(out.logits).all())


def test_random_model_refuses_an_unknown_architecture():
    with pytest.raises(ValueError, match="llama3-8b"):
        random_model("llama-9000", device="cpu")
    assert {"smollm2-135m", "llama3-8b"} <= set(ARCHS)


# --- benchmarks/select_kernel.py ------------------------------------------------------------------


def _select_kernel_script():
    import importlib.util
    from pathlib import Path

    from gsa_rag.kernels import dispatch

    if not torch.cuda.is_available():
        dispatch._interpreter_compat()  # run-time loop bounds under Triton's interpreter (tests/test_kernels.py)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "select_kernel.py"
    spec = importlib.util.spec_from_file_location("_bench_select_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_select_kernel_cases_take_the_decode_benchmarks_layout_and_k():
    """--scores qk scores the decode benchmark's layout at the case's context with its adaptive k
    (128K: 14563 chunks, k 512, as the 16384-chunk rows' k); otherwise exactly the case's chunks
    with fixed k (the H-GSA rows in both modes)."""
    from gsa_rag.kernels.gist_select import DecodePlan

    sk = _select_kernel_script()
    for C, k, context, scores, want in [
        (16384, 512, 131072, "qk", (14563, 512)), (16384, 512, 131072, "normal", (16384, 512)),
        (4096, 128, 32768, "qk", (3640, 128)), (3704, 4, None, "qk", (3704, 4)),
    ]:
        tokens, config = sk.case_layout(C, k, context, scores)
        layout = synthetic_layout(1, tokens, sk.CHUNK, sink=sk.SINK, tail=sk.TAIL, device="cpu")
        layout = layout.append(torch.full((1, 1), 7))
        plan = DecodePlan.build(layout, config, 4)
        assert (int(layout.num_chunks[0]), int(plan.k[0])) == want, (C, context, scores)


def test_select_kernel_same_lists_compares_entries_up_to_each_length():
    sk = _select_kernel_script()
    index = torch.tensor([[[3, 4, 5, 9], [1, 2, 7, 7]]], dtype=torch.int32)
    lengths = torch.tensor([[3, 2]], dtype=torch.int32)
    other = index.clone()
    other[0, 0, 3], other[0, 1, 2:] = -1, -1  # past the lengths: unwritten, ignored
    assert sk.same_lists((index, lengths), (other, lengths))
    other[0, 1, 1] = 8
    assert not sk.same_lists((index, lengths), (other, lengths))
    assert not sk.same_lists((index, lengths), (index, lengths + 1))
    assert sk.same_lists((index[:, :, :0], lengths * 0), (index[:, :, :1], lengths * 0))


def test_select_kernel_reduction_summary_is_the_search_columns_mean_and_max():
    sk = _select_kernel_script()
    stats = torch.tensor([[[3, 4], [7, 10]], [[2, 3], [4, 5]]], dtype=torch.int32)  # [B, Hq, 2]
    assert sk.reduction_summary(stats) == (4.0, 7)
    assert sk.reduction_summary(stats[:, :0]) == (0.0, 0)


@pytest.mark.parametrize("scores", ["normal", "qk"])
def test_select_kernel_times_a_small_case_and_both_ends_modes_agree(scores):
    """One small case through every column (on the CPU bench_us runs it twice, Triton's
    interpreter); the two union tails (prefix sum, block sums) give the same key lists, and the
    interpolation search the early bisection's sets, with fewer reductions."""
    sk = _select_kernel_script()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    row = sk.time_case(2, 150, 6, 1400, scores, Hq=4, Hkv=2, D=16, device=device)
    assert row["same_sets"] and row["same_lists"] and row["same_sets_interp"]
    # qk: the decode benchmark's layout at 1400 tokens, adaptive k = 1399 // (8 * 2 * 8) + 1
    assert (row["chunks"], row["k"]) == ((155, 11) if scores == "qk" else (150, 6))
    for key in ("bisect", "early", "blocksum", "interp", "expand_prefix", "expand_blocks", "early_step",
                "blocksum_step", "interp_step", "interp_picks_only", "early_w8"):
        assert row[key] > 0, key
    assert 0 < row["interp_red"] < row["early_red"] and row["interp_red_max"] <= row["early_red_max"]


# --- benchmarks/report.py and memory_ttft.py -----------------------------------------------------


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("config", "label"), [
    ({"chunk_size": 8, "top_k": 4}, "GSA 8x, top-4"),
    ({"chunk_size": 8, "meta_chunks": [4]}, "H-GSA 32x (8,4), top-4"),
    ({"chunk_size": 8, "k_policy": "adaptive"}, "GSA 8x, adaptive k"),
    ({"chunk_size": 16, "k_policy": "top_p", "top_p": 0.9}, "GSA 16x, top-p 0.9"),
    ({"chunk_size": 0}, "full attention (no gists)"),
])
def test_report_rows_name_the_method_that_ran(config, label):
    """An H-GSA or non-fixed-k eval file was labelled "GSA 8x, top-4 (fixed)" from two fields."""
    assert _script("report")._method(GistConfig(**config)) == label


def test_memory_ttft_refuses_an_existing_out_file_before_measuring(tmp_path, monkeypatch):
    out = tmp_path / "rows.json"
    out.write_text("{}")
    module = _script("memory_ttft")
    monkeypatch.setattr(module, "measure", lambda *a, **k: pytest.fail("measured before checking --out"), raising=False)
    monkeypatch.setattr("sys.argv", ["memory_ttft.py", "--arch", "smollm2-135m", "--out", str(out)])
    with pytest.raises(SystemExit):
        module.main()
    assert out.read_text() == "{}"


def test_kernels_benchmark_compares_and_plots_each_side_at_its_best():
    """x_dense and the plot's times are each side's best of eager and graph replay (the plot drew
    GSA's replay against dense's eager time)."""
    best = _script("kernels")._best
    assert best({"dense_us": 9.0, "dense_graph_us": 7.0}, "dense") == 7.0
    assert best({"gsa_us": 5.0, "gsa_graph_us": float("nan")}, "gsa") == 5.0
