"""benchmarks/rag_eval.py and its pieces (gsa_rag.eval.harness, methods, quest, retrieval, data),
on a tiny random Llama with the default tokenizer and a handful of hand-made questions."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.eval.data import CorpusPassage, Example, Passage, load_corpus, load_examples, load_hf_examples
from gsa_rag.eval.harness import (
    RunSettings,
    _chance_of_gold,
    answer_in_passages,
    gold_selection,
    run_method,
    summarize,
)
from gsa_rag.eval.methods import RunContext, available, parse_spec
from gsa_rag.eval.quest import QuestPlan, chunk_key_bounds, quest_layout, quest_scores
from gsa_rag.layout import build_layout
from gsa_rag.prompt import build_segments

REPO = Path(__file__).resolve().parent.parent
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2}

QUESTIONS = [
    ("q-0", "Who wrote the play Hamlet?", ["William Shakespeare", "Shakespeare"]),
    ("q-1", "When did the warship Vasa sink?", ["1628"]),
    ("q-2", "What is the capital city of France?", ["Paris"]),
]
PASSAGES = [
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare sometime between 1599 and 1601."),
    ("Vasa (ship)", "Vasa is a Swedish warship built between 1626 and 1628. The ship sank on its maiden voyage in 1628."),
    ("Paris", "Paris is the capital and most populous city of France, on the river Seine."),
    ("Stockholm", "Stockholm is the capital of Sweden; the Vasa Museum stands on the island of Djurgarden."),
]


def _record(i: int) -> dict:
    qid, question, answers = QUESTIONS[i]
    passages = [{"title": t, "text": x, "is_gold": j == i} for j, (t, x) in enumerate(PASSAGES)]
    return {"id": qid, "question": question, "answers": answers, "passages": passages, "source": "test"}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    path.write_text("".join(json.dumps(_record(i)) + "\n" for i in range(3)))
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "wiki_passages.jsonl"
    rows = [{"id": f"p{j}", "title": t, "text": x, "source": "test"} for j, (t, x) in enumerate(PASSAGES)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def examples(data_file):
    return load_examples(data_file)


@pytest.fixture(scope="module")
def tiny_model_dir(default_model_dir, tmp_path_factory) -> Path:
    """A 3-layer random Llama with the default tokenizer, saved like a real checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> GistEngine:
    return GistEngine.from_pretrained(str(tiny_model_dir), config=GistConfig(), device="cpu")


@pytest.fixture(autouse=True)
def _private_embedding_memo(monkeypatch, tmp_path):
    """Keep the tests' passage embeddings out of the user's cache (and the user's out of the tests)."""
    from gsa_rag.eval import retrieval

    monkeypatch.setattr(retrieval, "memo_file", lambda model_path: tmp_path / "embeddings.npz")


def _ctx(tmp_path, corpus_file=None) -> RunContext:
    return RunContext(data="tiny", num_layers=TINY["num_hidden_layers"], retrieval_dir=str(tmp_path / "retrieval"),
                      load_corpus=lambda: load_corpus(corpus_file))


SETTINGS = RunSettings(batch_size=2, max_new_tokens=3, bootstrap=200, progress=False)


# --- metrics and scoring helpers -----------------------------------------------------------


def test_chance_of_gold_hand_computed():
    # 1 gold chunk of 4, 2 chosen: miss both = C(3,2)/C(4,2) = 3/6
    assert _chance_of_gold(4, 1, 2) == pytest.approx(0.5)
    # 2 gold of 5, 1 chosen: 2/5
    assert _chance_of_gold(5, 2, 1) == pytest.approx(0.4)
    assert _chance_of_gold(5, 2, 0) == 0.0
    assert _chance_of_gold(5, 2, 4) == 1.0  # only 3 non-gold chunks exist


def test_answer_in_passages_normalises_and_uses_aliases():
    passages = [Passage("Hamlet", "A tragedy by William Shakespeare."), Passage("Paris", "Capital of France")]
    assert answer_in_passages(["Bill Shakespeare", "william shakespeare"], passages)
    assert answer_in_passages(["the Hamlet"], passages)  # titles count, articles dropped
    assert not answer_in_passages(["London"], passages)
    assert not answer_in_passages([""], passages)


def test_summarize_hand_computed():
    rows = [
        {"id": "a", "subspan_em": 1.0, "em": 1.0, "f1": 1.0, "attended_question": 10, "attended_decode": 12,
         "prompt_tokens": 100, "new_tokens": 3, "answer_shown": True, "gold_recall": 0.5, "gold_chance": 0.25,
         "gold_any": True},
        {"id": "b", "subspan_em": 1.0, "em": 0.0, "f1": 0.5, "attended_question": 20, "attended_decode": 22,
         "prompt_tokens": 200, "new_tokens": 5, "answer_shown": False},
        {"id": "c", "subspan_em": 0.0, "em": 0.0, "f1": 0.0, "attended_question": 30, "attended_decode": 32,
         "prompt_tokens": 300, "new_tokens": 7, "answer_shown": True, "gold_recall": 1.0, "gold_chance": 0.75,
         "gold_any": True},
        {"id": "d", "subspan_em": 0.0, "em": 0.0, "f1": 0.5, "attended_question": 40, "attended_decode": 42,
         "prompt_tokens": 400, "new_tokens": 9, "answer_shown": True},
    ]
    exs = [Example(r["id"], "q", ["x"], [Passage("t", "x", is_gold=r["id"] in "ab")]) for r in rows]
    s = summarize(rows, exs, RunSettings(bootstrap=200, seed=1))
    assert s["n"] == 4 and s["subspan_em"] == 50.0 and s["em"] == 25.0 and s["f1"] == 50.0
    assert s["attended_question"] == 25.0 and s["prompt_tokens"] == 250.0 and s["answer_shown"] == 75.0
    assert s["gold_recall"] == 75.0 and s["gold_chance"] == 50.0 and s["gold_n"] == 2
    lo, hi = s["subspan_em_ci95"]
    assert 0.0 <= lo <= 50.0 <= hi <= 100.0
    assert summarize(rows, exs, RunSettings(bootstrap=200, seed=1)) == s  # deterministic with a seed
    # only a and b have a gold passage: the subset is scored apart (TriviaQA open-domain)
    assert s["subspan_em_with_gold"] == 100.0 and s["n_with_gold"] == 2


