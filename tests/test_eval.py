"""Metrics (hand-computed cases) and the JSONL loaders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gsa_rag.eval import (
    Example,
    Passage,
    best_subspan_em,
    bootstrap_ci,
    data_root,
    exact_match,
    load_examples,
    normalize_answer,
    token_f1,
)

SHARED_DATA = Path("/work/shared/data")


# --- normalisation and metrics ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("The Beatles", "beatles"),
        ("  An   apple,  a day!  ", "apple day"),
        ("U.S.A.", "usa"),
        ("Theatre of the Absurd", "theatre of absurd"),  # "the" inside a word survives
        ("", ""),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_best_subspan_em():
    assert best_subspan_em("I think it was the Beatles.", ["The Beatles"]) == 1.0
    assert best_subspan_em("Bill Boyd played him", ["William Boyd", "Bill Boyd"]) == 1.0  # alias
    assert best_subspan_em("Paris, France", ["London"]) == 0.0
    assert best_subspan_em("1,000 people", ["1000"]) == 1.0  # punctuation dropped on both sides
    assert best_subspan_em("anything", [""]) == 0.0  # an empty answer matches nothing
    assert best_subspan_em("anything", []) == 0.0


def test_exact_match():
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("the Eiffel Tower in Paris", ["Eiffel Tower"]) == 0.0
    assert exact_match("Boyd, William", ["William Boyd", "boyd william"]) == 1.0
    # TriviaQA has aliases like "(a" that normalise to nothing: they match no prediction
    for prediction in ("", "A.", "The"):
        assert exact_match(prediction, ["(a", ".a"]) == 0.0
        assert token_f1(prediction, ["(a", ".a"]) == 0.0
    assert exact_match("Abba", ["(a", "ABBA"]) == 1.0 and token_f1("Abba", ["(a", "ABBA"]) == 1.0


def test_token_f1():
    # pred {big, red, dog} vs gold {red, dog}: p = 2/3, r = 1, f1 = 0.8
    assert token_f1("the big red dog", ["red dog"]) == pytest.approx(0.8)
    # best over aliases: "blue cat" scores 0, "red cat" p = r = 1/2
    assert token_f1("red dog", ["blue cat", "red cat"]) == pytest.approx(0.5)
    assert token_f1("The Red Dog!", ["red dog"]) == pytest.approx(1.0)
    assert token_f1("green", ["red dog"]) == 0.0
    # a repeated token matches only as often as the gold has it: p = 1/3, r = 1, f1 = 0.5
    assert token_f1("dog dog dog", ["dog"]) == pytest.approx(0.5)
    assert token_f1("", ["red"]) == 0.0
    assert token_f1("the", ["a"]) == 0.0  # an answer that normalises to nothing matches nothing
    assert token_f1("red", []) == 0.0


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci(values, n=500, seed=3)
    assert lo < 0.3 < hi
    assert 0.15 < lo and hi < 0.45  # about +-1.96 * sqrt(.3 * .7 / 100) = +-0.09
    assert bootstrap_ci(values, n=500, seed=3) == (lo, hi)
    assert bootstrap_ci(values, n=500, seed=4) != (lo, hi)


def test_bootstrap_ci_edge_cases():
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    lo, hi = bootstrap_ci([])
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], alpha=1.5)


# --- data ------------------------------------------------------------------------------------


def test_data_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GSA_RAG_DATA", str(tmp_path))
    assert data_root() == tmp_path


def test_data_root_defaults_to_shared_next_to_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("GSA_RAG_DATA", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "main").mkdir()
    monkeypatch.chdir(tmp_path / "main")
    assert data_root().resolve() == (tmp_path / "shared" / "data").resolve()


def test_data_root_missing_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.delenv("GSA_RAG_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="GSA_RAG_DATA"):
        data_root()


@pytest.mark.skipif(not (SHARED_DATA / "nq" / "dev.jsonl").is_file(), reason="shared data not present")
def test_load_shared_nq_dev(monkeypatch):
    monkeypatch.setenv("GSA_RAG_DATA", str(SHARED_DATA))
    examples = load_examples("nq", split="dev", limit=3)
    assert len(examples) == 3
    first = examples[0]
    assert isinstance(first, Example) and isinstance(first.passages[0], Passage)
    assert first.id == "nq-2079" and first.answers == ["the government"] and first.source == "nq-open"
    assert len(first.passages) == 10
    assert sum(p.is_gold for p in first.passages) == 1
    # a path works as well as a name
    assert load_examples(SHARED_DATA / "nq" / "dev.jsonl", limit=3) == examples


def _record(i: int) -> dict:
    return {"id": f"x-{i}", "question": f"q{i}?", "answers": ["a", "b"],
            "passages": [{"title": "T", "text": "some text", "is_gold": None}], "source": "test", "level": "hard"}


def test_load_jsonl_roundtrip(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(_record(i)) for i in range(4)) + "\n\n")
    examples = load_examples(path)
    assert [e.id for e in examples] == ["x-0", "x-1", "x-2", "x-3"]
    assert examples[0].passages == [Passage("T", "some text", None)]
    assert examples[0].meta == {"level": "hard"}
    assert len(load_examples(str(path), limit=2)) == 2


@pytest.mark.parametrize(
    "bad_line",
    ['{"id": "x", "question": "q"', json.dumps({"id": "x", "question": "q"}),
     json.dumps({**_record(9), "answers": "a"}), json.dumps({**_record(9), "passages": [{"title": "t"}]})],
    ids=["broken-json", "no-answers", "answers-not-list", "passage-without-text"],
)
def test_load_jsonl_bad_line_names_file_and_line(tmp_path, bad_line):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_record(0)) + "\n" + json.dumps(_record(1)) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:3:"):
        load_examples(path)


def test_load_jsonl_refuses_a_repeated_id(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps(_record(i % 2)) for i in range(3)) + "\n")
    with pytest.raises(ValueError, match=r"dup\.jsonl:3: example id 'x-0' repeats line 1"):
        load_examples(path)


def test_load_missing_set(monkeypatch, tmp_path):
    monkeypatch.setenv("GSA_RAG_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nq"):
        load_examples("nq")
