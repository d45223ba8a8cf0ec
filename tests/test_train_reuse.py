"""`train sft --reuse`: the KV-reuse (gist memory) layout in training is the one inference uses,
and the training forward over it is what GistMemory computes."""

import json

import pytest
import torch
from test_train import PASSAGES, _rag_file, _state, fork_two_ranks, tiny_dir  # noqa: F401  (tiny_dir: a fixture)

from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.generation import forward
from gsa_rag.memory import GistMemory
from gsa_rag.models import load_model
from gsa_rag.prompt import build_reuse_segments
from gsa_rag.train.data import IGNORE, collate, rag_example
from gsa_rag.train.loop import (
    TrainArgs,
    _wrap_trainable,
    batch_loss,
    reuse_link_ids,
    train,
)

QUESTION = "When was the Vasa raised?"
ANSWER = "in the year 1961"


@pytest.fixture()
def tiny(tiny_dir):  # noqa: F811
    return load_model(str(tiny_dir), device="cpu")


def test_reuse_example_is_the_gist_memory_prompt_plus_the_answer(tiny):
    _, tok = tiny
    config = GistConfig(chunk_size=4, sink=2)
    link_ids = reuse_link_ids(TrainArgs(stage="sft", output="", reuse=True), config, tok)
    assert link_ids == [tok.convert_tokens_to_ids(t) for t in config.link_tokens]  # all of them, as GistMemory
    example = rag_example(tok, QUESTION, PASSAGES, ANSWER, link_ids=link_ids)
    prompt = build_reuse_segments(tok, QUESTION, PASSAGES, link_ids)
    assert example.segments[:-1] == prompt[:-1]
    assert example.segments[-1].ids[: len(prompt[-1].ids)] == prompt[-1].ids
    assert [s.independent for s in example.segments].count(True) == len(PASSAGES)
    batch = collate([example, rag_example(tok, "Capital of Sweden?", PASSAGES[1:], "Stockholm", link_ids=link_ids)],
                    config, tok)
    layout = batch.layout
    assert int(layout.is_link[0].sum()) == len(PASSAGES) * len(link_ids)
    assert set(layout.doc_id[0].tolist()) == {-1, 0, 1}
    trained = batch.labels[0] != IGNORE
    assert not trained[layout.is_link[0] | layout.is_gist[0]].any()
    assert tok.decode(layout.input_ids[0][trained]).startswith(ANSWER)
    # --num-links picks the first n link tokens; 0 is the plain independent-passage layout
    assert reuse_link_ids(TrainArgs(stage="sft", output="", reuse=True, num_links=2), config, tok) == link_ids[:2]
    assert reuse_link_ids(TrainArgs(stage="sft", output="", reuse=False), config, tok) is None
    with pytest.raises(ValueError, match="num-links"):
        reuse_link_ids(TrainArgs(stage="sft", output="", reuse=True, num_links=9), config, tok)
    with pytest.raises(ValueError, match="train sft"):
        reuse_link_ids(TrainArgs(stage="cpt", output="", reuse=True), config, tok)


@pytest.mark.parametrize("num_links", [None, 1])
def test_reuse_sft_forward_is_the_gist_memory_forward(tiny, num_links):
    """Teacher-forced answer logits of one training forward over a reuse example == GistMemory:
    passages encoded alone and cached, re-rotated into place, links + question prefilled over
    them, then one decode step per answer token (exact with sink == 0, see gsa_rag.memory)."""
    model, tok = tiny
    config = GistConfig(chunk_size=4, sink=0, top_k=1)
    engine = GistEngine(model, tok, config)
    memory = GistMemory(engine, num_links=num_links, progress=False)
    link_ids = reuse_link_ids(TrainArgs(stage="sft", output="", reuse=True, num_links=num_links), config, tok)
    assert link_ids == memory.link_ids
    example = rag_example(tok, QUESTION, PASSAGES, ANSWER, link_ids=link_ids)
    layout = collate([example], config, tok).layout
    n = example.loss_tokens
    answer = layout.input_ids[:, -n:]
    with torch.no_grad():
        train_logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                             gsa_state=_state(layout, config), use_cache=False).logits[0]
        step_layout, cache = memory.prepare(QUESTION, memory.add(PASSAGES))
        assert torch.equal(step_layout.input_ids, layout.input_ids[:, :-n])  # the same prompt, token for token
        assert torch.equal(step_layout.doc_id, layout.doc_id[:, :-n])
        assert torch.equal(step_layout.position_ids, layout.position_ids[:, :-n])
        out, _ = forward(model, step_layout, len(cache.pending), cache, config)
        step_logits = [out.logits[0, -1]]
        for t in range(n - 1):
            step_layout = step_layout.append(answer[:, t : t + 1])
            out, _ = forward(model, step_layout, 1, cache, config)
            step_logits.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(step_logits), train_logits[-n - 1 : -1], atol=1e-4, rtol=1e-4)


