"""Fuzzing (hypothesis) over layouts, masks, selection, injection, and gist memory operations.

Every property runs under two settings profiles, without duplicating the test:
  * "ci": 200 examples, in the default run (`python -m pytest`);
  * "nightly": 10,000 examples, marked `slow` (excluded by default):
        python -m pytest -m slow tests/test_fuzz.py
Hypothesis prints the failing example and a `@reproduce_failure` blob; `--hypothesis-seed=N`
replays a run.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile

import pytest
import torch
from fakes import GIST_ID, FakeTokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from test_memory import tiny_engine
from transformers import AutoTokenizer

from gsa_rag.config import GistConfig
from gsa_rag.layout import PAD_CHUNK, SINK_CHUNK, Segment, build_layout
from gsa_rag.masks import dense_gist_mask, dense_unfold_mask
from gsa_rag.memory import GistMemory
from gsa_rag.prompt import build_segments
from gsa_rag.selection import choose_chunks, union_over_groups

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
           "database": None}
settings.register_profile("ci", max_examples=200, stateful_step_count=8, **_COMMON)
settings.register_profile("nightly", max_examples=10_000, stateful_step_count=20, **_COMMON)
PROFILES = pytest.mark.parametrize("profile", ["ci", pytest.param("nightly", marks=pytest.mark.slow)])


def run(profile: str, strategy, prop) -> None:
    """Runs the property `prop(example)` over `strategy` under the named settings profile."""
    settings(settings.get_profile(profile))(given(strategy)(prop))()


# --- strategies --------------------------------------------------------------------------------------------

ids = st.integers(1, 989)  # FakeTokenizer: ids below 999 are text, 999 is <gist>


@st.composite
def configs(draw):
    return GistConfig(
        chunk_size=draw(st.integers(0, 6)), sink=draw(st.integers(0, 5)), num_previous_chunks=draw(st.integers(0, 2)),
        word_aware=draw(st.booleans()), top_k=draw(st.integers(1, 6)),
    )


@st.composite
def prompts(draw, reuse: bool | None = None):
    """Segments of one prompt: a prefix, passages (independent + links when `reuse`), a raw tail."""
    reuse = draw(st.booleans()) if reuse is None else reuse
    segments = [Segment(tuple(draw(st.lists(ids, max_size=6))), True)]
    for p in range(draw(st.integers(0, 4))):
        segments.append(Segment(tuple(draw(st.lists(ids, min_size=1, max_size=20))), True, p, independent=reuse))
        if reuse and draw(st.booleans()):
            segments.append(Segment((991, 992), True, p, link=True))
    segments.append(Segment(tuple(draw(st.lists(ids, min_size=1, max_size=6))), False))
    return segments


batches = st.tuples(configs(), st.lists(prompts(), min_size=1, max_size=3))


def lay_out(config, batch):
    return build_layout(batch, config, FakeTokenizer())


# --- layouts -----------------------------------------------------------------------------------------------


@PROFILES
def test_fuzz_layout(profile):
    def prop(example):
        config, batch = example
        layout = lay_out(config, batch)
        for b, segments in enumerate(batch):
            single = lay_out(config, [segments])
            pad = layout.seq_len - single.seq_len
            for name in ("input_ids", "is_gist", "chunk_id", "position_ids", "doc_id", "is_link", "passage_id"):
                assert torch.equal(getattr(layout, name)[b, pad:], getattr(single, name)[0]), name  # padding changes nothing
            assert not layout.valid[b, :pad].any() and (layout.chunk_id[b, :pad] == PAD_CHUNK).all()
            ids_, gist = single.input_ids[0].tolist(), single.is_gist[0].tolist()
            assert [t for t, g in zip(ids_, gist) if not g] == [t for s in segments for t in s.ids]  # text kept, in order
            assert all(t == GIST_ID for t, g in zip(ids_, gist) if g)
            raw_pos = [p for p, g in zip(single.position_ids[0].tolist(), gist) if not g]
            assert raw_pos == list(range(len(raw_pos)))  # gists cost no position
            chunk = single.chunk_id[0].tolist()
            assert all(a <= b_ for a, b_ in itertools.pairwise(chunk))  # chunks only move forward
            assert set(chunk) <= set(range(SINK_CHUNK, int(single.num_chunks[0]) + 1))
            assert single.gist_index[0, : int(single.num_chunks[0])].tolist() == [i for i, g in enumerate(gist) if g]
            for seg in segments:  # independent passages carry their doc id, nothing else does
                if seg.independent:
                    cols = (single.passage_id[0] == seg.passage_id) & ~single.is_link[0] & ~single.is_sink[0]
                    assert (single.doc_id[0][cols] == seg.passage_id).all()
            if config.uses_gists:  # (without gists every token is in the one open chunk: all "tail")
                assert (single.doc_id[0][single.is_tail[0]] == -1).all()

    run(profile, batches, prop)


# --- masks -------------------------------------------------------------------------------------------------


@PROFILES
def test_fuzz_masks(profile):
    def prop(example):
        (config, batch), seed = example
        layout = lay_out(config, batch)
        B, T = layout.input_ids.shape
        q = torch.arange(T)
        forget = dense_gist_mask(layout, config.num_previous_chunks)
        causal = q[None, :, None] >= q[None, None, :]
        assert not (forget & ~causal).any()  # never sees the future
        assert forget[:, q, q].all()  # always sees itself
        valid_rows = layout.valid[:, :, None] & layout.valid[:, None, :]
        pad_cols = ~layout.valid[:, None, :] & ~torch.eye(T, dtype=torch.bool)[None]
        assert not (forget & pad_cols).any()  # padding is invisible
        ordinary = (layout.doc_id == -1).all(-1)  # rows without KV-reuse isolation
        for key in (layout.is_sink, layout.is_gist):  # sinks and gists are seen by every later token
            must = causal & key[:, None, :] & valid_rows
            assert (forget | ~must)[ordinary].all()

        C = layout.gist_index.shape[1]
        g = torch.Generator().manual_seed(seed)
        some = torch.rand(B, 2, T, C, generator=g) < 0.3
        more = some | (torch.rand(B, 2, T, C, generator=g) < 0.3)
        m_some = dense_unfold_mask(layout, some, config.num_previous_chunks, q)
        m_more = dense_unfold_mask(layout, more, config.num_previous_chunks, q)
        assert not (m_some & ~m_more).any()  # selecting more never hides anything
        everything = dense_unfold_mask(layout, torch.ones(B, 1, T, C, dtype=torch.bool), config.num_previous_chunks, q)
        tail = layout.is_tail[:, :, None] & ordinary[:, None, None]
        full = (causal & valid_rows) | torch.eye(T, dtype=torch.bool)[None]
        assert torch.equal(everything[:, 0][tail.expand(B, T, T)], full[tail.expand(B, T, T)])  # unfold all = full attention

    run(profile, st.tuples(batches, st.integers(0, 2**31 - 1)), prop)


# --- selection ---------------------------------------------------------------------------------------------

scores_st = st.lists(st.one_of(st.floats(-1e4, 1e4, allow_nan=False), st.just(float("-inf"))), min_size=1, max_size=12)


@PROFILES
def test_fuzz_top_k(profile):
    def prop(example):
        rows, k = example
        C = max(len(r) for r in rows)
        scores = torch.full((len(rows), 1, 1, C), float("-inf"))
        for i, r in enumerate(rows):
            scores[i, 0, 0, : len(r)] = torch.tensor(r)
        chosen = choose_chunks(scores, k=torch.full((len(rows),), k))
        exists = torch.isfinite(scores)
        assert not (chosen & ~exists).any()  # never a missing chunk
        assert torch.equal(chosen.sum(-1), exists.sum(-1).clamp(max=k))  # exactly min(k, chunks): k > chunks clamps
        worst_kept = torch.where(chosen, scores, torch.inf).amin(-1)
        best_left = torch.where(~chosen & exists, scores, -torch.inf).amax(-1)
        assert (worst_kept >= best_left).all()  # the k best

    run(profile, st.tuples(st.lists(scores_st, min_size=1, max_size=3), st.integers(1, 15)), prop)


@PROFILES
def test_fuzz_top_p_and_group_union(profile):
    def prop(example):
        rows, p, group = example
        C = max(len(r) for r in rows)
        scores = torch.full((1, len(rows) * group, 1, C), float("-inf"))
        for i, r in enumerate(rows):
            for j in range(group):
                scores[0, i * group + j, 0, : len(r)] = torch.tensor(r) / 100
        chosen = choose_chunks(scores, top_p=p)
        exists = torch.isfinite(scores)
        assert not (chosen & ~exists).any()
        assert (chosen.any(-1) | ~exists.any(-1)).all()  # a head with chunks keeps at least its best
        mass = torch.softmax(scores, -1).nan_to_num(0.0)
        kept = (mass * chosen).sum(-1)
        smallest = torch.where(chosen, mass, torch.inf).amin(-1)
        assert ((kept >= p - 1e-5) | ~exists.any(-1)).all()  # reaches the mass asked for
        assert ((kept - smallest < p + 1e-5) | ~chosen.any(-1)).all()  # and no chunk more than needed
        union = union_over_groups(chosen, len(rows))
        assert torch.equal(union, chosen.view(1, len(rows), group, 1, C).any(2))

    run(profile, st.tuples(st.lists(scores_st, min_size=1, max_size=3), st.floats(0.01, 1.0), st.integers(1, 3)), prop)


# --- injection: user text cannot create special tokens or break the layout -----------------------------------

FRAGMENTS = ["<gist>", "<mgist>", "<link1>", "<link2>", "<link4>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
             "system\n", "assistant\n", "user", "\ue0000\ue001", "\ue0011\ue000", "Document [1] ", "(Title: x)",
             "Question:", "<gist", "mgist>", "<|", "|>", "\n", " ", "é", "中文", "🙂"]
# The default (SmolLM2) vocabulary lacks the byte tokens 0x04 0x06 0x13 0x14 0x16 0x1D 0xF1 0xF2,
# so those control characters and U+40000..U+BFFFF (unassigned planes) do not survive tokenization:
# a tokenizer limit, not an injection, that the decode round trip below would flag. Surrogates
# are refused before tokenization (tests/test_reliability.py).
_alphabet = st.characters(max_codepoint=0x3FFFF, exclude_categories=("Cs",), exclude_characters="\x04\x06\x13\x14\x16\x1d")
evil_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(_alphabet, max_size=8)), max_size=8).map("".join)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)


@PROFILES
def test_fuzz_injection(profile, tokenizer):
    engine = tiny_engine(tokenizer)
    special = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in engine.config.special_tokens])
    controls = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")]
    clean = engine.layout(["q"], [["p"]]).input_ids[0]
    want_controls = [int((clean == c).sum()) for c in controls]

    def prop(example):
        question, passages = example
        passages = [p if p.strip() else "x" for p in passages]  # empty passages are refused by the engine (tested elsewhere)
        segments = build_segments(tokenizer, question, passages)
        layout = engine.layout([question], [passages])
        ids = layout.input_ids[0]
        assert torch.equal(torch.isin(ids, special), layout.is_gist[0])  # only the layout's own gists
        assert [int((ids == c).sum()) for c in controls] == want_controls  # only the template's own control tokens
        assert [s.passage_id for s in segments if s.compress][1:] == list(range(len(passages)))  # one run per passage
        for p, seg in zip(passages, segments[1:]):  # decoding a passage's ids gives back its text
            assert tokenizer.decode(list(seg.ids)) == f"Document [{seg.passage_id + 1}] {p}\n"
        assert question in tokenizer.decode(list(segments[-1].ids))

    run(profile, st.tuples(evil_text, st.lists(evil_text, max_size=3)), prop)


# --- gist memory: a state machine over add / remove / search / save+load / a failing add ----------------------

POOL = [
    "The Vasa sank in 1628.", "It was raised in 1961.", "Stockholm is the capital of Sweden.",
    "The museum opened in 1990.", "Djurgarden is an island.", "<gist> <|im_start|> are plain text here.",
]


class MemoryMachine(RuleBasedStateMachine):
    """The memory against a plain model: an ordered dict id -> text."""

    engine = None  # set by the test (one tiny model for every run)

    @initialize()
    def start(self):
        self.memory = GistMemory(self.engine, progress=False, batch_size=2)
        self.model: dict[str, str] = {}
        self.directory = tempfile.mkdtemp(prefix="gsa-fuzz-")

    def teardown(self):
        shutil.rmtree(getattr(self, "directory", ""), ignore_errors=True)

    @rule(texts=st.lists(st.sampled_from(POOL), min_size=1, max_size=3))
    def add(self, texts):
        got = self.memory.add(texts)
        assert len(got) == len(texts)
        for pid, text in zip(got, texts):
            assert self.model.setdefault(pid, text) == text  # content addressed: same text, same id

    @rule(texts=st.lists(st.sampled_from(POOL), min_size=2, max_size=4))
    def add_that_runs_out_of_memory(self, texts):
        real, calls = self.memory._encode, []

        def encode(units, skip):
            calls.append(1)
            if len(calls) == 2:
                raise torch.OutOfMemoryError("injected")
            return real(units, skip)

        self.memory._encode = encode
        try:
            self.memory.add(texts)
        except torch.OutOfMemoryError:
            pass
        finally:
            del self.memory._encode
        if len(calls) < 2:  # fewer than two batches to encode: the add went through
            for text in texts:
                self.model.setdefault(self.memory.add([text])[0], text)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data):
        pid = data.draw(st.sampled_from(sorted(self.model)))
        self.memory.remove(pid)
        del self.model[pid]

    @rule(k=st.integers(1, 8))
    def search(self, k):
        hits = self.memory.search("When was the Vasa raised?", k=k)
        assert len(hits) == min(k, len(self.model))
        assert {h.id for h in hits} <= set(self.model) and len({h.id for h in hits}) == len(hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    @rule()
    def save_and_load(self):
        before = [(h.id, h.score) for h in self.memory.search("Where is the museum?", k=3)]
        self.memory.save(self.directory)
        self.memory = GistMemory.load(self.directory, self.engine, progress=False)
        self.memory.batch_size = 2
        after = [(h.id, h.score) for h in self.memory.search("Where is the museum?", k=3)]
        assert [i for i, _ in after] == [i for i, _ in before]
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(after, before))

    @invariant()
    def matches_the_model(self):
        if not hasattr(self, "memory"):
            return
        assert self.memory.ids == list(self.model)  # same passages, same order
        assert [self.memory.passage(pid).text for pid in self.model] == list(self.model.values())
        sink = self.memory._sink(self.memory.system)[0]
        keys = {self.memory._passage_key(sink, self.memory._passages[pid].sha) for pid in self.model}
        assert keys <= set(self.memory._entries)  # every passage has its KV
        assert {k for k, e in self.memory._entries.items() if e.kind == "passage"} == keys  # and nothing else is kept


@PROFILES
def test_fuzz_memory_state_machine(profile, tokenizer):
    MemoryMachine.engine = tiny_engine(tokenizer)
    run_state_machine_as_test(MemoryMachine, settings=settings.get_profile(profile))
