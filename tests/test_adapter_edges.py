"""Gist adapters: the base fingerprint does not depend on the dtype the base was loaded in, old
(format-1) fingerprints keep loading, another base is refused, `~` in adapter paths expands,
manifests are format 2 (format 1 still read), and a config with another layout warns."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from gsa_rag.adapters import (
    FORMAT_VERSION,
    MANIFEST,
    adapter_config,
    apply_adapter,
    base_fingerprint,
    bundled_default_adapter,
    check_base,
    read_manifest,
    trained_manifest_dir,
    write_manifest,
)
from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.errors import AdapterMismatchError
from gsa_rag.models import load_model
from gsa_rag.train.loop import TrainArgs, _save_result, _wrap_trainable

CONFIG = GistConfig(chunk_size=4, sink=2, top_k=1)


def double_rounded(n: int, seed: int = 0) -> torch.Tensor:
    """n float32 values whose bf16 rounding differs from the bf16 rounding of their float16
    rounding (fp32 -> fp16 lands on a bf16 midpoint, which then ties the other way)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200_000, generator=g) * 0.1
    flips = x[x.bfloat16().float() != x.half().bfloat16().float()]
    assert len(flips) >= n
    return flips[:n]


def tiny_base(path, tokenizer, seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # every sampled head holds values a float16 load rounds twice
        for i, param in enumerate(model.parameters()):
            flat = param.view(-1)
            flat[:8] = double_rounded(8, seed * 100 + i) * (1 if param.dim() > 1 else 10)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("bases")
    return tiny_base(root / "base", tokenizer, 0), tiny_base(root / "other", tokenizer, 1)


@pytest.fixture(scope="module")
def adapter(bases, tmp_path_factory):
    """An adapter trained (a stand-in step) on the float32 load of `bases[0]`, as `gsa-rag train` saves it."""
    out = tmp_path_factory.mktemp("adapters") / "adapter"
    model, tok = load_model(str(bases[0]), device="cpu", dtype=torch.float32)
    fingerprint = base_fingerprint(model)
    args = TrainArgs(stage="sft", output=str(out), base=str(bases[0]), lora_r=4)
    peft_model = _wrap_trainable(model, tok, args, CONFIG)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    _save_result(peft_model, tok, out, args, CONFIG, fingerprint, [1.0])
    return out


def test_fingerprint_is_the_same_for_float32_bfloat16_and_float16_loads(bases):
    fingerprints = {dtype: base_fingerprint(load_model(str(bases[0]), device="cpu", dtype=dtype)[0])
                    for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    assert len(set(fingerprints.values())) == 1, fingerprints
    other = base_fingerprint(load_model(str(bases[1]), device="cpu", dtype=torch.float32)[0])
    assert other != fingerprints[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_load_in_any_dtype_accepts_the_adapter_of_its_base(bases, adapter, dtype):
    engine = GistEngine.from_pretrained(str(bases[0]), adapter=str(adapter), dtype=dtype, device="cpu")
    assert engine.adapter is not None and engine.config == CONFIG
    assert next(engine.model.parameters()).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_another_base_is_refused(bases, adapter, dtype):
    with pytest.raises(AdapterMismatchError, match="load it with the base model it was trained on"):
        GistEngine.from_pretrained(str(bases[1]), adapter=str(adapter), dtype=dtype, device="cpu")


def test_a_format_1_fingerprint_still_matches_its_base(bases, adapter, tmp_path):
    """Adapters saved before the format-2 fingerprint store the bf16-rounded one: they keep
    loading on their base as loaded before (float32, bfloat16) and stay refused on another."""
    base32 = load_model(str(bases[0]), device="cpu", dtype=torch.float32)[0]
    legacy = base_fingerprint(base32).legacy
    assert len(legacy) == 16 and legacy != base_fingerprint(base32)
    write_manifest(tmp_path, base_model="old", fingerprint=legacy, config=CONFIG)
    for dtype in (torch.float32, torch.bfloat16):
        check_base(tmp_path, base_fingerprint(load_model(str(bases[0]), device="cpu", dtype=dtype)[0]))
    with pytest.raises(AdapterMismatchError, match="older format"):
        check_base(tmp_path, base_fingerprint(load_model(str(bases[1]), device="cpu", dtype=torch.float32)[0]))


def test_the_bundled_adapter_loads_on_a_float16_default_model(default_model_dir):
    bundled = bundled_default_adapter()
    if bundled is None:
        pytest.skip("this install carries no bundled adapter")
    assert len(read_manifest(bundled)["base_fingerprint"]) == 16  # a format-1 fingerprint
    model = load_model(None, device="cpu", dtype=torch.float16)[0]
    check_base(bundled, base_fingerprint(model))


def test_adapter_paths_expand_the_home_directory(bases, adapter, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(adapter, tmp_path / "ad")
    assert read_manifest("~/ad")["base_fingerprint"].startswith("v2-")
    assert adapter_config("~/ad") == CONFIG
    assert trained_manifest_dir(None, "~/ad") == tmp_path / "ad"
    model = load_model(str(bases[0]), device="cpu", dtype=torch.float32, gist_config=CONFIG)[0]
    apply_adapter(model, "~/ad", base_fingerprint(model))
    engine = GistEngine.from_pretrained(str(bases[0]), adapter="~/ad", device="cpu")
    assert engine.adapter is not None and engine.config == CONFIG
    (tmp_path / "written").mkdir()
    write_manifest("~/written", base_model="b", fingerprint="v2-0", config=CONFIG)
    assert read_manifest(tmp_path / "written")["base_model"] == "b"
    from gsa_rag.train.loop import _resolve_init_adapter

    assert _resolve_init_adapter(TrainArgs(stage="sft", output="y", init_adapter="~/ad")).init_adapter == str(tmp_path / "ad")


# --- manifest format -----------------------------------------------------------------------------


def test_manifests_are_written_in_format_2_and_format_1_still_reads(adapter, tmp_path):
    """Format 2 is what says "v2-" fingerprint: a gsa-rag that reads format 1 only then says
    "upgrade gsa-rag" instead of "trained on another base model". Format 1 manifests (the bundled
    adapter's; loaded through GistEngine.from_pretrained() in test_train) keep loading."""
    written = json.loads((adapter / MANIFEST).read_text())  # by training (_save_result)
    assert written["format_version"] == FORMAT_VERSION == 2 and written["base_fingerprint"].startswith("v2-")
    assert read_manifest(adapter) == written and adapter_config(adapter) == CONFIG
    write_manifest(tmp_path, base_model="b", fingerprint="v2-0123456789abcdef", config=CONFIG, stage="sft")
    manifest = read_manifest(tmp_path)
    assert manifest["format_version"] == 2 and manifest["stage"] == "sft" and adapter_config(tmp_path) == CONFIG
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1, "base_fingerprint": "0123456789abcdef"}))
    assert read_manifest(tmp_path)["format_version"] == 1 and adapter_config(tmp_path) == CONFIG
    bundled = bundled_default_adapter()
    if bundled is not None:
        assert read_manifest(bundled)["format_version"] == 1


@pytest.mark.parametrize("version", [0, 3, "missing", "2", 2.5, True, None])
def test_unknown_manifest_formats_are_refused(tmp_path, version):
    write_manifest(tmp_path, base_model="b", fingerprint="v2-0123456789abcdef", config=CONFIG)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    if version == "missing":
        del manifest["format_version"]
    else:
        manifest["format_version"] = version
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AdapterMismatchError, match=r"is not one this gsa-rag reads \(1, 2\); upgrade gsa-rag or retrain"):
        read_manifest(tmp_path)
    with pytest.raises(AdapterMismatchError):
        adapter_config(tmp_path)