def test_gold_selection_on_a_hand_made_layout(engine):
    config = GistConfig(chunk_size=4, sink=0, num_previous_chunks=1, word_aware=False)
    segments = build_segments(engine.tokenizer, "Which one?", ["aa bb cc dd ee ff gg hh", "ii jj kk ll mm nn"],
                              system=None)
    layout = build_layout([segments], config, engine.tokenizer)
    C = int(layout.num_chunks[0])
    T = layout.seq_len
    chunk, passage = layout.chunk_id[0], layout.passage_id[0]
    gold_chunk = int(chunk[(passage == 0) & ~layout.is_gist[0]].min())  # a chunk of passage 0 (gold)
    other_chunk = int(chunk[(passage == 1) & ~layout.is_gist[0]].min())
    assert other_chunk < C - 1  # not in the local window
    # layer 1: head 0 sees the gold chunk, head 1 another; layer 2: neither head sees gold
    row1 = torch.zeros(1, 2, T, dtype=torch.bool)
    row1[0, 0] = chunk == gold_chunk
    row1[0, 1] = chunk == other_chunk
    row2 = torch.zeros(1, 2, T, dtype=torch.bool)
    row2[0, :] = chunk == other_chunk
    rows = {0: torch.ones(1, 1, T, dtype=torch.bool), 1: row1, 2: row2}  # layer 0 does not select
    (got,) = gold_selection(layout, rows, [{0}], num_previous_chunks=1, first_selecting_layer=1)
    assert got["gold_recall"] == pytest.approx(0.25) and got["gold_any"]
    gold_chunks = int(chunk[(passage == 0) & (chunk < C - 1)].unique().numel())
    assert got["gold_chance"] == pytest.approx(_chance_of_gold(C - 1, gold_chunks, 1))
    # no gold passage: nothing to recall
    assert gold_selection(layout, rows, [set()], 1, 1) == [None]


# --- method specs ----------------------------------------------------------------------------


def test_every_method_registered_and_specs_round_trip():
    assert {"closed-book", "full", "vector", "gist-only", "quest", "gsa"} <= set(available())
    for spec in ["closed-book", "full", "vector:k=3", "vector:k=1:source=corpus", "gist-only:chunk=16", "quest",
                 "quest:chunk=16:policy=adaptive", "gsa", "gsa:chunk=16:policy=adaptive", "gsa:k=2",
                 "gsa:score=int8"]:
        assert parse_spec(spec).spec == spec
    assert parse_spec("gsa:chunk=8:k=4").spec == "gsa"  # defaults are dropped
    assert parse_spec("gsa:chunk=16:policy=adaptive").label == "GSA 16x, adaptive k"
    assert parse_spec("gsa:score=int8").label == "GSA 8x, top-4, int8 scores"
    assert parse_spec("gsa:score=int8").gist_config(None).score_dtype == "int8"
    assert parse_spec("gsa").gist_config(None).score_dtype == "cache"


def test_gsa_reuse_spec_and_label():
    method = parse_spec("gsa:reuse=1")
    assert method.reuse and method.spec == "gsa:reuse=True" and method.label == "GSA 8x, top-4, KV reuse"
    assert method.batch_limit == 1 and parse_spec("gsa").batch_limit is None
    spec = "gsa:chunk=16:k=2:meta=4:reuse=True:budget_mb=64"
    assert parse_spec(spec).spec == spec and parse_spec(spec).label == "H-GSA 64x (16,4), top-2, KV reuse"
    assert parse_spec("gsa:policy=adaptive:reuse=yes").label == "GSA 8x, adaptive k, KV reuse"
    from gsa_rag.eval.rag_report import _family

    assert _family({"name": "gsa", "options": parse_spec("gsa:policy=adaptive:reuse=1").options()}) == \
        "gsa (adaptive, KV reuse)"
    assert _family({"name": "gsa", "options": parse_spec("gsa").options()}) == "gsa"


def test_list_methods_shows_the_reuse_option(capsys):
    _script("rag_eval").main(["--list-methods"])
    listed = capsys.readouterr().out
    assert "reuse=False" in listed and "budget_mb=0" in listed and "KV reuse" in listed


@pytest.mark.parametrize("bad", ["nope", "gsa:chunk", "gsa:size=3", "gsa:chunk=eight", "vector:source=web",
                                 "quest:policy=top_p", "gsa:budget_mb=64", "gsa:reuse=1:budget_mb=-1",
                                 "gsa:reuse=maybe", "gsa:score=fp8", "gsa:meta=4:score=int8"])
def test_bad_specs_say_what_is_wrong(bad):
    with pytest.raises(ValueError):
        parse_spec(bad)


def test_gist_only_never_unfolds(engine):
    config = parse_spec("gist-only").gist_config(_ctx(Path("/unused")))
    assert config.first_selecting_layer == TINY["num_hidden_layers"] and config.chunk_size == 8


# --- quest -----------------------------------------------------------------------------------


