"""gsa_rag.kernels.bench's random-weight models: what benchmarks/decode_latency.py and
benchmarks/memory_ttft.py --arch time in place of downloaded checkpoints; benchmarks/select_kernel.py's
inputs and list check, and one small case through it (Triton's interpreter on the CPU)."""

import pytest
import torch
from gsa_rag.kernels.bench import ARCHS, random_model, synthetic_layout

from gsa_rag.config import GistConfig
from gsa_rag.generation import forward


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
    assert row["same_sets"] and row["same_lists"] and row["same_sets_interp"] and row["same_sets_stream"]
    assert row["same_sets_union_kernel"]
    # qk: the decode benchmark's layout at 1400 tokens, adaptive k = 1399 // (8 * 2 * 8) + 1
    assert (row["chunks"], row["k"]) == ((155, 11) if scores == "qk" else (150, 6))
    for key in ("bisect", "early", "blocksum", "interp", "expand_prefix", "expand_blocks", "early_step",
                "blocksum_step", "interp_step", "interp_picks_only", "early_w8", "stream_t1024_w4", "union_kernel"):
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


def test_kernels_benchmark_compares_each_side_at_its_best():
    """x_dense is each side's best of eager and graph replay (the plot: plot_series, below)."""
    best = _script("kernels")._best
    assert best({"dense_us": 9.0, "dense_graph_us": 7.0}, "dense") == 7.0
    assert best({"gsa_us": 5.0, "gsa_graph_us": float("nan")}, "gsa") == 5.0


# --- result files of decode_latency.py, prefill.py and kernels.py ---------------------------------


def _distinct(base: dict, variations: dict, name) -> None:
    """name(**base) changes with every single setting in `variations`."""
    names = {name(**base)} | {name(**{**base, key: value}) for key, value in variations.items()}
    assert len(names) == 1 + len(variations)


def test_decode_latency_result_name_holds_every_setting():
    """The name held only the architecture: a re-run with another warm-up replaced the rows."""
    name = _script("decode_latency").result_name
    base = {"arch": "smollm2-135m", "layers": 30, "contexts": [8192, 16384, 32768], "batch": 1, "steps": 32,
            "warmup": 32, "cache": "both", "score_dtype": "cache"}
    assert name(**base) == "decode_latency_smollm2-135m_L30_ctx8k+16k+32k_b1_s32_w32_both"
    assert name(**{**base, "contexts": [32768, 8192, 16384, 8192]}) == name(**base)  # the same rows
    _distinct(base, {"arch": "llama3-8b", "layers": 8, "contexts": [8192, 16384], "batch": 2, "steps": 24,
                     "warmup": 40, "cache": "dynamic", "score_dtype": "int8", "graphs": True, "meta": (4,)}, name)
    assert "ctx1500+8k" in name(**{**base, "contexts": [8192, 1500]})
    hier = {**base, "meta": (4,)}
    assert name(**hier) == "decode_latency_smollm2-135m_L30_ctx8k+16k+32k_b1_s32_w32_both_meta4_top4"
    assert name(**{**hier, "top_k": 8}) != name(**hier) and name(**{**base, "top_k": 8}) == name(**base)


def test_prefill_result_name_holds_every_setting():
    name = _script("prefill").result_name
    base = {"heads": (32, 8, 128), "chunk": 8, "contexts": [4096, 8192, 16384, 32768], "masked_up_to": 16}
    assert name(**base) == "prefill_h32-8-128_c8_ctx4k+8k+16k+32k_masked16k"
    _distinct(base, {"heads": (9, 3, 64), "chunk": 16, "contexts": [4096, 8192], "masked_up_to": 4}, name)


