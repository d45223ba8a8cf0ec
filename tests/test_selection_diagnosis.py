"""benchmarks/selection_diagnosis.py --position-free: RoPE is taken out of the selecting layers that
have it, and a NoPE layer (SmolLM3 no_rope_layers) keeps its plain scores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_memory import PASSAGES, QUESTION
from test_memory_save_safety import smollm3_engine
from transformers import AutoTokenizer

from gsa_rag import attention, selection


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)


def load_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "selection_diagnosis.py"
    spec = importlib.util.spec_from_file_location("selection_diagnosis", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_position_free_run_leaves_nope_layers_unrotated(tokenizer, monkeypatch, tmp_path):
    diagnosis = load_script()
    engine = smollm3_engine(tokenizer, [1, 0, 1])  # layer 1 has no RoPE; layers 1 and 2 select
    monkeypatch.setattr(diagnosis, "GistEngine", SimpleNamespace(from_pretrained=lambda **_: engine))
    monkeypatch.setattr(diagnosis, "load_examples", lambda *_, **__: [SimpleNamespace(question=QUESTION, passages=PASSAGES)])
    monkeypatch.setattr(attention, "SELECT_KERNEL", attention.SELECT_KERNEL)  # both restored after the test
    plain = selection._gist_scores
    monkeypatch.setattr(selection, "_gist_scores", plain)

    layer, scored = [None], {}  # the layer running (named here, not by the script), its scores
    for i, block in enumerate(engine.model.model.layers):
        block.register_forward_pre_hook(lambda *_, i=i: layer.__setitem__(0, i))

    def patch_spy(engine, current):  # the script's own patch, then a spy around what it installed
        position_free_scoring(engine, current)
        free = selection._gist_scores

        def spy(*args):
            scored[layer[0]] = (free(*args), plain(*args))
            return scored[layer[0]][0]

        selection._gist_scores = spy

    position_free_scoring = diagnosis.position_free_scoring
    monkeypatch.setattr(diagnosis, "position_free_scoring", patch_spy)
    diagnosis.main(["--position-free", "--out", str(tmp_path / "out.json")])

    assert sorted(scored) == [1, 2]
    torch.testing.assert_close(*scored[1])  # NoPE: q and k carry no position; nothing to take out
    assert not torch.allclose(*scored[2])  # RoPE: the distance is taken out
    assert attention.SELECT_KERNEL is False  # on CUDA the select kernel would score past the patch
    assert json.loads((tmp_path / "out.json").read_text())["categories"]