def test_gist_methods_take_the_trained_layout_where_their_spec_names_none():
    trained = GistConfig(chunk_size=16, meta_chunks=(4,), section_top_k=2, sink=2, num_previous_chunks=3,
                         word_aware=False, first_selecting_layer=2)
    ctx = RunContext(data="tiny", num_layers=3, retrieval_dir="unused", trained=trained)
    gsa = parse_spec("gsa:chunk=16:k=2").gist_config(ctx)
    assert (gsa.sink, gsa.num_previous_chunks, gsa.word_aware, gsa.first_selecting_layer) == (2, 3, False, 2)
    # the spec's options are its own, defaults included: "gsa" is GSA 8x, single level, in every table
    assert (gsa.chunk_size, gsa.top_k, gsa.meta_chunks, gsa.section_top_k) == (16, 2, (), None)
    named = parse_spec("gsa:window=0:sink=1").gist_config(ctx)
    assert (named.num_previous_chunks, named.sink, named.word_aware) == (0, 1, False)
    assert parse_spec("gsa:window=0").label != parse_spec("gsa").label  # two rows of one table
    only = parse_spec("gist-only:window=0").gist_config(ctx)
    assert (only.chunk_size, only.meta_chunks, only.sink, only.num_previous_chunks) == (8, (), 2, 0)
    assert only.first_selecting_layer == 3
    quest = parse_spec("quest").gist_config(ctx)  # no gists: the trained sink, window and word cuts only
    assert (quest.sink, quest.num_previous_chunks, quest.word_aware) == (2, 3, False)
    assert (quest.chunk_size, quest.meta_chunks, quest.first_selecting_layer) == (8, (), 0)
    assert parse_spec("quest").gist_config(None) == GistConfig(top_k=4, first_selecting_layer=0)
    # no trained config (the base model alone): the library's defaults, as before
    assert parse_spec("gsa:k=2").gist_config(RunContext(data="tiny", num_layers=3, retrieval_dir="x")) == \
        GistConfig(top_k=2)
    with pytest.raises(ValueError, match="window"):
        parse_spec("gsa:window=-2").gist_config(ctx)


def test_run_key_names_the_trained_config_only_where_it_is_not_the_default():
    """A results file written before the run key held the trained config still resumes where the
    gist methods run what they ran then (no adapter, or one trained in the default layout, like
    the bundled one); another trained layout is another run."""
    from types import SimpleNamespace

    rag_eval = _script("rag_eval")
    args = SimpleNamespace(data="nq", split="dev", model=None, max_new_tokens=32, seed=0, batch_size=8,
                           device="cpu", corpus=None, fuse=False)
    for trained in (None, GistConfig()):
        assert "gist_config" not in rag_eval.run_key(args, [], None, "float32", trained)
    key = rag_eval.run_key(args, [], None, "float32", GistConfig(sink=2))
    assert key["gist_config"]["sink"] == 2


def test_quest_layout_is_gsa_layout_without_gists(engine):
    config = GistConfig(chunk_size=8)
    segs = [build_segments(engine.tokenizer, q, [x for _, x in PASSAGES[: i + 2]]) for i, (_, q, _) in
            enumerate(QUESTIONS)]
    gisted = build_layout(segs, config, engine.tokenizer)
    quest = quest_layout(segs, config, engine.tokenizer)
    assert not quest.is_gist.any()
    assert torch.equal(quest.num_chunks, gisted.num_chunks)
    for b in range(len(segs)):
        keep = gisted.valid[b] & ~gisted.is_gist[b]
        for name in ("input_ids", "chunk_id", "passage_id", "position_ids"):
            assert torch.equal(getattr(quest, name)[b, quest.valid[b]], getattr(gisted, name)[b, keep]), name
    assert torch.equal(quest.is_tail.sum(-1), gisted.is_tail.sum(-1))


def test_quest_scores_are_the_min_max_upper_bound():
    torch.manual_seed(0)
    B, Hkv, G, C, D = 2, 2, 3, 5, 8
    query = torch.randn(B, Hkv * G, 4, D)
    kmin, kmax = torch.randn(B, Hkv, C, D).sort(dim=-1)[0], torch.randn(B, Hkv, C, D)
    kmax = torch.maximum(kmin, kmax)
    valid = torch.ones(B, C, dtype=torch.bool)
    valid[1, -1] = False
    got = quest_scores(query, kmin, kmax, valid)
    q = query[:, :, :, None, :]
    lo, hi = kmin.repeat_interleave(G, 1)[:, :, None], kmax.repeat_interleave(G, 1)[:, :, None]
    want = torch.maximum(q * lo, q * hi).sum(-1)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1, ..., :-1], want[1, ..., :-1])
    assert torch.isinf(got[1, ..., -1]).all()


def test_chunk_key_bounds(engine):
    config = GistConfig(chunk_size=4, sink=2)
    segs = [build_segments(engine.tokenizer, "Why?", ["one two three four five six seven"], system=None)]
    layout = quest_layout(segs, config, engine.tokenizer)
    key = torch.randn(1, 2, layout.seq_len, 3)
    kmin, kmax = chunk_key_bounds(key, layout)
    for c in range(int(layout.num_chunks[0])):
        cols = layout.chunk_id[0] == c
        torch.testing.assert_close(kmin[0, :, c], key[0][:, cols].min(1).values)
        torch.testing.assert_close(kmax[0, :, c], key[0][:, cols].max(1).values)


def test_quest_with_every_chunk_selected_is_full_attention(engine, examples):
    """k >= number of chunks: every tail token sees everything, so Quest answers as full attention does."""
    quest = parse_spec("quest:k=1000")
    full = parse_spec("full")
    ctx = RunContext(data="tiny", num_layers=3, retrieval_dir="unused")
    questions = [ex.question for ex in examples]
    passages = [ex.passages for ex in examples]
    q_engine = GistEngine(engine.model, engine.tokenizer, quest.gist_config(ctx))
    f_engine = GistEngine(engine.model, engine.tokenizer, full.gist_config(ctx))
    from gsa_rag.generation import DynamicCache, forward

    q_layout = quest.layout(q_engine, questions, passages)
    f_layout = full.layout(f_engine, questions, passages)
    with torch.no_grad():
        q_out, _ = forward(engine.model, q_layout, q_layout.seq_len, DynamicCache(), q_engine.config,
                           state_factory=quest.state_factory(q_engine.config))
        f_out, _ = forward(engine.model, f_layout, f_layout.seq_len, DynamicCache(), f_engine.config)
    for b in range(len(questions)):
        torch.testing.assert_close(q_out.logits[b, q_layout.valid[b]], f_out.logits[b, f_layout.valid[b]],
                                   atol=1e-4, rtol=1e-4)


