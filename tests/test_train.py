"""Training on tiny models (CPU): loss goes down, the training forward is the inference forward,
adapters round-trip, checkpoints resume, and accelerate runs two processes."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig

from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.generation import forward
from gsa_rag.models import load_model
from gsa_rag.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gsa_rag.train.data import IGNORE, collate, pack_documents, rag_example
from gsa_rag.train.loop import (
    TrainArgs,
    _save_result,
    _wrap_trainable,
    batch_loss,
    train,
)

PASSAGES = [{"title": "Vasa", "text": "The warship Vasa sank in 1628 and was raised in 1961 from Stockholm harbour."},
            {"title": "Stockholm", "text": "Stockholm is the capital of Sweden, built on fourteen islands."}]
TEXT = ("Gist tokens summarise chunks of text so that later tokens can recall them. " * 20).strip()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    """A tiny random Llama with the default model's tokenizer, saved like any local model."""
    path = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture()
def tiny(tiny_dir):
    return load_model(str(tiny_dir), device="cpu")


def sft_batch(tok, config):
    examples = [rag_example(tok, "When was the Vasa raised?", PASSAGES, "1961"),
                rag_example(tok, "What is the capital of Sweden?", PASSAGES[1:], "Stockholm")]
    return collate(examples, config, tok)


def cpt_batch(tok, config):
    return collate(pack_documents([TEXT, TEXT], tok, block_tokens=64, tail_tokens=16), config, tok)


@pytest.mark.parametrize("make_batch", [cpt_batch, sft_batch], ids=["cpt", "sft"])
@pytest.mark.parametrize("chunk_size", [4, 0], ids=["gsa", "no-gists-baseline"])
def test_a_few_steps_lower_the_loss_on_a_repeated_batch(tiny, make_batch, chunk_size):
    model, tok = tiny
    config = GistConfig(chunk_size=chunk_size, sink=2, top_k=1)
    batch = make_batch(tok, config)
    model = _wrap_trainable(model, tok, TrainArgs(stage="cpt", output="", lora_r=8), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = batch_loss(model, batch, config)
    for _ in range(3):
        optimizer.zero_grad()
        batch_loss(model, batch, config).backward()
        optimizer.step()
    assert batch_loss(model, batch, config).item() < first.item()


def test_labels_skip_gists_padding_and_sft_prompts(tiny):
    _, tok = tiny
    config = GistConfig(chunk_size=4, sink=2)
    batch = sft_batch(tok, config)
    trained = batch.labels != IGNORE
    assert not trained[batch.layout.is_gist].any() and not trained[~batch.layout.valid].any()
    answer = tok.decode(batch.layout.input_ids[0][trained[0]])
    assert answer.startswith("1961")
    cpt = cpt_batch(tok, config)
    assert (cpt.labels != IGNORE).sum() == (cpt.layout.valid & ~cpt.layout.is_gist).sum() - cpt.layout.batch_size


def test_sft_forward_is_the_inference_forward(tiny):
    """Teacher-forced answer logits in one training forward == prefill + one decode step per token."""
    model, tok = tiny
    config = GistConfig(chunk_size=4, sink=2, top_k=1)
    example = rag_example(tok, "When was the Vasa raised?", PASSAGES, "in the year 1961")
    batch = collate([example], config, tok)
    layout = batch.layout
    with torch.no_grad():
        train_logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                             gsa_state=_state(layout, config), use_cache=False).logits[0]
        n = example.loss_tokens
        prompt_len = layout.seq_len - n
        step_layout = _truncate(layout, prompt_len)
        cache = DynamicCache()
        out, _ = forward(model, step_layout, prompt_len, cache, config)
        step_logits = [out.logits[0, -1]]
        for t in range(prompt_len, layout.seq_len - 1):
            step_layout = step_layout.append(layout.input_ids[:, t : t + 1])
            out, _ = forward(model, step_layout, 1, cache, config)
            step_logits.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(step_logits), train_logits[prompt_len - 1 : -1], atol=1e-4, rtol=1e-4)


def _state(layout, config):
    from gsa_rag.attention import GistState

    return GistState.for_new_tokens(layout, layout.seq_len, config)