def test_engine_prefill_result_name_holds_every_setting():
    name = _script("engine_prefill").result_name
    base = {"arch": "smollm2-135m", "layers": 30, "contexts": [16384, 32768], "batch": 1, "min_rows": 0,
            "tiles": None, "meta": []}
    assert name(**base) == "engine_prefill_smollm2-135m_l30_b1_ctx16k+32k"
    _distinct(base, {"arch": "llama3-8b", "layers": 8, "contexts": [16384], "batch": 2, "min_rows": 16384,
                     "tiles": "64,64", "meta": [4]}, name)
    assert name(**{**base, "tiles": "flex"}) != name(**{**base, "tiles": "64,64"})


@pytest.mark.parametrize("tiles", ["64", "64,48", "a,b", "8,8", "64,64,64"])
def test_engine_prefill_refuses_tiles_it_cannot_pass(tiles, capsys):
    with pytest.raises(SystemExit):
        _script("engine_prefill").main(["--flex-tiles", tiles])
    assert "two powers of two from 16" in capsys.readouterr().err


def test_kernels_result_name_holds_every_setting():
    name = _script("kernels").result_name
    base = {"shapes": ["llama3-8b", "smollm2-135m"], "batches": [1, 8], "contexts": [4096, 32768, 131072],
            "chunk": 8, "dtype": "bfloat16", "flex": False, "meta": [], "top_k": 4, "sweep": False,
            "score_dtype": "cache"}
    assert name(**base) == "decode_step_llama3-8b+smollm2-135m_b1+8_ctx4k+32k+128k_c8_bf16_noflex"
    _distinct(base, {"shapes": ["llama3-8b"], "batches": [8], "contexts": [131072], "chunk": 16,
                     "dtype": "float16", "flex": True, "meta": [4], "sweep": True, "score_dtype": "int8",
                     "group_overlap": 0.9, "ab": "gist_select.WINDOW_SELECT=True,False"}, name)
    hier = {**base, "meta": [4]}
    assert name(**hier) != name(**{**hier, "top_k": 8})
    assert name(**{**base, "top_k": 8}) == name(**base)  # single level: adaptive k, --top-k unused


def test_kernels_ab_alternates_a_kernel_switch_and_restores_it():
    """--ab names a gsa_rag.kernels module switch and its values: each value set for one case, the
    module's own value back after it (even when the case fails); a bad spec is refused by name."""
    from gsa_rag.kernels import gist_select

    kernels = _script("kernels")
    variants = kernels.ab_variants("gist_select.WINDOW_SELECT=False,True")
    assert [(m, a, v) for m, a, v, _ in variants] == [(gist_select, "WINDOW_SELECT", False),
                                                      (gist_select, "WINDOW_SELECT", True)]
    assert variants[0][-1] == "gist_select.WINDOW_SELECT=False"
    before = gist_select.WINDOW_SELECT
    seen = []
    for variant in variants:
        with pytest.raises(RuntimeError), kernels.ab_setting(variant):
            seen.append(gist_select.WINDOW_SELECT)
            raise RuntimeError("a failing case")
        assert gist_select.WINDOW_SELECT is before
    assert seen == [False, True]
    for bad, why in (("WINDOW_SELECT=True", "MODULE.ATTR"), ("gist_select.NO_SUCH=1", "no attribute"),
                     ("gist_select.WINDOW_SELECT=yes", "literals")):
        with pytest.raises(ValueError, match=why):
            kernels.ab_variants(bad)


def test_kernels_group_queries_correlate_a_groups_heads_by_the_overlap_squared(monkeypatch):
    """--group-overlap's queries: heads of one GQA group correlate by overlap^2, heads of two
    groups not at all, and every head keeps unit variance (the scores' scale is unchanged)."""
    kernels = _script("kernels")
    monkeypatch.setattr(kernels, "DEVICE", "cpu")
    torch.manual_seed(0)
    for overlap in (0.0, 0.9, 1.0):
        q = kernels.group_queries(64, 8, 2, 256, overlap, torch.float32).view(64, 2, 4, 256)
        same = float((q[:, 0, 0] * q[:, 0, 1]).mean())
        other = float((q[:, 0, 0] * q[:, 1, 0]).mean())
        assert abs(same - overlap ** 2) < 0.03 and abs(other) < 0.03, (overlap, same, other)
        assert abs(float(q.var()) - 1) < 0.03
    assert torch.equal(q[:, :, 0], q[:, :, 3])  # overlap 1: one query a group