def test_quest_selects_k_chunks_per_head(engine, examples):
    config = GistConfig(chunk_size=8, top_k=2, first_selecting_layer=0)
    segs = [build_segments(engine.tokenizer, examples[0].question, examples[0].passages)]
    layout = quest_layout(segs, config, engine.tokenizer)
    plan = QuestPlan(config)
    state = plan.state(layout, layout.seq_len, config)
    torch.manual_seed(0)
    Hkv, D = 2, 16
    query, key = torch.randn(1, 4, layout.seq_len, D), torch.randn(1, Hkv, layout.seq_len, D)
    mask = state.mask_for_layer(1, query, key)
    last = mask[0, :, -1]  # [Hkv, T]
    chunk = layout.chunk_id[0]
    C = int(layout.num_chunks[0])
    for h in range(Hkv):
        unfolded = chunk[last[h] & (chunk >= 0) & (chunk < C - 1)].unique()
        assert 1 <= unfolded.numel() <= 2 * 2  # each of the 2 query heads of the group picks 2 chunks
    assert 1 in plan._bounds  # the bounds are computed once per layer and kept for decoding


# --- the harness on every method -------------------------------------------------------------


@pytest.mark.parametrize("spec", ["closed-book", "full", "gist-only", "quest", "gsa", "gsa:chunk=16:policy=adaptive",
                                  "gsa:reuse=True", "vector:k=1", "vector:k=2:source=corpus"])
def test_each_method_runs_on_three_questions(spec, engine, examples, corpus_file, tmp_path):
    method = parse_spec(spec)
    out = run_method(engine, method, examples, _ctx(tmp_path, corpus_file), SETTINGS)
    assert out["spec"] == spec and len(out["results"]) == 3
    s = out["summary"]
    assert s["n"] == 3 and 0.0 <= s["subspan_em"] <= 100.0 and s["ttft_s"] > 0 and s["peak_memory_mb"] > 0
    for row in out["results"]:
        assert isinstance(row["prediction"], str) and row["new_tokens"] <= SETTINGS.max_new_tokens
        assert 0 < row["attended_question"] <= row["prompt_tokens"] + row["prompt_tokens"] // 4
    shown = [r["passages_shown"] for r in out["results"]]
    if spec == "closed-book":
        assert shown == [0, 0, 0] and s["prompt_tokens"] < 80
    elif spec.startswith("vector"):
        k = method.k
        assert shown == [k] * 3
        assert all(r["gold_retrieved"] for r in out["results"])  # MiniLM finds these easy ones
        assert all(len(r["retrieved"]) == k for r in out["results"])
    else:
        assert shown == [4, 4, 4]
    if method.selects:
        assert "gold_recall" in s and 0.0 <= s["gold_recall"] <= 100.0 and 0.0 <= s["gold_chance"] <= 100.0
    if spec in ("gsa", "quest", "gsa:reuse=True"):
        full_keys = s["prompt_tokens"]
        assert s["attended_question"] < full_keys  # sparse: fewer keys than the prompt


def test_harness_answers_as_the_engine_does(engine, examples, tmp_path):
    for spec in ("full", "gsa"):
        method = parse_spec(spec)
        out = run_method(engine, method, examples, _ctx(tmp_path), SETTINGS)
        plain = GistEngine(engine.model, engine.tokenizer, method.gist_config(_ctx(tmp_path)))
        want = []
        for i in range(0, len(examples), SETTINGS.batch_size):  # the same batches, so the same padding
            batch = examples[i : i + SETTINGS.batch_size]
            want += plain.generate([ex.question for ex in batch], [ex.passages for ex in batch],
                                   max_new_tokens=SETTINGS.max_new_tokens)
        assert [r["prediction"] for r in out["results"]] == want


def test_harness_decode_steps_get_the_plain_state_the_kernels_take(engine, examples, tmp_path, monkeypatch):
    """Only the prefill's state is wrapped to record what the question sees: every decode step
    hands attention a plain GistState, the one kernels.dispatch.sparse_decode_attention takes on
    CUDA (a wrapped one always fell back to the dense path, so rag_eval timed that instead)."""
    from gsa_rag import attention
    from gsa_rag.attention import GistState
    from gsa_rag.eval.harness import _Recorder

    seen = []
    real = attention.sparse_decode_attention

    def spy(module, query, key, value, scaling, state):
        seen.append((query.shape[2], type(state)))
        return real(module, query, key, value, scaling, state)

    monkeypatch.setattr(attention, "sparse_decode_attention", spy)
    out = run_method(engine, parse_spec("gsa"), examples, _ctx(tmp_path), SETTINGS)
    assert out["summary"]["attended_question"] > 0
    prefill = {t for rows, t in seen if rows > 1}
    decode = {t for rows, t in seen if rows == 1}
    assert prefill == {_Recorder} and decode == {GistState}


# --- KV reuse (gsa:reuse=1): one gist memory for the whole run ------------------------------------


def test_reuse_answers_as_the_engine_over_memory_does(engine, examples, tmp_path):
    """Every question shows all four passages: 12 uses, 4 encodings; the answers are the engine's
    own over a gist memory, and the same on a second run (no adapter, greedy)."""
    from gsa_rag.memory import GistMemory

    method = parse_spec("gsa:reuse=1")
    out = run_method(engine, method, examples, _ctx(tmp_path), SETTINGS)
    s = out["summary"]
    assert s["batch_size"] == 1 and s["passages_used"] == 12 and s["passages_unique"] == 4
    assert s["passages_encoded"] == 4 and s["encode_seconds"] > 0 and s["num_links"] >= 1
    assert not s["link_tokens_trained"] and s["memory_stats"]["passages"] == 4
    assert s["memory_budget_bytes"] > 0 and s["memory_stats"]["full_bytes"] <= s["memory_budget_bytes"]
    assert "gold_recall" in s and all("gold_recall" in r for r in out["results"])

    plain = GistEngine(engine.model, engine.tokenizer, method.gist_config(_ctx(tmp_path)))
    memory = GistMemory(plain, progress=False)
    want = [plain.generate(ex.question, memory.add(ex.passages), memory=memory,
                           max_new_tokens=SETTINGS.max_new_tokens) for ex in examples]
    assert [r["prediction"] for r in out["results"]] == want
    again = run_method(engine, parse_spec("gsa:reuse=1"), examples, _ctx(tmp_path), SETTINGS)
    assert again["results"] == out["results"]  # predictions, scores, attended keys, gold selection