# --- a config with another layout than the trained one -------------------------------------------

LAYOUT_WARNING = "lays the context out otherwise than"


def layout_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, UserWarning) and LAYOUT_WARNING in str(w.message)]


@pytest.mark.parametrize("changes, named", [({"chunk_size": 8}, "chunk_size=8 where it was trained with chunk_size=4"),
                                            ({"sink": 3, "top_k": 2}, "sink=3 where it was trained with sink=2")])
def test_a_config_with_another_layout_warns(bases, adapter, changes, named):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        GistEngine.from_pretrained(str(bases[0]), adapter=str(adapter), config=dataclasses.replace(CONFIG, **changes),
                                   device="cpu")
    (warning,) = layout_warnings(record)
    message = str(warning.message)
    assert named in message and "answers will be worse" in message and "leave `config` out" in message
    assert "top_k" not in message  # a selection setting is the user's to tune
    assert warning.filename == __file__  # points at the call, not into gsa_rag


@pytest.mark.parametrize("config", [None, dataclasses.replace(CONFIG, top_k=3, k_policy="top_p", first_selecting_layer=0),
                                    GistConfig(chunk_size=0, sink=7)])
def test_the_trained_layout_or_full_attention_does_not_warn(bases, adapter, config):
    """None: the trained config; other selection settings; chunk_size 0 (full attention, a baseline)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        engine = GistEngine.from_pretrained(str(bases[0]), adapter=str(adapter), config=config, device="cpu")
    assert not layout_warnings(record)
    assert engine.config == (config or CONFIG)


def test_an_adapter_from_a_newer_gsa_rag_still_runs_with_a_given_config(bases, adapter, tmp_path):
    """Regression: the layout check parsed the manifest's gist config, which refuses fields it does
    not know, so an explicit config (the CLI always passes one) could no longer load such an adapter."""
    newer = tmp_path / "newer"
    shutil.copytree(adapter, newer)
    manifest = json.loads((newer / "gsa_adapter.json").read_text())
    manifest["gist_config"]["a_field_from_the_future"] = 1
    (newer / "gsa_adapter.json").write_text(json.dumps(manifest))
    engine = GistEngine.from_pretrained(str(bases[0]), adapter=str(newer), config=CONFIG, device="cpu")
    assert engine.config == CONFIG


def test_a_full_model_folder_warns_too(bases, tmp_path):
    """`gsa-rag train --full` writes the manifest beside the model's weights: the same check."""
    shutil.copytree(bases[0], tmp_path / "full")
    write_manifest(tmp_path / "full", base_model="b", fingerprint="v2-0", config=CONFIG)
    with pytest.warns(UserWarning, match=LAYOUT_WARNING):
        GistEngine.from_pretrained(str(tmp_path / "full"), adapter=None, config=GistConfig(), device="cpu")


def test_the_command_line_warns_only_on_a_layout_override(bases, adapter, capsys):
    """The CLI passes the adapter's config with the command's options over it: no option, or a
    selection option, keeps the trained layout; a layout option is deliberate, but its cost is not
    visible from the flag, so it is warned about as through the API."""
    from gsa_rag.cli import main

    ask = ["ask", "Who?", "--passage", "Ann wrote it.", "--model", str(bases[0]), "--adapter", str(adapter),
           "--device", "cpu", "--max-new-tokens", "1"]
    for options, warned in (([], 0), (["--top-k", "2"], 0), (["--chunk-size", "0"], 0), (["--sink", "3"], 1)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            main(ask + options)
        assert len(layout_warnings(record)) == warned, options


def test_loading_an_adapter_passes_on_no_deprecation_warning_from_peft(bases, adapter):
    """PEFT calls transformers' `is_gradient_checkpointing`, deprecated in v5: every `gsa-rag ask`
    printed that FutureWarning, which no user of ours can act on."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        GistEngine.from_pretrained(str(bases[0]), adapter=str(adapter), device="cpu")
    assert not [w for w in record if "is_gradient_checkpointing" in str(w.message)]