def _truncate(layout, n):
    from gsa_rag.layout import GistLayout

    return GistLayout(**{f.name: (getattr(layout, f.name)[:, :n] if f.name not in ("num_chunks", "gist_index")
                             else getattr(layout, f.name)) for f in fields(layout)})


def test_adapter_saves_loads_and_reproduces_logits(tiny_dir, tmp_path):
    model, tok = load_model(str(tiny_dir), device="cpu")
    from gsa_rag.adapters import base_fingerprint

    fingerprint = base_fingerprint(model)
    config = GistConfig(chunk_size=4, sink=2, top_k=1)
    args = TrainArgs(stage="sft", output=str(tmp_path / "adapter"), base=str(tiny_dir), lora_r=8)
    peft_model = _wrap_trainable(model, tok, args, config)
    with torch.no_grad():  # stand-in for training: move every trainable weight (to bf16 values,
        for p in peft_model.parameters():  # as the adapter is stored in bf16)
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05).copy_(p.bfloat16().float())
    batch = sft_batch(tok, config)
    with torch.no_grad():
        want = peft_model(input_ids=batch.layout.input_ids, position_ids=batch.layout.position_ids,
                          gsa_state=_state(batch.layout, config)).logits
    _save_result(peft_model, tok, tmp_path / "adapter", args, config, fingerprint, [1.0])
    size = sum(f.stat().st_size for f in (tmp_path / "adapter").iterdir())
    assert size < 2_000_000  # no full embedding copy inside

    engine = GistEngine.from_pretrained(str(tiny_dir), adapter=str(tmp_path / "adapter"), device="cpu")
    assert engine.config == config
    with torch.no_grad():
        got = engine.model(input_ids=batch.layout.input_ids, position_ids=batch.layout.position_ids,
                           gsa_state=_state(batch.layout, config)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, GistEngine.from_pretrained(str(tiny_dir), adapter=None, config=config, device="cpu")
                              .model(input_ids=batch.layout.input_ids, position_ids=batch.layout.position_ids,
                                     gsa_state=_state(batch.layout, config)).logits.detach())


def test_adapter_for_another_base_is_refused(tiny_dir, tmp_path, default_model_dir):
    out = train(TrainArgs(stage="cpt", output=str(tmp_path / "a"), base=str(tiny_dir), data=[_text_file(tmp_path)],
                          steps=1, batch_size=1, block_tokens=64, tail_tokens=8, gist={"chunk_size": 4}))
    with pytest.raises(ValueError, match="trained on base model"):
        GistEngine.from_pretrained(str(default_model_dir), adapter=str(out), device="cpu")
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        train(TrainArgs(stage="cpt", output=str(out), base=str(tiny_dir), data=[_text_file(tmp_path)], steps=1))