def _examples_over(passage_lists: list[list[int]]) -> list[Example]:
    return [Example(f"s-{i}", QUESTIONS[i % 3][1], QUESTIONS[i % 3][2],
                    [Passage(*PASSAGES[j], is_gold=j == i % 3) for j in shown])
            for i, shown in enumerate(passage_lists)]


def test_reuse_encodes_a_shared_passage_once(engine, tmp_path, monkeypatch):
    settings = RunSettings(batch_size=4, max_new_tokens=1, bootstrap=10, progress=False)
    shared = _examples_over([[0, 1], [1, 2]])  # passage 1 is in both questions
    s = run_method(engine, parse_spec("gsa:reuse=1"), shared, _ctx(tmp_path), settings)["summary"]
    assert (s["passages_used"], s["passages_unique"], s["passages_encoded"]) == (4, 3, 3)
    # under a budget too small for anything, what the next question does not need is evicted,
    # and a passage that comes back is encoded again
    from gsa_rag.eval import reuse

    monkeypatch.setattr(reuse, "default_budget", lambda device: 1)
    back = _examples_over([[0, 1], [2], [0]])
    s = run_method(engine, parse_spec("gsa:reuse=1"), back, _ctx(tmp_path), settings)["summary"]
    assert (s["passages_used"], s["passages_unique"], s["passages_encoded"]) == (4, 3, 4)
    assert s["memory_budget_bytes"] == 1 and s["memory_stats"]["passages"] == 1


def test_reuse_prompt_is_the_plain_prompt_without_passage_numbers(engine, examples):
    """What the two routes put around the passages is the same text; reuse drops "[n]" and adds link tokens."""
    import re

    from gsa_rag.eval.reuse import ReuseMemory

    ex = examples[1]
    plain = engine.layout([ex.question], [ex.passages])
    layout, _ = ReuseMemory().prepare(engine, ex.question, ex.passages)
    links = {engine.tokenizer.convert_tokens_to_ids(t) for t in engine.config.link_tokens}

    def text(lay, drop=()):
        ids = lay.input_ids[0, lay.valid[0] & ~lay.is_gist[0]].tolist()
        return engine.tokenizer.decode([i for i in ids if i not in drop])

    assert text(layout, drop=links) == re.sub(r"Document \[\d+\]", "Document", text(plain))
    # no adapter: every reserved link token follows each passage
    assert int(torch.isin(layout.input_ids, torch.tensor(sorted(links))).sum()) == len(links) * len(ex.passages)


def _forced_selection(monkeypatch, method, target: str) -> list:
    """Makes every selecting layer and KV head unfold exactly one chunk per question: the first
    eligible chunk of its gold passage ("gold") or of its first other passage ("other"), read off
    the layout the method prepared (each route has its own). Returns, per question, its layout
    (the batch's) and its row in it."""
    from gsa_rag import attention
    from gsa_rag.selection import eligible_chunk_mask

    rows, targets = [], []
    prepare = method.prepare

    def remember(engine, questions, passages):
        layout, cache = prepare(engine, questions, passages)
        eligible = eligible_chunk_mask(layout, engine.config.num_previous_chunks)
        targets.clear()
        for b, shown in enumerate(passages):
            gold = {j for j, p in enumerate(shown) if p.is_gold}
            wanted = gold if target == "gold" else {min(set(range(len(shown))) - gold)}
            raw = layout.valid[b] & ~layout.is_gist[b] & ~layout.is_link[b]
            chunks = layout.chunk_id[b, raw & torch.isin(layout.passage_id[b], torch.tensor(sorted(wanted)))]
            targets.append(int(chunks[eligible[b, chunks.clamp(min=0)]].min()))
            rows.append((layout, b))
        return layout, cache

    class Forced:  # attention.ChunkSelector's interface: each row's target chunk, in every layer
        def __init__(self, gist_index, gist_valid, context_len, config):
            self.num_chunks = gist_index.shape[1]

        def __call__(self, query, key):
            chosen = torch.zeros(query.shape[0], key.shape[1], query.shape[2], self.num_chunks, dtype=torch.bool)
            for b, chunk in enumerate(targets):
                chosen[b, ..., chunk] = True
            return chosen

    monkeypatch.setattr(method, "prepare", remember)
    monkeypatch.setattr(attention, "ChunkSelector", Forced)
    return rows


@pytest.mark.parametrize("target", ["gold", "other"])
def test_gold_recall_is_the_same_through_the_plain_and_the_reuse_route(engine, examples, tmp_path, monkeypatch, target):
    """With the selection forced to one known chunk, both routes score the same gold recall, and
    the chance of one chunk. The reuse route once counted link tokens (seen by every later token,
    raw, in their passage's last chunk) as unfolding that chunk: every passage's last chunk looked
    selected by every head, so gold recall read 1.0 (H200: NQ 99.6% vs 43% for the plain route)."""
    from gsa_rag.selection import gold_chunk_mask

    runs = {}
    for spec in ("gsa", "gsa:reuse=1"):
        method = parse_spec(spec)
        layouts = _forced_selection(monkeypatch, method, target)
        out = run_method(engine, method, examples, _ctx(tmp_path), SETTINGS)
        runs[spec] = out["results"]
        npc = method.gist_config(_ctx(tmp_path)).num_previous_chunks
        for row, ex, (layout, b) in zip(out["results"], examples, layouts, strict=True):
            gold = [{j for j, p in enumerate(ex.passages) if p.is_gold}] * layout.batch_size
            n = int(layout.num_chunks[b]) - npc
            g = int(gold_chunk_mask(layout, gold)[b, :n].sum())
            assert row["gold_chance"] == pytest.approx(_chance_of_gold(n, g, 1), abs=1e-4), spec
    want = 1.0 if target == "gold" else 0.0
    assert [r["gold_recall"] for r in runs["gsa"]] == [want] * len(examples)
    assert [r["gold_recall"] for r in runs["gsa:reuse=1"]] == [want] * len(examples)


