"""H-GSA through the engine, training, the CLI and the eval methods, on tiny random models (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from test_memory import PASSAGES, QUESTION, tiny_engine, tokenizer  # noqa: F401  (fixture)
from test_train import TEXT, tiny_dir  # noqa: F401  (fixture)
from transformers import DynamicCache

from gsa_rag import attention
from gsa_rag.attention import GistState
from gsa_rag.cli import main
from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.eval.methods.base import parse_spec
from gsa_rag.generation import forward
from gsa_rag.layout import Segment, build_layout
from gsa_rag.models import load_model
from gsa_rag.prompt import build_segments
from gsa_rag.train.data import IGNORE, collate, pack_documents

HIER = {"chunk_size": 4, "meta_chunks": (2,)}
DEEP = {"chunk_size": 3, "meta_chunks": (2, 2)}


@pytest.mark.parametrize("levels", [HIER, DEEP], ids=["two-levels", "three-levels"])
def test_generate_stream_and_batch_with_a_hierarchy(tokenizer, levels):  # noqa: F811
    engine = tiny_engine(tokenizer, **levels)
    layout = engine.layout([QUESTION], [PASSAGES])
    assert layout.levels == 1 + len(levels["meta_chunks"]) and (layout.level >= 1).any()
    single = engine.generate(QUESTION, PASSAGES, max_new_tokens=6)
    assert isinstance(single, str) and single
    assert "".join(engine.stream(QUESTION, PASSAGES, max_new_tokens=6)) == single
    other = "What is the capital of Sweden?"
    batch = engine.generate([QUESTION, other], [PASSAGES, PASSAGES[1:]], max_new_tokens=6)  # left padding
    assert batch == [single, engine.generate(other, PASSAGES[1:], max_new_tokens=6)]


def test_decode_steps_equal_one_forward_over_the_whole_sequence(tokenizer):  # noqa: F811
    """Prefill + one decode step per token (layout.append) == a single forward over the prompt
    and answer laid out at once (the training forward): appended tokens get the sections
    build_layout gives the tail, and per-step selection matches the one-shot mask."""
    engine = tiny_engine(tokenizer, **DEEP)
    model, config = engine.model, engine.config
    segments = build_segments(tokenizer, QUESTION, PASSAGES)
    answer_ids = tokenizer.encode(" in 1961 it was")[:4]
    prompt = build_layout([segments], config, tokenizer)
    tail = segments[-1]
    whole = build_layout([[*segments[:-1], Segment(tail.ids + tuple(answer_ids), False)]], config, tokenizer)
    answer = torch.tensor([answer_ids])
    with torch.no_grad():
        one = model(input_ids=whole.input_ids, position_ids=whole.position_ids,
                    gsa_state=GistState.for_new_tokens(whole, whole.seq_len, config), use_cache=False).logits[0]
        cache, layout = DynamicCache(), prompt
        out, _ = forward(model, layout, layout.seq_len, cache, config)
        steps = [out.logits[0, -1]]
        for t in range(answer.shape[1]):
            layout = layout.append(answer[:, t : t + 1])
            out, _ = forward(model, layout, 1, cache, config)
            steps.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(steps), one[prompt.seq_len - 1 :], atol=1e-4, rtol=1e-4)


def test_hierarchical_configs_ask_the_kernel_decode_path(tokenizer, monkeypatch):  # noqa: F811
    """Decode steps of H-GSA and single-level configs both go to the kernel dispatch (which
    runs kernels/hier_select.py on CUDA; tests/test_kernels.py compares it with the reference)."""
    calls = []

    def spy(module, query, *args):
        calls.append(query.shape[2])
        # None: "not taken", the reference path runs

    monkeypatch.setattr(attention, "sparse_decode_attention", spy)
    for config in (HIER, {"chunk_size": 4}):
        calls.clear()
        tiny_engine(tokenizer, **config).generate(QUESTION, PASSAGES, max_new_tokens=3)
        assert 1 in calls, config  # decode rows reached the dispatch


def test_decode_reads_fewer_keys_with_the_hierarchy(tokenizer):  # noqa: F811
    """In a layer that does not select (layer 0) a decode step sees every gist with one level,
    but only the meta-gists (plus sink and window) with two: the far context costs 4x fewer keys."""
    passages = PASSAGES * 6
    seen = {}
    for name, cfg in {"single": {"chunk_size": 2}, "hier": {"chunk_size": 2, "meta_chunks": (4,)}}.items():
        states = []
        tiny_engine(tokenizer, **cfg).generate(QUESTION, passages, max_new_tokens=2, observe=states.append)
        seen[name] = float(states[-1].attended[0].float().mean())  # layer 0: the forgetting mask
    assert seen["hier"] < seen["single"]


# --- training and the CLI ------------------------------------------------------------------------------------


def test_labels_never_target_meta_gists_and_a_training_step_runs(tiny_dir):  # noqa: F811
    from gsa_rag.train.loop import TrainArgs, _wrap_trainable, batch_loss

    model, tok = load_model(str(tiny_dir), device="cpu")
    config = GistConfig(sink=2, top_k=1, **HIER)
    batch = collate(pack_documents([TEXT, TEXT], tok, block_tokens=64, tail_tokens=16), config, tok)
    assert (batch.layout.level == 1).any()
    assert (batch.labels[batch.layout.level >= 0] == IGNORE).all()
    model = _wrap_trainable(model, tok, TrainArgs(stage="cpt", output="", lora_r=8), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = batch_loss(model, batch, config)
    for _ in range(3):
        optimizer.zero_grad()
        batch_loss(model, batch, config).backward()
        optimizer.step()
    assert batch_loss(model, batch, config).item() < first.item()


def test_cli_trains_with_levels_and_the_adapter_keeps_them(tiny_dir, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": TEXT}) for _ in range(4)))
    out = tmp_path / "h"
    common = ["train", "cpt", "--model", str(tiny_dir), "--data", str(data), "--steps", "1", "--batch-size", "1",
              "--block-tokens", "64", "--tail-tokens", "8", "--sink", "2"]
    main([*common, "--output", str(out), "--levels", "2", "--chunk", "4", "2", "--section-top-k", "3"])
    manifest = json.loads((out / "gsa_adapter.json").read_text())
    assert manifest["gist_config"]["chunk_size"] == 4 and manifest["gist_config"]["meta_chunks"] == [2]
    assert manifest["gist_config"]["section_top_k"] == 3  # the beam it was trained with
    engine = GistEngine.from_pretrained(str(tiny_dir), adapter=str(out), device="cpu")
    assert engine.config.meta_chunks == (2,) and engine.config.compression_ratio == 8
    assert engine.config.section_top_k == 3
    assert isinstance(engine.generate(QUESTION, PASSAGES, max_new_tokens=2), str)
    ask = ["ask", QUESTION, "--passage", PASSAGES[0]["text"], "--model", str(tiny_dir), "--adapter", str(out),
           "--max-new-tokens", "2", "--device", "cpu"]
    for turn_off in (["--meta-chunks", "0"], ["--k-policy", "top_p"], ["--section-top-k", "0"]):
        main([*ask, *turn_off])  # the saved beam gives way instead of refusing the command
        capsys.readouterr()
    for bad in (["--levels", "3", "--chunk", "4", "2"], ["--chunk", "4", "2", "--meta-chunks", "2"],
                ["--chunk", "4", "--section-top-k", "3"]):  # a beam over sections without sections
        with pytest.raises(SystemExit):
            main([*common, "--output", str(tmp_path / "bad"), *bad])
        assert "gsa-rag: error" in capsys.readouterr().err


# --- the rest of the system: eval specs (gist memory over a hierarchy: tests/test_memory_hierarchy.py) ---------


@pytest.mark.parametrize("spec,ratio,meta", [("gsa:chunk=8:meta=4", 32, (4,)), ("gsa:chunk=4:meta=4", 16, (4,)),
                                              ("gsa:chunk=8:meta=4x4", 128, (4, 4)), ("gsa", 8, ())])
def test_eval_specs_name_the_hierarchy(spec, ratio, meta):
    method = parse_spec(spec)
    config = method.gist_config(None)
    assert config.meta_chunks == meta and config.compression_ratio == ratio == method.compression_ratio()
    assert parse_spec(method.spec).gist_config(None) == config  # the canonical spec round-trips
    assert method.label.startswith("H-GSA" if meta else "GSA")
    with pytest.raises(ValueError, match="meta"):
        parse_spec("gsa:meta=four").gist_config(None)


def test_eval_spec_sets_the_section_beam():
    method = parse_spec("gsa:chunk=8:meta=4:sk=8")
    config = method.gist_config(None)
    assert (config.top_k, config.section_top_k, config.compression_ratio) == (4, 8, 32)
    assert parse_spec(method.spec).gist_config(None) == config and "8 sections" in method.label
    assert parse_spec("gsa:chunk=8:meta=4").gist_config(None).section_top_k is None
    for bad in ("gsa:sk=8", "gsa:meta=4:policy=top_p:sk=8"):  # a beam over sections needs sections, fixed k
        with pytest.raises(ValueError, match="sections"):
            parse_spec(bad)