def test_output_folder_expands_home(tiny_dir, tmp_path, monkeypatch):
    """Regression: --output ~/a wrote a folder named '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    out = train(TrainArgs(stage="cpt", output="~/a", base=str(tiny_dir), data=[_text_file(tmp_path)],
                          steps=1, batch_size=1, block_tokens=64, tail_tokens=8, gist={"chunk_size": 4}))
    assert out == tmp_path / "home" / "a" and (out / "gsa_adapter.json").is_file()
    assert not (tmp_path / "~").exists()


def _text_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": TEXT}) for _ in range(4)))
    return str(path)


def test_checkpoint_round_trip_and_resume(tiny_dir, tmp_path, monkeypatch):
    data = [_text_file(tmp_path)]
    args = TrainArgs(stage="cpt", output=str(tmp_path / "run"), base=str(tiny_dir), data=data, steps=4, batch_size=1,
                     block_tokens=64, tail_tokens=8, save_every=2, log_every=1, gist={"chunk_size": 4})
    from gsa_rag.train import loop

    real_collate, calls = loop.collate, {"n": 0}

    def crash_on_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_collate(*a, **k)

    monkeypatch.setattr(loop, "collate", crash_on_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(args)
    monkeypatch.setattr(loop, "collate", real_collate)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-0000002"
    args.resume = True
    train(args)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.fixture()
def no_model_load(monkeypatch):
    """Loading a model fails the test: the run must be refused before it."""
    import gsa_rag.models

    monkeypatch.setattr(gsa_rag.models, "load_model", lambda *a, **k: pytest.fail("the run went on to load the model"))


def test_a_new_run_needs_an_empty_output_and_a_resumed_one_its_own_settings(tmp_path, no_model_load):
    args = TrainArgs(stage="cpt", output=str(tmp_path / "run"), data=["x.txt"], steps=4, lr=1e-4)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.md").write_text("the user's")
    with pytest.raises(FileExistsError, match="not empty"):
        train(args)
    assert (run / "notes.md").read_text() == "the user's"
    # an interrupted run's checkpoint: a fresh run there is refused, a resume must match its settings
    (run / "notes.md").unlink()
    step = run / "checkpoints" / "step-0000002"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"args": json.loads(json.dumps(dataclasses.asdict(args), default=str))}))
    with pytest.raises(FileExistsError, match="add --resume"):
        train(args)
    for changed in ({"lr": 1e-5}, {"gist": {"chunk_size": 4}}, {"lora_r": 8}, {"data": ["y.txt"]}):
        with pytest.raises(ValueError, match=f"{next(iter(changed))}: .* there, .* now"):
            train(dataclasses.replace(args, resume=True, **changed))
    with pytest.raises(FileExistsError, match="holds no checkpoint"):
        train(dataclasses.replace(args, resume=True, output=str(tmp_path)))  # a folder of other files


@pytest.mark.parametrize("bad", [{"steps": 0}, {"grad_accum": 0}, {"log_every": 0}, {"batch_size": -1},
                                 {"max_blocks": 0}, {"save_every": -1}, {"steps": 2.5}, {"max_minutes": -1},
                                 {"max_minutes": float("nan")}, {"selection_loss": float("nan")}])
def test_counts_are_refused_before_the_model_loads(bad, tmp_path, no_model_load):
    with pytest.raises(ValueError, match=next(iter(bad)).replace("_", "[_-]")):
        train(TrainArgs(stage="sft", output=str(tmp_path / "run"), data=["x.txt"], **bad))


def test_a_resume_under_another_process_count_is_refused(tmp_path):
    from gsa_rag.train.loop import _resumed_progress

    step = tmp_path / "step-0000002"
    step.mkdir()
    (step / "state.json").write_text(json.dumps({"progress": {"num_processes": 2, "losses": [1.5]}}))
    assert _resumed_progress(step, 2)["losses"] == [1.5]
    with pytest.raises(ValueError, match="written by 2 processes, this run has 1; resume with 2"):
        _resumed_progress(step, 1)


def _two_answer_lengths(tmp_path) -> str:
    data = tmp_path / "rag.jsonl"
    rows = [{"id": "short", "question": "When was the Vasa raised?", "answers": ["1961"]},
            {"id": "long", "question": "How was the Vasa found?",
             "answers": ["Anders Franzen found it in 1956 in Stockholm harbour, and it was raised five years later"]}]
    data.write_text("\n".join(json.dumps(dict(r, source="test", passages=PASSAGES)) for r in rows))
    return str(data)


def test_every_answer_token_weighs_the_same_however_a_step_is_split(tiny_dir, tmp_path, monkeypatch):
    """One micro-batch of 2 examples and 2 accumulated micro-batches of 1 give the optimizer the same
    gradient when the answers differ in length: the loss is the mean over the step's tokens, not a
    mean of the micro-batches' means (which weighs a short answer's tokens up)."""
    seen = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, *a, **k):
            seen.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]).clone())
            return super().step(*a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    common = {"stage": "sft", "base": str(tiny_dir), "data": [_two_answer_lengths(tmp_path)], "steps": 1, "lr": 1e-2,
              "warmup": 0, "gist": {"chunk_size": 4}}
    train(TrainArgs(output=str(tmp_path / "one"), batch_size=2, **common))
    train(TrainArgs(output=str(tmp_path / "two"), batch_size=1, grad_accum=2, **common))
    assert len(seen) == 2 and seen[0].abs().max() > 0
    # on CUDA the run is in bf16 autocast, where batching alone moves a gradient by ~1e-3 of its norm;
    # the weighting this guards moved it by 0.56
    tolerance = 2e-2 if torch.cuda.is_available() else 1e-5
    assert float((seen[1] - seen[0]).norm() / seen[0].norm()) < tolerance


def test_a_run_stopped_by_its_time_budget_resumes_to_the_uninterrupted_result(tiny_dir, tmp_path):
    """--max-minutes writes the adapter as it stands (marked stopped early) and a checkpoint;
    --resume finishes the run, and its manifest counts every step and ends on the same loss as a
    run that never stopped."""
    from gsa_rag.adapters import read_manifest

    common = {"stage": "sft", "base": str(tiny_dir), "data": [_two_answer_lengths(tmp_path)], "steps": 3, "lr": 1e-2,
              "warmup": 0, "batch_size": 1, "grad_accum": 2, "gist": {"chunk_size": 4}}
    whole = train(TrainArgs(output=str(tmp_path / "whole"), **common))
    stopped = TrainArgs(output=str(tmp_path / "stopped"), max_minutes=1e-9, **common)
    train(stopped)
    early = read_manifest(tmp_path / "stopped")
    assert early["stopped_early"] and early["steps_done"] == 1 and early["micro_steps_done"] == 2
    with pytest.raises(FileExistsError, match="add --resume"):
        train(stopped)
    train(dataclasses.replace(stopped, resume=True, max_minutes=0.0))
    done, reference = read_manifest(tmp_path / "stopped"), read_manifest(whole)
    assert not done["stopped_early"] and done["steps_done"] == 3 and done["micro_steps_done"] == 6
    assert done["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-6)
    with pytest.raises(FileExistsError, match="already holds a trained adapter"):
        train(dataclasses.replace(stopped, resume=True))  # finished: nothing more to resume


def test_an_init_adapter_keeps_its_lora_rank_and_the_manifest_says_so(tmp_path):
    from gsa_rag.train.loop import _lora_from_init_adapter

    adapter = tmp_path / "stage1"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    args = TrainArgs(stage="sft", output="out", init_adapter=str(adapter))
    kept = _lora_from_init_adapter(args)
    assert (kept.lora_r, kept.lora_alpha) == (8, 16)
    with pytest.raises(ValueError, match="--lora-r 4: --init-adapter continues .* lora_r = 8"):
        _lora_from_init_adapter(dataclasses.replace(args, lora_r=4))


def test_a_checkpoint_of_other_shapes_is_refused_not_broadcast(tmp_path):
    small, large = torch.nn.Linear(4, 1), torch.nn.Linear(4, 16)
    optimizer = torch.optim.AdamW(small.parameters())
    path = save_checkpoint(tmp_path, small, optimizer, None, step=1, args={})
    with pytest.raises(ValueError, match=r"weight is \(1, 4\) in the checkpoint, \(16, 4\) here"):
        load_checkpoint(path, large, torch.optim.AdamW(large.parameters()), None)


def test_checkpoint_restores_parameters_and_optimizer(tiny, tmp_path):
    model, tok = tiny
    config = GistConfig(chunk_size=4, sink=2)
    model = _wrap_trainable(model, tok, TrainArgs(stage="cpt", output="", lora_r=4), config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    batch_loss(model, cpt_batch(tok, config), config).backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, model, optimizer, None, 1, {"note": "test"})
    saved = [p.detach().clone() for p in params]
    moments = [optimizer.state[p]["exp_avg"].clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.zero_()
    optimizer.state.clear()
    assert load_checkpoint(path, model, optimizer, None) == 1
    for p, s, m in zip(params, saved, moments):
        assert torch.equal(p, s) and torch.equal(optimizer.state[p]["exp_avg"], m)


def test_accelerate_two_processes_run_a_step(tiny_dir, tmp_path):
    data = _rag_file(tmp_path)
    # accelerate's own launcher runs one process with --cpu; torchrun (what it uses for several
    # GPUs) starts two, and Accelerator joins them over gloo (the one test that starts new ranks through
    # torchrun; the others fork them: fork_two_ranks)
    run_two_ranks(["-m", "gsa_rag.cli", "train", "sft", "--model", str(tiny_dir), "--data", data,
                   "--output", str(tmp_path / "ddp"), "--steps", "2", "--batch-size", "1", "--log-every", "1",
                   "--chunk-size", "4"])
    manifest = json.loads((tmp_path / "ddp" / "gsa_adapter.json").read_text())
    assert manifest["stage"] == "sft" and manifest["gist_config"]["chunk_size"] == 4
    assert manifest["num_processes"] == 2
    # the learning-rate schedule counts optimizer steps, not steps x processes (warmup 10, lr 2e-4)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([2e-5, 4e-5])


def test_default_engine_loads_the_bundled_trained_adapter(default_model_dir):
    from gsa_rag.adapters import adapter_config, bundled_default_adapter

    bundled = bundled_default_adapter()
    assert bundled is not None, "the package should ship the trained 8x adapter"
    engine = GistEngine.from_pretrained(device="cpu")  # base fingerprint checked on load
    assert engine.config == adapter_config(bundled) and engine.config.chunk_size == 8
    untrained = GistEngine.from_pretrained(device="cpu", adapter=None)
    layout = engine.layout(["When was the Vasa raised?"], [PASSAGES])
    with torch.no_grad():
        trained_logits = engine.model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                                      gsa_state=_state(layout, engine.config)).logits
        base_logits = untrained.model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                                      gsa_state=_state(layout, engine.config)).logits
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3)


def test_init_adapter_default_continues_the_bundled_adapter(default_model_dir, tiny_dir, tmp_path):
    """`--init-adapter default` (README: H-GSA 32x from the bundled 8x) starts from the bundled
    adapter's weights and config, the command line's gist options on top; the manifest records the
    path. With another base model it is refused."""
    from gsa_rag.adapters import adapter_config, bundled_default_adapter, read_manifest

    out = train(TrainArgs(stage="cpt", output=str(tmp_path / "h32"), data=[_text_file(tmp_path)], init_adapter="default",
                          steps=1, batch_size=1, block_tokens=64, tail_tokens=8, lr=0.0, gist={"meta_chunks": (4,)}))
    manifest = read_manifest(out)
    assert manifest["train_args"]["init_adapter"] == str(bundled_default_adapter())
    bundled = adapter_config(bundled_default_adapter())
    assert adapter_config(out) == dataclasses.replace(bundled, meta_chunks=(4,))
    # lr 0: the adapter written is the bundled one, continued
    trained = load_file(str(Path(out) / "adapter_model.safetensors"))
    start = load_file(str(bundled_default_adapter() / "adapter_model.safetensors"))
    assert trained.keys() == start.keys() and all(torch.equal(trained[k], start[k]) for k in start)
    with pytest.raises(ValueError, match="bundled for the default model"):
        train(TrainArgs(stage="cpt", output=str(tmp_path / "x"), base=str(tiny_dir), data=[_text_file(tmp_path)],
                        init_adapter="default", steps=1))


def test_cpt_reads_hugging_face_datasets_when_online(monkeypatch, tiny):
    import types

    from gsa_rag.train.data import read_texts

    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": TEXT}, {"text": "  "}, {"text": "second document"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(read_texts(["hf:wikitext:wikitext-2-raw-v1:train"])) == [TEXT, "second document"]
    assert list(read_texts(["hf:roneneldan/TinyStories:validation"]))[-1] == "second document"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train", True), ("roneneldan/TinyStories", None, "validation", True)]
    with pytest.raises(ValueError, match="hf:NAME:SPLIT"):
        list(read_texts(["hf:only-a-name"]))


def test_full_fine_tuning_and_gradient_checkpointing(tiny_dir, tmp_path):
    model, tok = load_model(str(tiny_dir), device="cpu")
    config = GistConfig(chunk_size=4, sink=2, top_k=1)
    batch = sft_batch(tok, config)
    model.train()
    plain = batch_loss(model, batch, config)
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = batch_loss(model, batch, config)
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, plain)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)

    out = train(TrainArgs(stage="sft", output=str(tmp_path / "full"), base=str(tiny_dir), full=True,
                          data=[_rag_file(tmp_path)], steps=2, batch_size=1, gist={"chunk_size": 4},
                          gradient_checkpointing=True))
    engine = GistEngine.from_pretrained(str(out), adapter=None, config=config, device="cpu")
    assert isinstance(engine.generate("When was the Vasa raised?", PASSAGES, max_new_tokens=2), str)
    # without a config the model's own folder says how it was trained (as an adapter's does)
    own = GistEngine.from_pretrained(str(out), adapter=None, device="cpu")
    assert own.config.chunk_size == 4 and own.adapter is not None
    from gsa_rag import cli

    class Args:
        model, adapter, device, fuse, no_cuda_graphs = str(out), "default", "cpu", False, False
        chunk_size = top_k = k_policy = sink = meta_chunks = chunk = levels = section_top_k = None

    assert cli._engine(Args).config.chunk_size == 4 and Args.fully_trained


def run_two_ranks(args: list[str], env: dict | None = None, cwd=None) -> None:
    """`torchrun --standalone --nproc_per_node 2 ARGS` on the CPU (one thread per rank); fails the
    test with the ranks' stderr when they fail. --standalone picks a free port, so parallel runs
    never share a rendezvous; the ranks get a process group of their own, killed whole on a
    timeout, so none outlives the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, stderr[-3000:]