@pytest.mark.parametrize(("script", "argv", "existing"), [
    ("decode_latency", ["--quick"], "decode_latency_smollm2-135m_L30_ctx8k_b1_s8_w8_both_graphs.json"),
    ("decode_latency", ["--arch", "llama3-8b", "--layers", "8", "--name", "mine"], "mine.json"),
    ("decode_latency", ["--name", "mine"], "mine.png"),  # its chart is a result too
    ("prefill", ["--quick"], "prefill_h32-8-128_c8_ctx4k+8k_masked16k.json"),
    ("prefill", ["--quick"], "prefill_h32-8-128_c8_ctx4k+8k_masked16k.png"),  # a kept plot is a result too
    ("kernels", ["--quick", "--no-flex"], "decode_step_llama3-8b+smollm2-135m_b1_ctx4k+32k_c8_bf16_noflex.json"),
    ("kernels", ["--quick", "--name", "decode_step_r7"], "decode_step_r7.png"),
])
def test_benchmarks_refuse_an_existing_result_before_measuring(script, argv, existing, tmp_path, monkeypatch,
                                                               capsys):
    """A run whose result file exists stops before it measures, naming the way out; it used to
    overwrite the file silently."""
    module = _script(script)
    for heavy in ("random_model", "bench_context", "copy_bandwidth"):  # where each run's work starts
        monkeypatch.setattr(module, heavy, lambda *a, **k: pytest.fail("measured before refusing"), raising=False)
    (tmp_path / existing).write_text("kept")
    with pytest.raises(SystemExit) as stop:
        module.main([*argv, "--out", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert existing in err and "never overwritten" in err and "--name" in err
    assert [p.name for p in tmp_path.iterdir()] == [existing] and (tmp_path / existing).read_text() == "kept"


def _decode_rows() -> list[dict]:
    """H200 decode-step timings (round 7, llama3-8b B=8): dense's eager time beats its replay, GSA's
    replay its eager time; smollm2 B=1 has no dense graph."""
    def row(shape, B, L, dense, dense_graph, gsa, gsa_graph):
        return {"shape": shape, "batch": B, "context": L, "dense_us": dense, "dense_graph_us": dense_graph,
                "gsa_us": gsa, "gsa_graph_us": gsa_graph, "ceiling": 9.0}
    return [row("llama3-8b", 8, 131072, 1027.5, 1081.4, 365.4, 345.4),
            row("llama3-8b", 8, 32768, 266.3, 278.3, 168.6, 105.8),
            row("smollm2-135m", 1, 4096, 20.0, float("nan"), 60.0, 30.0),
            row("smollm2-135m", 1, 32768, 40.0, 35.0, 70.0, 40.0)]


def test_kernels_plot_series_compare_like_with_like():
    """Each series pairs GSA and dense in one timing mode, named in its label: graph replay, or
    eager for both where a graph time is missing (the plot set GSA's replay against dense's eager
    time: 105.8 vs 266.3 us, x2.52, where replayed both is 278.3 / 105.8 = x2.63)."""
    llama, smol = _script("kernels").plot_series(_decode_rows())
    assert llama["label"] == "llama3-8b B=8 (graph)" and llama["context_k"] == [32, 128]
    assert llama["gsa_us"] == [105.8, 345.4] and llama["dense_us"] == [278.3, 1081.4]
    assert llama["speedup"] == pytest.approx([278.3 / 105.8, 1081.4 / 345.4])
    assert smol["label"] == "smollm2-135m B=1 (eager)"
    assert smol["gsa_us"] == [60.0, 70.0] and smol["dense_us"] == [20.0, 40.0]
    assert smol["speedup"] == pytest.approx([1 / 3, 4 / 7]) and smol["ceiling"] == [9.0, 9.0]


def test_kernels_plot_draws_the_series(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = _script("kernels")
    path = tmp_path / "decode_step.png"
    try:
        kernels.draw(plt, path, _decode_rows())
        speedup, times = plt.gcf().axes
        assert [line.get_label() for line in times.lines][:2] == ["gsa llama3-8b B=8 (graph)",
                                                                  "dense llama3-8b B=8 (graph)"]
        assert list(times.lines[1].get_ydata()) == [278.3, 1081.4]
        assert list(speedup.lines[0].get_ydata()) == pytest.approx([278.3 / 105.8, 1081.4 / 345.4])
    finally:
        plt.close("all")
    assert path.stat().st_size > 0


def test_kernels_list_overlap_counts_the_reference_keys_kept_up_to_each_length():
    overlap = _script("kernels").list_overlap
    reference = (torch.tensor([[[1, 2, 3, 0], [4, 5, 0, 0]]], dtype=torch.int32), torch.tensor([[3, 2]], dtype=torch.int32))
    same = (torch.tensor([[[3, 2, 1, 9], [5, 4, 9, 9]]], dtype=torch.int32), reference[1])  # order and padding ignored
    assert overlap(same, reference, 10) == 1.0
    swapped = (torch.tensor([[[1, 2, 7, 0], [4, 5, 0, 0]]], dtype=torch.int32), reference[1])
    assert overlap(swapped, reference, 10) == 4 / 5


def test_decode_latency_chart_has_a_bar_per_column_and_row(tmp_path, capsys):
    """--replot draws a result file's chart beside it, one bar per column and row (log scale), and
    keeps an existing chart."""
    import json

    module = _script("decode_latency")
    rows = [{"arch": "smollm2-135m", "layers": 30, "context": c, "batch": 8, "hf_tok_s": 400.0, "hf_dc_tok_s": 300.0,
             "hf_graph_tok_s": 200.0, "dense_graph_tok_s": 1600.0, "gsa_tok_s": 180.0, "gsa_dc_tok_s": 200.0,
             "gsa_graph_tok_s": 2000.0 + c / 1024} for c in (8192, 32768)]
    result = tmp_path / "run.json"
    result.write_text(json.dumps({"env": {}, "rows": rows}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        module.draw(plt, tmp_path / "direct.png", rows)
        ax = plt.gcf().axes[0]
        assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "GSA, replayed (the engine)"
        assert len(ax.patches) == 7 * 2 and ax.get_yscale() == "log"
        assert [p.get_height() for p in ax.containers[-1]] == [2008.0, 2032.0]
    finally:
        plt.close("all")
    module.main(["--replot", str(result)])
    assert (tmp_path / "run.png").stat().st_size > 0 and "run.png" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="never overwritten"):
        module.main(["--replot", str(result)])


def test_scores_sweep_times_the_default_launch_and_names_every_setting_apart():
    """The sweep prints each case's default int8 time from its rows, so the defaults must be among
    the settings it times (quick or full); and no two settings share a row name."""
    from gsa_rag.kernels import gist_select

    sweep = _script("scores_sweep")
    default = sweep.setting_name({name: getattr(gist_select, name) for name in sweep.LAUNCH})
    for quick in (True, False):
        names = [sweep.setting_name(setting) for setting in sweep.int8_settings(quick)]
        assert default in names
        assert len(set(names)) == len(names)


def test_profile_step_checks_its_arguments_and_asks_for_a_gpu(monkeypatch, capsys):
    """benchmarks/profile_step.py (the step ncu profiles) refuses sizes below 1 with a usage error,
    and without CUDA says it needs a GPU before building anything."""
    module = _script("profile_step")
    with pytest.raises(SystemExit) as stop:
        module.main(["--batch", "0"])
    assert stop.value.code == 2 and "--batch" in capsys.readouterr().err
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(module, "decode_case", lambda *a, **k: pytest.fail("built inputs without a GPU"))
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        module.main(["--batch", "2", "--score-dtype", "int8"])
