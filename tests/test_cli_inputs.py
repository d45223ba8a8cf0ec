"""`gsa-rag` refuses bad arguments up front, in one line, without a traceback or a lost run.

Every case here fails before a model loads (`_engine` and `evaluate` are replaced by stubs that
fail the test if reached), so the file runs in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import gsa_rag.eval.data as eval_data
import gsa_rag.eval.run as eval_run
import gsa_rag.train.loop as train_loop
from gsa_rag import cli
from gsa_rag.adapters import write_manifest
from gsa_rag.cli import main
from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine

EXAMPLE = {"id": "1", "question": "Who wrote it?", "answers": ["Ada"], "passages": [{"text": "Ada wrote it."}]}


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(EXAMPLE) + "\n")
    return path


@pytest.fixture()
def no_run(monkeypatch):
    """Loading the model or evaluating fails the test: the command must stop before either."""

    def never(*args, **kwargs):
        pytest.fail("the command went on to load the model / run the evaluation")

    monkeypatch.setattr(cli, "_engine", never)
    monkeypatch.setattr(eval_run, "evaluate", never)


def _fails(argv, capsys, status=2) -> str:
    """Runs the CLI, expects exit `status`, returns stderr (one line, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error:" in last
    return last


# 1. --out is checked before the evaluation


def test_cli_eval_out_existing_file_refused_before_the_run(data, tmp_path, no_run, capsys):
    out = tmp_path / "report.json"
    out.write_text('{"kept": true}')
    err = _fails(["eval", str(data), "--out", str(out)], capsys)
    assert str(out) in err and "already exists" in err and "delete" in err and "another path" in err
    assert out.read_text() == '{"kept": true}'  # never overwritten


def test_cli_eval_out_missing_folder_refused_before_the_run(data, tmp_path, no_run, capsys):
    out = tmp_path / "no_such_dir" / "report.json"
    err = _fails(["eval", str(data), "--out", str(out)], capsys)
    assert "no_such_dir" in err and "does not exist" in err
    assert not out.parent.exists()


def test_cli_eval_out_written_when_the_path_is_free(data, tmp_path, monkeypatch, capsys):
    class Engine:
        pass

    def fake_engine(args):
        args.adapter_used = None
        return Engine()

    monkeypatch.setattr(cli, "_engine", fake_engine)
    def fake_evaluate(engine, data, examples=None, **kw):
        return {"summary": {"n": len(examples), "questions": [ex.question for ex in examples], **kw}, "examples": []}

    monkeypatch.setattr(eval_run, "evaluate", fake_evaluate)
    reads = []
    real_load = eval_data.load_examples
    monkeypatch.setattr(eval_data, "load_examples", lambda *a, **k: reads.append(a) or real_load(*a, **k))
    out = tmp_path / "report.json"
    main(["eval", str(data), "--out", str(out), "--limit", "1", "--batch-size", "2"])
    report = json.loads(out.read_text())
    assert report["summary"]["n"] == 1 and report["summary"]["limit"] == 1 and report["summary"]["batch_size"] == 2
    assert report["summary"]["questions"] == [EXAMPLE["question"]]  # the examples checked up front, passed on
    assert len(reads) == 1  # the set is read once
    # ~ is expanded when the report is written, as when --out was checked (not a folder named "~")
    monkeypatch.setenv("HOME", str(tmp_path))
    main(["eval", str(data), "--out", "~/home_report.json"])
    assert (tmp_path / "home_report.json").is_file()
    assert f"wrote {out}" in capsys.readouterr().out


# 2. bad arguments: one line on stderr, status 2


@pytest.mark.parametrize("command", [["demo"], ["ask", "q", "--passage", "p"], ["eval", "DATA"],
                                     ["train", "sft", "--data", "DATA", "--output", "OUT"]])
def test_cli_missing_model_dir_is_a_usage_error(command, data, tmp_path, no_run, capsys):
    argv = [str(data) if a == "DATA" else str(tmp_path / "o") if a == "OUT" else a for a in command]
    err = _fails([*argv, "--model", "./missing_dir"], capsys)
    assert "--model" in err and "./missing_dir" in err and "no such file or directory" in err


def test_cli_model_arg_keeps_existing_paths_and_hub_ids(tmp_path):
    assert cli._model_arg(str(tmp_path)) == str(tmp_path)
    assert cli._model_arg("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cli._model_arg("gpt2") == "gpt2"
    for bad in (str(tmp_path / "nope"), "nope/", "a/b/c", str(tmp_path / "m.gguf")):
        with pytest.raises(Exception, match="no such file or directory"):
            cli._model_arg(bad)


def test_cli_device_cuda_without_cuda_is_a_usage_error(monkeypatch, data, no_run, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _fails(["eval", str(data), "--device", "cuda"], capsys)
    assert "--device" in err and "CUDA is not available" in err and "--device cpu" in err
    err = _fails(["demo", "--device", "gpu0"], capsys)
    assert "--device" in err and "not a device" in err
    assert cli._device_arg("cpu") == "cpu"


def test_cli_fuse_needs_cuda_and_liger_before_the_model_loads(monkeypatch, data, no_run, capsys):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _fails(["demo", "--fuse"], capsys)
    assert "--fuse" in err and "CUDA" in err and "cpu" in err
    err = _fails(["eval", str(data), "--fuse", "--device", "cpu"], capsys)
    assert "--fuse" in err and "CUDA" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "_device_arg", lambda text: text)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    err = _fails(["ask", "Who?", "--passage", "Ada.", "--fuse"], capsys)
    assert "liger-kernel" in err and "gsa-rag[fast]" in err


@pytest.mark.parametrize(("option", "value"), [("--limit", "0"), ("--limit", "-3"), ("--limit", "x"),
                                               ("--batch-size", "-1"), ("--batch-size", "0")])
def test_cli_eval_limit_and_batch_size_must_be_positive(option, value, data, no_run, capsys):
    err = _fails(["eval", str(data), option, value], capsys)
    assert option in err and ">= 1" in err


def test_cli_eval_empty_data_set_refused_before_the_model_loads(tmp_path, no_run, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    err = _fails(["eval", str(empty)], capsys)
    assert str(empty) in err and "no examples" in err


def test_cli_eval_missing_data_file_refused_before_the_model_loads(tmp_path, no_run, capsys):
    err = _fails(["eval", str(tmp_path / "nope.jsonl")], capsys)
    assert "nope.jsonl" in err


def test_cli_os_error_from_loading_is_one_line(monkeypatch, capsys):
    def hub_error(args):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your internet.")

    monkeypatch.setattr(cli, "_engine", hub_error)
    err = _fails(["ask", "q", "--passage", "p", "--model", "someone/some-model"], capsys)
    assert "couldn't connect" in err and "Check your internet" in err


# 3. the answer's budget and the question are checked before the model loads (it takes ~17 s)


@pytest.mark.parametrize("command", [["demo"], ["ask", "Who?", "--passage", "Ada."], ["eval", "DATA"]])
@pytest.mark.parametrize("value", ["0", "-2", "ten"])
def test_cli_max_new_tokens_must_be_positive(command, value, data, no_run, capsys):
    argv = [str(data) if a == "DATA" else a for a in command]
    err = _fails([*argv, "--max-new-tokens", value], capsys)
    assert "--max-new-tokens" in err and ">= 1" in err


@pytest.mark.parametrize(("argv", "words"), [
    (["ask", "   ", "--passage", "Ada wrote it."], ["question", "empty"]),
    (["ask", "", "--passage", "Ada wrote it."], ["question", "empty"]),
    (["ask", "Who?\udcff", "--passage", "Ada wrote it."], ["question", "surrogate"]),  # non-UTF-8 argv bytes
    (["ask", "Who wrote it?", "--passage", " \n"], ["passage 0", "empty"]),
    (["demo", "--question", "\t"], ["--question", "empty"]),
])
def test_cli_bad_question_refused_before_the_model_loads(argv, words, no_run, capsys):
    err = _fails(argv, capsys)
    assert all(w in err for w in words)


# 4. usage errors and --help come before torch and transformers load (seconds)

USAGE = """
import json, sys
from gsa_rag.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as e:
        codes.append(e.code)
import gsa_rag
print(json.dumps({"codes": codes, "heavy": sorted({"torch", "transformers"} & set(sys.modules)), "file": gsa_rag.__file__}))
"""


def test_cli_usage_errors_and_help_do_not_import_torch():
    """Regression: the CLI imported torch and transformers (~7 s) before argparse said a word."""
    argvs = [[], ["ask"], ["--help"], ["ask", "--help"], ["eval"], ["demo", "--top-k", "x"],
             ["ask", "Who?", "--max-new-tokens", "0"], ["demo", "--model", "./no_such_model_dir"],
             ["train"], ["train", "--help"], ["train", "cpt", "--data", "x"], ["train", "sft", "--steps", "many"],
             # a bad question or passage, refused by gsa_rag.validation (which once imported torch first)
             ["ask", " ", "--passage", "Ada wrote it."], ["ask", "Who?", "--passage", ""], ["demo", "--question", ""]]
    import gsa_rag

    # run beside this tree's package, and check that it is the one imported (not another install)
    run = subprocess.run([sys.executable, "-c", USAGE, json.dumps(argvs)], capture_output=True, text=True, check=True,
                         cwd=Path(gsa_rag.__file__).parents[1])
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"codes": [2, 2, 0, 0, 2, 2, 2, 2, 2, 0, 2, 2, 2, 2, 2], "heavy": [], "file": gsa_rag.__file__}


# 5. --levels is checked against the adapter's layout; adapter paths are printed expanded


class FakeEngine:
    def __init__(self, config):
        self.config = config
        self.model = SimpleNamespace(config=SimpleNamespace(model_type="fake"))
        self.cuda_graphs = None

    def generate(self, question, passages, max_new_tokens):
        return "Ada"

    def stream(self, question, passages, max_new_tokens):
        yield "Ada"


@pytest.fixture()
def loads(monkeypatch):
    """GistEngine.from_pretrained replaced: records what it was asked to load, loads nothing."""
    calls = []

    def from_pretrained(model=None, **kwargs):
        calls.append(kwargs)
        kwargs["engine"] = FakeEngine(kwargs["config"])  # what the command then set on it
        return kwargs["engine"]

    monkeypatch.setattr(GistEngine, "from_pretrained", from_pretrained)
    return calls


@pytest.fixture()
def two_level_adapter(tmp_path):
    """An H-GSA adapter folder (manifest only): chunk size 4, 2 gists per <mgist>."""
    folder = tmp_path / "hgsa"
    folder.mkdir()
    write_manifest(folder, base_model="b", fingerprint="v2-0", config=GistConfig(chunk_size=4, meta_chunks=(2,)))
    return folder


ASK = ["ask", "Who wrote it?", "--passage", "Ada wrote it.", "--device", "cpu"]


@pytest.mark.parametrize("options", [["--levels", "2"], ["--levels", "1", "--meta-chunks", "0"],
                                     ["--levels", "3", "--meta-chunks", "2", "2"]])
def test_cli_levels_match_the_adapters_layout(options, two_level_adapter, loads, capsys):
    """Regression: --levels was checked against the command line's sizes alone, so a 2-level
    adapter refused `--levels 2`."""
    main([*ASK, "--adapter", str(two_level_adapter), *options])
    assert loads[0]["config"].levels == int(options[1])
    assert capsys.readouterr().out.strip() == "Ada"


@pytest.mark.parametrize("options", [["--levels", "1"], ["--levels", "2", "--chunk", "8"]])
def test_cli_levels_refused_before_loading_when_the_adapters_layout_differs(options, two_level_adapter, loads, capsys):
    """Regression: `--levels 1` with a 2-level adapter passed silently (and ran 2 levels)."""
    err = _fails([*ASK, "--adapter", str(two_level_adapter), *options], capsys)
    has = 1 if "--chunk" in options else 2
    assert f"--levels {options[1]}" in err and f"has {has} level(s)" in err and str(two_level_adapter) in err
    assert "--chunk" in err and "drop --levels" in err
    assert loads == []  # refused before the weights load


def test_cli_train_levels_match_the_init_adapters_layout(two_level_adapter, tmp_path, monkeypatch, capsys):
    runs = []
    monkeypatch.setattr(train_loop, "train", lambda args: runs.append(args) or tmp_path / "out")
    train = ["train", "sft", "--data", "d.jsonl", "--output", str(tmp_path / "out"),
             "--init-adapter", str(two_level_adapter)]
    main([*train, "--levels", "2"])
    assert len(runs) == 1 and runs[0].gist == {}
    err = _fails([*train, "--levels", "1"], capsys)
    assert "--levels 1" in err and "has 2 level(s)" in err and str(two_level_adapter) in err
    assert len(runs) == 1


def test_cli_prints_the_adapter_path_expanded(two_level_adapter, tmp_path, data, loads, monkeypatch, capsys):
    """Regression: `--adapter ~/x` was printed as `~/x`, not as the folder read."""
    monkeypatch.setenv("HOME", str(tmp_path))
    main(["demo", "--adapter", "~/hgsa", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(f", adapter {two_level_adapter}") and "~" not in out
    assert loads[0]["adapter"] == str(two_level_adapter)
    monkeypatch.setattr(eval_run, "evaluate", lambda engine, data, **kw: {"summary": {}, "examples": []})
    main(["eval", str(data), "--adapter", "~/hgsa", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out)["adapter"] == str(two_level_adapter)


def test_cli_score_dtype_reaches_the_config_and_is_refused_with_the_hierarchy(two_level_adapter, tmp_path, loads,
                                                                             capsys):
    folder = tmp_path / "gsa8"
    folder.mkdir()
    write_manifest(folder, base_model="b", fingerprint="v2-0", config=GistConfig(chunk_size=8))
    main([*ASK, "--adapter", str(folder), "--score-dtype", "int8"])
    assert loads[0]["config"].score_dtype == "int8"
    main([*ASK, "--adapter", str(folder)])
    assert loads[1]["config"].score_dtype == "cache"
    err = _fails([*ASK, "--adapter", str(two_level_adapter), "--score-dtype", "int8"], capsys)
    assert "single-level only" in err
    assert len(loads) == 2  # refused before the weights load


def test_cli_no_cuda_graphs_reaches_the_engine(loads):
    main([*ASK])
    main([*ASK, "--no-cuda-graphs"])
    assert [load["engine"].cuda_graphs for load in loads] == [None, False]