def fork_two_ranks(argv: list[str], env: dict | None = None, before=None) -> None:
    """`gsa_rag.cli.main(argv)` as two ranks on the CPU (one thread each) that join over gloo,
    forked from this process: a rank starts with torch, transformers and gsa_rag imported, where
    a new interpreter spends ~8 s of a 2-core machine importing them (`run_two_ranks` starts
    new ones, as torchrun does).

    Each rank gets the variables torchrun gives its workers (RANK, WORLD_SIZE, MASTER_ADDR/PORT,
    ...) and `env`, and accelerate's process-wide state is cleared (a test here may have trained
    in this process; a new one has none); `before()` then runs in the rank (e.g. a launcher's
    patch). The port is one the kernel just handed out, so parallel runs do not share a
    rendezvous. A rank that fails ends the other (it would wait for it at the next collective)
    and fails the test with its traceback; after 300 s both are killed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    codes = {}  # pid -> exit code (-9: killed here), None while running
    with tempfile.TemporaryDirectory() as folder:
        try:
            for rank in range(2):
                pid = os.fork()
                if pid == 0:
                    _rank_main(argv, {**(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                      "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": str(rank),
                                      "LOCAL_RANK": str(rank)}, before, Path(folder) / f"rank{rank}.txt")
                codes[pid] = None
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and None in codes.values() and not any(codes.values()):
                for pid in [pid for pid, code in codes.items() if code is None]:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    codes[pid] = os.waitstatus_to_exitcode(status) if done else None
                time.sleep(0.05)
        finally:
            for pid in [pid for pid, code in codes.items() if code is None]:
                os.kill(pid, signal.SIGKILL)
                codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        said = [report.read_text()[-3000:] for report in sorted(Path(folder).iterdir())]
    assert not any(codes.values()), (f"ranks' exit codes {list(codes.values())} (-9: killed after 300 s or the other's "
                                     f"failure): {said}; their output is this test's captured stderr")


def _rank_main(argv, env, before, report: Path):
    """One forked rank of `fork_two_ranks`: never returns (os._exit), whatever happens."""
    code = 1
    try:
        torch.set_num_threads(1)  # a forked child has no OpenMP pool: torch must not wait on one
        os.environ.update(env)
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        if before is not None:
            before()
        from gsa_rag.cli import main

        main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        if code:
            report.write_text(f"SystemExit: {stop.code}")
    except BaseException:  # noqa: BLE001 - reported to the parent through the file
        report.write_text(traceback.format_exc())
    finally:
        os._exit(code)


def _rag_file(tmp_path):
    data = tmp_path / "rag.jsonl"
    record = {"id": "x", "question": "When was the Vasa raised?", "answers": ["1961"], "source": "test",
              "passages": [{"title": p["title"], "text": p["text"], "is_gold": True} for p in PASSAGES]}
    data.write_text("\n".join(json.dumps(dict(record, id=str(i))) for i in range(4)))
    return str(data)


def test_training_refuses_int8_scoring(tmp_path):
    """score_dtype is an inference option: an adapter trained with it would make every later load
    score int8 (its manifest keeps the config), so training refuses it before anything loads."""
    from gsa_rag.train.loop import start_config

    args = TrainArgs(stage="cpt", output=str(tmp_path / "a"), gist={"score_dtype": "int8"})
    with pytest.raises(ValueError, match="inference option"):
        start_config(args)
    assert start_config(TrainArgs(stage="cpt", output=str(tmp_path / "a"))).score_dtype == "cache"
