"""benchmarks/gist_keys8_agreement.py: the set comparison, and the capture that selects each
layer's tail rows under both scorings, on a tiny random Llama."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from fakes import FakeTokenizer, random_segments
from transformers import AutoModelForCausalLM, LlamaConfig

from gsa_rag import selection
from gsa_rag.config import GistConfig
from gsa_rag.generation import SamplingParams, generate_tokens
from gsa_rag.layout import build_layout


@pytest.fixture(scope="module")
def script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gist_keys8_agreement.py"
    spec = importlib.util.spec_from_file_location("gist_keys8_agreement", path)
    spec.loader.exec_module(module := importlib.util.module_from_spec(spec))
    return module


def test_set_agreement_on_hand_made_sets(script):
    a = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    b = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    jaccard, same = script.set_agreement(a, b)
    torch.testing.assert_close(jaccard, torch.tensor([1.0, 1 / 3, 1.0, 0.0]))
    assert same.tolist() == [True, False, True, False]


def test_agreement_counts_live_rows_only(script):
    agreement = script.Agreement()
    cache = torch.zeros(1, 2, 3, 4, dtype=torch.bool)
    int8 = cache.clone()
    cache[0, :, :, 0] = int8[0, :, :, 0] = True
    int8[0, 1, 2, 1] = True  # the only difference: KV head 1, row 2 (Jaccard 1/2)
    agreement.add("prefill", 1, cache, int8, torch.tensor([[True, True, True]]))
    agreement.add("prefill", 2, cache, int8, torch.tensor([[True, True, False]]))  # row 2 is padding here
    out = agreement.summary()
    assert out["decode"] is None
    layer1, layer2, both = out["prefill"]["layers"]["1"], out["prefill"]["layers"]["2"], out["prefill"]["all"]
    assert layer1["sets"] == 6 and layer1["identical_pct"] == pytest.approx(500 / 6)
    assert layer1["mean_jaccard"] == pytest.approx(5.5 / 6) and layer1["chunks_int8"] == pytest.approx(7 / 6)
    assert layer2 == {"sets": 4, "mean_jaccard": 1.0, "identical_pct": 100.0, "chunks_cache": 1.0, "chunks_int8": 1.0}
    assert both["sets"] == 10 and both["mean_jaccard"] == pytest.approx(9.5 / 10)


def tiny_model():
    import gsa_rag.attention  # noqa: F401  (registers "gsa")

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="gsa").eval()


def capture(script, seed: int, steps: int = 4):
    """A capturing generation over random passages -> (summary, tokens, tail rows, Hkv)."""
    config = GistConfig(chunk_size=4, sink=2, top_k=2)
    layout = build_layout([random_segments(random.Random(seed), max_passages=4, max_len=40)], config, FakeTokenizer())
    agreement = script.Agreement()
    tokens = list(generate_tokens(tiny_model(), layout, config, SamplingParams(max_new_tokens=steps), set(),
                                  state_factory=script.capturing_factory(agreement)))
    return agreement.summary(), tokens, int(layout.is_tail.sum()), 2


def test_capture_compares_both_scorings_in_every_selecting_layer(script, monkeypatch):
    """Every selecting layer (not layer 0) is compared, on every tail row of the prefill and
    every decode step; the second scoring is the int8 one: a spy on the int8 scores sees each
    comparison, and int8 scores forced to the reverse order make the sets disagree."""
    int8_calls = []
    plain = selection.int8_gist_scores

    def reversed_int8(query, keys, valid):  # the worst chunks first: what int8 picks is then unlike cache's
        int8_calls.append(query.shape[2])
        return -plain(query, keys, valid).nan_to_num(0.0, neginf=0.0) - torch.where(valid, 0.0, float("inf"))[:, None, None]

    monkeypatch.setattr(selection, "int8_gist_scores", reversed_int8)
    out, tokens, tail, hkv = capture(script, seed=3)
    assert sorted(out["prefill"]["layers"]) == sorted(out["decode"]["layers"]) == ["1", "2"]
    assert out["prefill"]["all"]["sets"] == 2 * hkv * tail
    assert out["decode"]["all"]["sets"] == 2 * hkv * (len(tokens) - 1)
    assert int8_calls == [tail, tail] + [1, 1] * (len(tokens) - 1)  # and only the int8 scoring reads int8 keys
    assert out["prefill"]["all"]["mean_jaccard"] < 1.0 and out["prefill"]["all"]["identical_pct"] < 100.0


@pytest.mark.parametrize("seed", [0, 1])
def test_capture_of_one_scoring_twice_agrees_fully(script, monkeypatch, seed):
    """Both sides under the same scoring: every set identical, so a difference the benchmark
    reports comes from the scorings, not from the capture's plumbing."""
    monkeypatch.setattr(script, "SCORINGS", ("cache", "cache"))
    out, _, _, _ = capture(script, seed)
    for phase in ("prefill", "decode"):
        assert out[phase]["all"]["sets"] > 0
        assert out[phase]["all"]["mean_jaccard"] == 1.0 and out[phase]["all"]["identical_pct"] == 100.0


def test_existing_result_file_is_refused_before_the_model_loads(script, monkeypatch, tmp_path):
    out = tmp_path / "agreement.json"
    out.write_text("{}")
    monkeypatch.setattr(script, "load_examples", lambda *_, **__: ["one question"])

    def no_model(**_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(script.GistEngine, "from_pretrained", no_model)
    with pytest.raises(SystemExit) as exit_:
        script.main(["--out", str(out)])
    assert exit_.value.code == 2 and out.read_text() == "{}"


def test_quantization_levels_bound_the_values_and_are_restored(script):
    from gsa_rag.kernels import gist_keys8

    torch.manual_seed(0)
    key = torch.randn(1, 2, 40, 16)
    index, valid = torch.arange(3, 40, 4)[None], torch.ones(1, 10, dtype=torch.bool)
    shipped = gist_keys8.quantize_gist_keys(key, index, valid)
    with pytest.raises(RuntimeError), script.quantization_levels(7):
        four_bit = gist_keys8.quantize_gist_keys(key, index, valid)
        raise RuntimeError("the block fails: the shipped levels still come back")
    assert gist_keys8.QMAX == 127
    assert four_bit.values.abs().max() == 7 and shipped.values.abs().max() == 127
    # same per-channel scales up to the level count, so the 4-bit values are the int8 ones coarsened
    torch.testing.assert_close(four_bit.scale * 7, shipped.scale * 127)
    assert (four_bit.values.float() * 127 / 7 - shipped.values.float()).abs().max() <= 127 / 14 + 1


@pytest.mark.parametrize("levels", ["0", "128"])
def test_levels_outside_int8_are_refused_before_the_model_loads(script, monkeypatch, tmp_path, levels):
    monkeypatch.setattr(script, "load_examples", lambda *_, **__: ["one question"])
    monkeypatch.setattr(script.GistEngine, "from_pretrained", lambda **_: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        script.main(["--levels", levels, "--out", str(tmp_path / "a.json")])
    assert exit_.value.code == 2 and not (tmp_path / "a.json").exists()