def test_link_tokens_unfold_nothing(engine, examples):
    """A row that selects nothing (the forgetting mask: sink, gists, links, local window) unfolds
    no chunk on a KV-reuse layout either, though it sees every passage's link tokens."""
    from gsa_rag.eval.harness import unfolded_chunks
    from gsa_rag.eval.reuse import ReuseMemory
    from gsa_rag.masks import dense_gist_mask

    ex = examples[0]
    layout, _ = ReuseMemory().prepare(engine, ex.question, ex.passages)
    npc = engine.config.num_previous_chunks
    row = dense_gist_mask(layout, npc)[:, None, -1]  # [1, 1, T], the question's last token
    assert bool((row & layout.is_link).any())  # it sees link tokens outside its window
    assert not unfolded_chunks(layout, [row], npc).any()


def test_reuse_refuses_an_engine_without_gists(engine, examples, tmp_path):
    from gsa_rag.errors import GsaRagError

    with pytest.raises(GsaRagError, match="no gists.*chunk size >= 1"):
        run_method(engine, parse_spec("gsa:chunk=0:reuse=1"), examples, _ctx(tmp_path), SETTINGS)


def test_vector_rankings_are_cached(engine, examples, corpus_file, tmp_path, monkeypatch):
    ctx = _ctx(tmp_path, corpus_file)
    for spec in ("vector:k=2", "vector:k=2:source=corpus"):
        parse_spec(spec).setup(examples, ctx)
    files = sorted(p.name for p in (tmp_path / "retrieval").iterdir())
    assert files == ["tiny.corpus.all-MiniLM-L6-v2.json", "tiny.given.all-MiniLM-L6-v2.json"]

    from gsa_rag.eval import retrieval

    def refuse(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(retrieval, "VectorRetriever", refuse)
    given = parse_spec("vector:k=2")
    given.setup(examples, ctx)
    assert given.passages(examples[1])[0].title == "Vasa (ship)"
    corpus = parse_spec("vector:k=2:source=corpus")
    corpus.setup(examples, ctx)
    top = corpus.passages(examples[2])[0]
    assert top.title == "Paris" and top.text == PASSAGES[2][1] and top.is_gold
    cached = json.loads((tmp_path / "retrieval" / "tiny.corpus.all-MiniLM-L6-v2.json").read_text())
    assert all(isinstance(pid, str) for hits in cached["entries"].values() for pid, _ in hits)  # ids, no texts


# --- the script: JSON schema, resume, plots, report --------------------------------------------


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_writes_json_table_and_plots_and_resumes(tiny_model_dir, data_file, tmp_path, capsys):
    rag_eval = _script("rag_eval")
    out = tmp_path / "run.json"
    common = ["--data", str(data_file), "--model", str(tiny_model_dir), "--adapter", "none", "--device", "cpu",
              "--batch-size", "2", "--max-new-tokens", "3", "--seed", "3", "--out", str(out),
              "--retrieval-dir", str(tmp_path / "retrieval")]
    result = rag_eval.main([*common, "--methods", "closed-book,gsa"])
    printed = capsys.readouterr().out
    assert "| closed-book |" in printed and "| GSA 8x, top-4 |" in printed

    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["kind"] == "rag_eval" and data["format_version"] == 1
    assert set(data) >= {"run_key", "run", "environment", "command", "questions", "methods"}
    assert data["run"]["n"] == 3 and data["run"]["seed"] == 3 and data["run"]["adapter"] is None
    assert [q["id"] for q in data["questions"]] == ["q-0", "q-1", "q-2"]
    for m in data["methods"]:
        assert set(m) >= {"spec", "name", "family", "label", "options", "gist_config", "compression_ratio", "summary",
                          "results"}
        s = m["summary"]
        for key in ("n", "subspan_em", "subspan_em_ci95", "em", "em_ci95", "f1", "attended_question",
                    "attended_decode", "prompt_tokens", "ttft_s", "tpot_s", "peak_memory_mb", "memory_kind",
                    "seconds", "batch_size"):
            assert key in s, key
        assert len(s["subspan_em_ci95"]) == 2
        for row in m["results"]:
            assert set(row) >= {"id", "prediction", "subspan_em", "em", "f1", "attended_question", "prompt_tokens"}
    assert "gold_recall" in data["methods"][1]["summary"]
    assert out.with_suffix(".budget.png").stat().st_size > 1000
    assert out.with_suffix(".compression.png").stat().st_size > 1000

    # a rerun skips what is done and adds what is new; the same seed gives the same answers
    again = rag_eval.main([*common, "--methods", "closed-book,gsa,full", "--no-plots"])
    assert [m["spec"] for m in again["methods"]] == ["closed-book", "gsa", "full"]
    assert again["methods"][1]["results"] == data["methods"][1]["results"]
    fresh = rag_eval.main([*common, "--methods", "gsa", "--no-plots", "--fresh"])
    assert [r["prediction"] for r in fresh["methods"][0]["results"]] == \
        [r["prediction"] for r in data["methods"][1]["results"]]
    # another run into the same file is refused: other settings, or other passages for the same questions
    with pytest.raises(SystemExit, match="different run"):
        rag_eval.main([*common, "--methods", "gsa", "--max-new-tokens", "4"])
    def changed(option, value):  # common with one option's value replaced
        at = common.index(option)
        return [*common[: at + 1], value, *common[at + 2 :]]

    with pytest.raises(SystemExit, match="different run"):
        rag_eval.main([*changed("--batch-size", "4"), "--methods", "gsa"])
    lines = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
    lines[0]["passages"] = lines[0]["passages"][:1]
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(SystemExit, match="different run"):
        rag_eval.main([*changed("--data", str(fewer)), "--methods", "gsa"])
    not_results = tmp_path / "notes.jsonl"
    not_results.write_text('{"a": 1}\n{"b": 2}\n')
    with pytest.raises(SystemExit, match="not a rag_eval results file"):
        rag_eval.main([*changed("--out", str(not_results)), "--methods", "gsa"])
    assert not_results.read_text() == '{"a": 1}\n{"b": 2}\n'
    for bad in ("gsa:policy=adaptve", "gsa:k=0", "gist-only:chunk=-3"):  # refused before any method runs
        with pytest.raises(SystemExit, match=f"--methods {bad}: "):
            rag_eval.main([*changed("--out", str(tmp_path / "never.json")), "--methods", f"closed-book,{bad}"])
    assert not (tmp_path / "never.json").exists()

    report = _script("report")
    capsys.readouterr()
    out.with_suffix(".budget.png").unlink()
    report.main(["--plots", str(out)])
    table = capsys.readouterr().out
    assert "| GSA 8x, top-4 |" in table and "best-subspan EM [95% CI]" in table
    assert out.with_suffix(".budget.png").is_file()  # drawn again from the JSON

    # two runs over the same questions with different adapters merge into one table per set
    other = tmp_path / "other.json"
    other_data = json.loads(out.read_text())  # the --fresh run: gsa only
    other_data["run"]["adapter"] = "/runs/gsa8-sft"
    other.write_text(json.dumps(other_data))
    report.main(["--summary", "--plots", str(out), str(other)])
    table = capsys.readouterr().out
    assert "| GSA 8x, top-4 · untrained |" in table and "| GSA 8x, top-4 · gsa8-sft |" in table
    summary = table.split("\n\n")[1].splitlines()
    n_methods = len(other_data["methods"])
    assert summary[0].startswith("| method | ") and len(summary) == 2 + 2 * n_methods  # header, rule, rows
    assert (tmp_path / f"{data['run']['data_tag']}.budget.png").is_file()
    from gsa_rag.eval.rag_report import merge_runs, summary_table, title

    # runs of two models (same adapter) keep one row each, and the title names both
    base = json.loads(out.read_text())
    bigger = json.loads(json.dumps(base))
    bigger["run"]["model"] = "/models/bigger"
    bigger["methods"][0]["summary"]["subspan_em"] = 55.0
    merged = merge_runs([base, bigger])
    labels = [m["label"] for m in merged["methods"]]
    assert len(set(labels)) == len(labels) and any(label.endswith(" · bigger") for label in labels)
    assert "55.0" in summary_table([merged]) and "bigger" in title(merged)
    with pytest.raises(ValueError, match="two runs with the same settings"):
        merge_runs([base, json.loads(json.dumps(base))])
    other_data["run"]["ids_sha"] = "another question set"
    with pytest.raises(ValueError, match="different questions"):
        merge_runs([json.loads(out.read_text()), other_data])


def test_script_runs_the_reuse_row(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "reuse.json"
    result = _script("rag_eval").main(["--data", str(data_file), "--model", str(tiny_model_dir), "--adapter", "none",
                                       "--device", "cpu", "--batch-size", "2", "--max-new-tokens", "3",
                                       "--out", str(out), "--methods", "gsa,gsa:reuse=1", "--no-plots"])
    printed = capsys.readouterr().out
    assert "| GSA 8x, top-4 |" in printed and "| GSA 8x, top-4, KV reuse |" in printed
    assert "GSA 8x, top-4, KV reuse: batches of 1; the gist memory encoded 4 passages for 12 uses" in printed
    plain, reuse = result["methods"]
    assert reuse["spec"] == "gsa:reuse=True" and reuse["options"]["reuse"] and not plain["options"]["reuse"]
    assert plain["summary"]["batch_size"] == 2 and reuse["summary"]["batch_size"] == 1


def test_script_runs_gist_methods_in_the_trained_layout_unless_the_spec_names_it(tiny_model_dir, data_file, tmp_path,
                                                                                  capsys):
    """Regression: gist methods took every GistConfig field their spec does not name (sink, local
    window, word cuts) from the library's defaults, so a model trained with others was evaluated
    in a layout it never saw (with a warning only)."""
    import dataclasses
    import shutil

    from gsa_rag.adapters import write_manifest

    trained = GistConfig(sink=2, num_previous_chunks=3, word_aware=False)
    folder = tmp_path / "full-sft"  # a model folder as `gsa-rag train --full` writes one: weights and manifest
    shutil.copytree(tiny_model_dir, folder)
    write_manifest(folder, base_model="tiny", fingerprint="v2-0", config=trained)
    rag_eval = _script("rag_eval")
    out = tmp_path / "trained.json"
    common = ["--data", str(data_file), "--model", str(folder), "--adapter", "none", "--device", "cpu",
              "--batch-size", "3", "--max-new-tokens", "2", "--out", str(out), "--no-plots"]
    result = rag_eval.main([*common, "--methods", "gsa:k=2,gist-only:chunk=16"])
    layout = {"sink": 2, "num_previous_chunks": 3, "word_aware": False}
    for method in result["methods"]:
        assert {k: method["gist_config"][k] for k in layout} == layout, method["spec"]
    assert [(m["gist_config"]["chunk_size"], m["gist_config"]["top_k"]) for m in result["methods"]] == [(8, 2), (16, 4)]
    assert GistConfig.from_dict(result["run_key"]["gist_config"]) == trained  # where the unnamed fields came from
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and "gist-only:chunk=16" in warned[0] and "sink" not in warned[0], warned

    # what the spec names overrides the trained value, and warns; the rows already run are kept
    again = rag_eval.main([*common, "--methods", "gsa:k=2,gsa:k=2:window=0"])
    assert [m["spec"] for m in again["methods"]] == ["gsa:k=2", "gist-only:chunk=16", "gsa:k=2:window=0"]
    config = again["methods"][-1]["gist_config"]
    assert (config["num_previous_chunks"], config["sink"], config["word_aware"]) == (0, 2, False)
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and "gsa:k=2:window=0" in warned[0] and "num_previous_chunks=0" in warned[0], warned

    # the model retrained with another layout: its rows would mix two layouts, so the file is refused
    write_manifest(folder, base_model="tiny", fingerprint="v2-0", config=dataclasses.replace(trained, sink=3))
    with pytest.raises(SystemExit, match="different run"):
        rag_eval.main([*common, "--methods", "gsa:k=2"])


def test_script_refuses_a_missing_adapter(tiny_model_dir, data_file, tmp_path):
    rag_eval = _script("rag_eval")
    with pytest.raises(SystemExit, match="adapter"):
        rag_eval.main(["--data", str(data_file), "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "nope"),
                       "--out", str(tmp_path / "x.json"), "--methods", "full"])


def test_script_presets_expand():
    rag_eval = _script("rag_eval")
    specs = rag_eval.expand_methods("baselines,gsa,full")
    assert specs == ["closed-book", "full", "vector:k=1", "vector:k=3", "vector", "gsa"]  # k=5 is the default
    assert len(rag_eval.expand_methods("all")) == len(set(rag_eval.expand_methods("all")))
    assert rag_eval.data_tag("nq", "dev") == "nq" and rag_eval.data_tag("hf:nq_open", "dev") == "hf_nq_open"
    assert rag_eval.data_tag("/x/triviaqa/dev.jsonl", "dev") == "triviaqa-dev"


# --- data: the public sets through `datasets`, the corpus ---------------------------------


def _fake_datasets(monkeypatch, rows_by_repo: dict, calls: list):
    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        rows = rows_by_repo[repo]
        if split and "[:" in split:
            rows = rows[: int(split.split("[:")[1].rstrip("]"))]
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hf_sets_convert_to_the_canonical_schema(monkeypatch):
    calls: list = []
    _fake_datasets(monkeypatch, {
        "google-research-datasets/nq_open": [{"question": "who sang x", "answer": ["A", "B"]},
                                             {"question": "when", "answer": ["1990"]}],
        "mandarjoshi/trivia_qa": [{"question": "Who wrote Solo?", "question_id": "sfq_1",
                                   "answer": {"value": "William Boyd", "aliases": ["Bill Boyd", "William Boyd"]}}],
        "hotpotqa/hotpot_qa": [{"id": "5a8", "question": "Which city?", "answer": "Tulsa", "type": "bridge",
                                "level": "hard", "supporting_facts": {"title": ["B"], "sent_id": [0]},
                                "context": {"title": ["A", "B"], "sentences": [["One. ", " Two."], ["Tulsa is big."]]}}],
    }, calls)
    nq = load_examples("hf:nq_open", split="dev", limit=1)
    assert calls[-1] == ("google-research-datasets/nq_open", None, "validation[:1]")
    assert nq == [Example("nq_open-dev-0", "who sang x", ["A", "B"], [], "nq_open")]
    (tqa,) = load_hf_examples("trivia_qa")
    assert calls[-1] == ("mandarjoshi/trivia_qa", "rc.nocontext", "validation")
    assert tqa.id == "trivia_qa-sfq_1" and tqa.answers == ["William Boyd", "Bill Boyd"] and tqa.passages == []
    (hp,) = load_hf_examples("hotpot_qa", split="train")
    assert calls[-1] == ("hotpotqa/hotpot_qa", "distractor", "train")
    assert hp.answers == ["Tulsa"] and hp.meta == {"type": "bridge", "level": "hard"}
    assert hp.passages == [Passage("A", "One. Two.", False), Passage("B", "Tulsa is big.", True)]
    with pytest.raises(ValueError, match="unknown public set"):
        load_hf_examples("squad")
    with pytest.raises(ValueError, match="split"):
        load_hf_examples("nq_open", split="test")


def test_hf_sets_without_datasets_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_examples("nq_open")


def test_load_corpus(corpus_file, tmp_path, monkeypatch):
    corpus = load_corpus(corpus_file)
    assert corpus[0] == CorpusPassage("p0", "Hamlet", PASSAGES[0][1], "test") and len(corpus) == 4
    assert len(load_corpus(corpus_file, limit=2)) == 2
    monkeypatch.setenv("GSA_RAG_DATA", str(corpus_file.parent.parent))
    (corpus_file.parent.parent / "corpus").mkdir(exist_ok=True)
    (corpus_file.parent.parent / "corpus" / "wiki_passages.jsonl").write_text(corpus_file.read_text())
    assert load_corpus() == corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "text": "x"}) + "\n" + json.dumps({"id": "a", "text": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: repeated"):
        load_corpus(bad)
    bad.write_text(json.dumps({"id": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_corpus(bad)
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "absent.jsonl")


def test_chance_formula_matches_enumeration():
    from itertools import combinations

    n, g = 6, 2
    for s in range(n + 1):
        picks = list(combinations(range(n), s))
        hit = sum(any(c < g for c in p) for p in picks) / len(picks)
        assert _chance_of_gold(n, g, s) == pytest.approx(hit), s
    assert math.isclose(_chance_of_gold(10, 1, 1), 0.1)



def test_vector_gold_retrieved_counts_only_questions_that_have_a_gold_passage():
    """As the selecting methods' gold recall: a question whose passages are all marked not gold
    (most of TriviaQA's) has no gold to retrieve, so it is left out, not scored a miss."""
    from gsa_rag.eval.harness import RunSettings, summarize
    from gsa_rag.eval.methods.vector import Vector

    with_gold = Example("a", "q?", ["x"], [Passage("G", "gold text x", True), Passage("N", "other", False)])
    without = Example("b", "q?", ["y"], [Passage("N1", "t1", False), Passage("N2", "t2", False)])
    vector = Vector(k=1)
    vector._picked = {"a": [with_gold.passages[0]], "b": [without.passages[0]]}
    rows = []
    for ex in (with_gold, without):
        rows.append({"id": ex.id, "subspan_em": 0.0, "em": 0.0, "f1": 0.0, "attended_question": 1,
                     "attended_decode": 1, "prompt_tokens": 1, "new_tokens": 1, "answer_shown": False,
                     **vector.extra(ex)})
    assert [r["gold_retrieved"] for r in rows] == [True, None]
    assert summarize(rows, [with_gold, without], RunSettings(bootstrap=10))["gold_retrieved"] == 100.0


def test_script_warns_for_a_gist_method_laid_out_otherwise_than_the_adapter(tmp_path, capsys):
    from gsa_rag.adapters import write_manifest

    rag_eval = _script("rag_eval")
    write_manifest(tmp_path, base_model="x", fingerprint="v2-0", config=GistConfig(chunk_size=8, sink=4))
    ctx = RunContext(data="nq", num_layers=2, retrieval_dir=tmp_path)
    rag_eval.warn_untrained_layouts(["gsa:chunk=8", "full", "closed-book", "gsa:chunk=16:k=2"], ctx, str(tmp_path))
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 1 and "--methods gsa:chunk=16:k=2" in lines[0] and "chunk_size=16" in lines[0], lines