def test_reuse_steps_lower_the_loss_and_train_the_link_rows(tiny):
    model, tok = tiny
    config = GistConfig(chunk_size=4, sink=2, top_k=1)
    args = TrainArgs(stage="sft", output="", reuse=True, lora_r=8)
    link_ids = reuse_link_ids(args, config, tok)
    batch = collate([rag_example(tok, QUESTION, PASSAGES, "1961", link_ids=link_ids),
                     rag_example(tok, "What is the capital of Sweden?", PASSAGES[1:], "Stockholm", link_ids=link_ids)],
                    config, tok)
    model = _wrap_trainable(model, tok, args, config)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    assert trainable, "the gist/link embedding rows must be trainable"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = batch_loss(model, batch, config)
    first.backward()
    # the link rows (PEFT's trainable tokens, in config.special_tokens order) receive gradient
    rows = [tok.convert_tokens_to_ids(t) for t in config.special_tokens]
    grad = next(p.grad for _, p in trainable if p.grad is not None)
    for i, token in enumerate(rows):
        if token in link_ids:
            assert grad[i].abs().sum() > 0
    optimizer.step()
    for _ in range(2):
        optimizer.zero_grad()
        batch_loss(model, batch, config).backward()
        optimizer.step()
    assert batch_loss(model, batch, config).item() < first.item()


def test_cli_train_sft_reuse_records_the_layout_and_serves_gist_memory(tiny_dir, tmp_path):  # noqa: F811
    from gsa_rag.cli import main

    out = tmp_path / "reuse"
    main(["train", "sft", "--reuse", "--num-links", "2", "--model", str(tiny_dir), "--data", _rag_file(tmp_path),
          "--output", str(out), "--steps", "2", "--batch-size", "1", "--chunk-size", "4", "--sink", "0"])
    manifest = json.loads((out / "gsa_adapter.json").read_text())
    assert manifest["kv_reuse"] == {"num_links": 2, "link_tokens": ["<link1>", "<link2>"]}
    assert manifest["train_args"]["reuse"] is True
    engine = GistEngine.from_pretrained(str(tiny_dir), adapter=str(out), device="cpu")
    memory = GistMemory(engine, progress=False)  # the number of links comes from the adapter
    assert memory.num_links == 2 and engine.adapter["kv_reuse"]["num_links"] == 2
    assert isinstance(engine.generate(QUESTION, memory.add(PASSAGES), memory=memory, max_new_tokens=2), str)
    with pytest.raises(SystemExit):  # cpt has no passages to reuse
        main(["train", "cpt", "--reuse", "--model", str(tiny_dir), "--data", _rag_file(tmp_path),
              "--output", str(tmp_path / "cpt")])
    plain = train(TrainArgs(stage="sft", output=str(tmp_path / "plain"), base=str(tiny_dir), data=[_rag_file(tmp_path)],
                            steps=1, batch_size=1, gist={"chunk_size": 4}))
    assert json.loads((plain / "gsa_adapter.json").read_text())["kv_reuse"] is None
    plain_engine = GistEngine.from_pretrained(str(tiny_dir), adapter=str(plain), device="cpu")
    assert GistMemory(plain_engine, progress=False).num_links == len(plain_engine.config.link_tokens)


def test_fsdp2_two_processes_train_the_same_adapter_as_one(tiny_dir, tmp_path):  # noqa: F811
    """FSDP2 (accelerate's FSDP plugin, fsdp_version 2) over 2 CPU processes on gloo: the adapter
    equals one process training the same two examples per step, and its checkpoints hold whole
    tensors (they load into an unsharded model).

    accelerate enables FSDP only on accelerator devices; tests/fsdp_cpu_launch.py lifts that one
    gate (see its docstring). On GPUs the same run is
    `accelerate launch --config_file examples/accelerate_fsdp2.yaml -m gsa_rag.cli train ...`."""
    import importlib

    from safetensors.torch import load_file

    from gsa_rag.train.checkpoint import load_checkpoint

    data = _rag_file(tmp_path)
    common = ["train", "sft", "--reuse", "--model", str(tiny_dir), "--data", data, "--steps", "2",
              "--log-every", "1", "--chunk-size", "4", "--lr", "1e-2", "--warmup", "0"]
    # as `python -m torch.distributed.run ... tests/fsdp_cpu_launch.py ARGS` runs: its patch, then the CLI
    fork_two_ranks([*common, "--batch-size", "1", "--save-every", "1", "--output", str(tmp_path / "fsdp")],
                   env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
                   before=lambda: importlib.import_module("fsdp_cpu_launch"))
    manifest = json.loads((tmp_path / "fsdp" / "gsa_adapter.json").read_text())
    assert manifest["parallelism"] == "fsdp2" and manifest["num_processes"] == 2 and manifest["kv_reuse"]["num_links"] == 4

    from gsa_rag.cli import main

    main([*common, "--batch-size", "2", "--output", str(tmp_path / "one")])
    sharded = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    single = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert sharded.keys() == single.keys()
    moved = 0
    for name in single:
        torch.testing.assert_close(sharded[name].float(), single[name].float(), atol=2e-3, rtol=2e-2)
        moved += "lora_B" in name and bool(single[name].abs().sum() > 0)
    assert moved  # training did move the (zero-initialised) LoRA B matrices
    # a checkpoint written under FSDP holds whole tensors: it loads into an unsharded model
    model, tok = load_model(str(tiny_dir), device="cpu")
    model = _wrap_trainable(model, tok, TrainArgs(stage="sft", output="", reuse=True), GistConfig(chunk_size=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "step-0000001", model, optimizer, None) == 1
