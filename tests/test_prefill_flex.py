"""The engine's prefill through FlexAttention (gsa_rag.kernels.prefill.masked_prefill,
gsa_rag.attention._flex_rows) against SDPA under the same dense mask, on fresh random inputs.

On the CPU FlexAttention runs eagerly: it evaluates the mask_mod on every (row, key) pair and
ignores the block lists, so `test_block_lists_reproduce_the_mask` checks those lists on their
own, as the compiled kernel reads them (full blocks skip the mask_mod, listed partial blocks
apply it, unlisted blocks are skipped). On CUDA the same tests run the compiled kernel.
"""

from __future__ import annotations

import functools
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from fakes import FakeTokenizer, random_segments
from gsa_rag.kernels import prefill
from gsa_rag.kernels.prefill import masked_prefill, masked_prefill_plan
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config

from gsa_rag import attention
from gsa_rag.attention import GistState
from gsa_rag.config import GistConfig
from gsa_rag.generation import forward
from gsa_rag.layout import Segment, build_layout

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 128 if DEVICE == "cuda" else 16  # compiled FlexAttention wants 128; eager takes any


def random_mask(B: int, R: int, T: int, g: torch.Generator) -> torch.Tensor:
    """bool [B, R, T]: rows are the last R of T columns, each sees itself and a random set."""
    mask = torch.rand(B, R, T, generator=g) < 0.3
    mask[:, torch.arange(R), torch.arange(T - R, T)] = True
    return mask.to(DEVICE)


def visits_of(plan) -> torch.Tensor:
    """long [B, rows, keys]: how often the compiled kernel attends each pair, from the block lists."""
    bm, seen = plan.block_mask, plan.dense()
    bs = plan.block_size
    visits = torch.zeros(seen.shape, dtype=torch.long, device=seen.device)
    for b in range(seen.shape[0]):
        for qb in range(seen.shape[1] // bs):
            rows = slice(qb * bs, qb * bs + bs)
            for kb in bm.full_kv_indices[b, 0, qb, : bm.full_kv_num_blocks[b, 0, qb]].tolist():
                visits[b, rows, kb * bs : kb * bs + bs] += 1
            for kb in bm.kv_indices[b, 0, qb, : bm.kv_num_blocks[b, 0, qb]].tolist():
                visits[b, rows, kb * bs : kb * bs + bs] += seen[b, rows, kb * bs : kb * bs + bs].long()
    return visits


@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("B,R,T", [(2, 40, 70), (1, 33, 33), (2, 17, 90)])
def test_masked_prefill_equals_sdpa_under_the_mask(B, R, T, permute):
    g = torch.Generator().manual_seed(B * 1000 + R * 10 + T)
    mask = random_mask(B, R, T, g)
    recall = (torch.rand(B, T, generator=g) < 0.2).to(DEVICE) if permute else None
    q = torch.randn(B, 4, R, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(B, 2, T, 16, generator=g).to(DEVICE) for _ in range(2))
    out = masked_prefill(q, k, v, masked_prefill_plan(mask, recall, BLOCK), scale=0.25)
    ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                         v.double().repeat_interleave(2, 1), attn_mask=mask[:, None], scale=0.25)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pool_rows", [4096, 32])
def test_block_lists_reproduce_the_mask(pool_rows, monkeypatch):
    """The compiled kernel attends each (row, key) pair once per listed block that holds it: every
    pair of a full block, the mask's pairs of a partial one. Counted so, each pair the mask (keys
    permuted) shows is attended once and no other pair at all; and the permutation is the recall
    columns first, in column order. `pool_rows` 32: the plan pools the mask one row block (of two
    sequences) at a time, so the partial blocks' numbering runs on across bands."""
    monkeypatch.setattr(prefill, "_POOL_ROWS", pool_rows)
    g = torch.Generator().manual_seed(7)
    B, R, T = 2, 70, 150
    mask = random_mask(B, R, T, g)
    mask[:, :, :40] = False  # whole empty blocks, and below, whole full ones
    mask[:, :32, 60:92] = True
    recall = (torch.rand(B, T, generator=g) < 0.2).to(DEVICE)
    plan = masked_prefill_plan(mask, recall, block_size=16)
    bm, seen = plan.block_mask, plan.dense()  # seen: what the mask_mod returns at each pair
    Rp, Tp = seen.shape[1:]
    expected = torch.zeros(B, Rp, Tp, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        first = recall[b].sum()
        perm = plan.perm[b, :T]
        assert recall[b, perm[:first]].all() and not recall[b, perm[first:]].any()
        assert torch.equal(perm[:first].sort().values, perm[:first])  # column order kept
        expected[b, :R, :T] = mask[b][:, perm]
    assert torch.equal(seen, expected)
    assert torch.equal(visits_of(plan), expected.long())
    assert bm.full_kv_num_blocks.sum() > 0 and bm.kv_num_blocks.sum() < B * (Rp // 16) * (Tp // 16)
    # rows of a random mask are many runs: only the partial blocks are kept, past the two shared
    # ones (empty, full)
    assert plan.runs is None
    assert plan.partial.shape[0] == 2 + bm.kv_num_blocks.sum()


def runs_mask(B: int, R: int, T: int, runs: int, g: torch.Generator) -> torch.Tensor:
    """bool [B, R, T]: each row `runs` runs of consecutive keys, the first at key 0 and the last
    ending at key T - 1 (the edges a run finder can get wrong), the rest at random."""
    mask = torch.zeros(B, R, T, dtype=torch.bool)
    for b in range(B):
        for r in range(R):
            cuts = sorted(random.Random(int(torch.randint(1 << 30, (), generator=g))).sample(range(1, T - 1), 2 * runs - 2))
            bounds = [0, *cuts, T]
            for j in range(runs):
                mask[b, r, bounds[2 * j] : bounds[2 * j + 1]] = True
    return mask.to(DEVICE)


@pytest.mark.parametrize("extra", [0, 1])
def test_rows_of_few_runs_are_kept_as_their_bounds(extra, monkeypatch):
    """A mask whose rows are at most RUNS runs (keys permuted) is kept as the runs' bounds, the
    mask_mod comparing a key with them; one row more keeps the table. Both are the mask, pair for
    pair (the mask_mod where the kernel reads it, the block lists elsewhere), with rows pooled
    a block at a time so the bounds of every band land on their own rows, and both give SDPA's
    attention. T is a whole number of blocks, so a run can end at the last padded key."""
    monkeypatch.setattr(prefill, "_POOL_ROWS", BLOCK)
    g = torch.Generator().manual_seed(5 + extra)
    B, R, T = 2, 40, 4 * BLOCK if BLOCK < 64 else BLOCK
    mask = runs_mask(B, R, T, prefill.RUNS, g)
    mask[1, 17] = runs_mask(1, 1, T, prefill.RUNS + extra, g)[0, 0]
    plan = masked_prefill_plan(mask, None, block_size=BLOCK)
    assert (plan.runs is None) == bool(extra) and (plan.partial is None) == (not extra)
    expected = torch.zeros_like(plan.dense())
    expected[:, :R, :T] = mask
    assert torch.equal(plan.dense(), expected)
    assert torch.equal(visits_of(plan), expected.long())
    q = torch.randn(B, 4, R, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(B, 2, T, 16, generator=g).to(DEVICE) for _ in range(2))
    out = masked_prefill(q, k, v, plan, scale=0.25)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=mask[:, None], scale=0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_a_long_prompt_through_flex_equals_sdpa(monkeypatch):
    """A 2K-token gist layout at FlexAttention's own block of 128, the forgetting mask made in
    bands of 512 rows: full, partial and skipped blocks all occur, and the kernel's output (compiled
    on CUDA) equals SDPA under the mask."""
    from gsa_rag.kernels.bench import decode_case

    monkeypatch.setattr(prefill, "_POOL_ROWS", 512)
    config, layout = decode_case(1, 2048, 8, device=DEVICE)
    state = GistState.for_new_tokens(layout, layout.seq_len, config)
    R, T = state.tail_rows().start, layout.seq_len
    plan = masked_prefill_plan(lambda lo, hi: state.forget_rows(lo, hi)[:, 0], prefill.front_columns(layout), 128,
                               size=(1, R, T))
    assert state._forget_mask is None
    assert plan.runs is not None and int((plan.runs[..., 1] > plan.runs[..., 0]).sum(-1).max()) == 2  # recall, window
    bm = plan.block_mask
    assert bm.full_kv_num_blocks.sum() > 0 and bm.kv_num_blocks.sum() > 0
    assert bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum() < 0.5 * bm.kv_num_blocks.numel() * (T // 128)
    mask = state.forget_mask()[:, 0, :R]
    expected = torch.zeros_like(plan.dense())
    expected[:, :R, :T] = mask[:, :, plan.perm[0, :T]]
    assert torch.equal(visits_of(plan), expected.long())
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, R, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 2, T, 16, generator=g).to(DEVICE) for _ in range(2))
    out = masked_prefill(q, k, v, plan, scale=0.25)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=mask[:, None], scale=0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_a_plan_refuses_other_rows():
    mask = random_mask(1, 8, 20, torch.Generator().manual_seed(0))
    plan = masked_prefill_plan(mask, None, BLOCK)
    q, k = torch.randn(1, 2, 9, 16, device=DEVICE), torch.randn(1, 2, 20, 16, device=DEVICE)
    with pytest.raises(ValueError, match="8 rows over 20 keys, got 9 over 20"):
        masked_prefill(q, k, k, plan)


def tiny_model(family):
    import gsa_rag.attention  # noqa: F401  (registers "gsa")

    torch.manual_seed(0)
    model_config = family(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(model_config, attn_implementation="gsa").eval().to(DEVICE)


def flex_everywhere(monkeypatch, min_rows: int = 8) -> None:
    """The flex path on for this device from `min_rows` rows (the tiny prompts' forwards)."""
    monkeypatch.setattr(attention, "FLEX_DEVICES", (DEVICE,))
    monkeypatch.setattr(attention, "FLEX_MIN_ROWS", min_rows)


def one_prompt(seed: int):
    """(config, layout) of one random prompt of passages and a question."""
    config = GistConfig(chunk_size=4, sink=2, top_k=2)
    layout = build_layout([random_segments(random.Random(seed), max_passages=4, max_len=40)], config, FakeTokenizer())
    return config, layout.to(DEVICE)


@pytest.mark.parametrize("family,meta", [(LlamaConfig, ()), (Qwen2Config, ()), (LlamaConfig, (4,))])
def test_engine_prefill_through_flex_equals_sdpa(family, meta, monkeypatch):
    """A tiny random model's prefill logits with the flex path on and off: two prompts of
    passages and a question (batched, left-padded), the whole prompt at once and in two forwards
    (the second over the first's cache), one gist level and H-GSA; the question rows keep their
    own path in layers that select. The flex path makes the forgetting mask a band of rows at a
    time (two row blocks here) and builds it whole only where one band holds every row."""
    model = tiny_model(family)
    flex_everywhere(monkeypatch)
    monkeypatch.setattr(prefill, "_POOL_ROWS", 2 * BLOCK)
    states = []

    def recorded(layout, num_new, config):
        states.append(GistState.for_new_tokens(layout, num_new, config))
        return states[-1]

    if DEVICE == "cpu":  # eager FlexAttention takes any block; 16 makes the lists matter to the plan
        monkeypatch.setattr(prefill, "masked_prefill_plan", functools.partial(prefill.masked_prefill_plan, block_size=16))
    calls = []
    original = prefill.masked_prefill

    def counted(*args, **kwargs):
        calls.append(args[0].shape[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(prefill, "masked_prefill", counted)  # attention reads it from the module
    for seed in range(2):
        config = GistConfig(chunk_size=4, sink=2, top_k=2, meta_chunks=meta)
        rng = random.Random(seed)
        layout = build_layout([random_segments(rng, max_passages=4, max_len=40) for _ in range(2)],
                              config, FakeTokenizer()).to(DEVICE)
        split = layout.seq_len // 2
        logits = {}
        for on in (False, True):
            monkeypatch.setattr(attention, "FLEX_PREFILL", on)
            calls.clear()
            states.clear()
            with torch.no_grad():
                cache = DynamicCache()
                whole = forward(model, layout, layout.seq_len, cache, config, state_factory=recorded)[0].logits
                cache.crop(split - layout.seq_len)  # what a forward of the first `split` columns leaves (keys see only earlier ones)
                rest = forward(model, layout, layout.seq_len - split, cache, config, state_factory=recorded)[0].logits
            logits[on] = (whole, rest)
            assert bool(calls) == on, "the flex path did not run" if on else "the flex path ran while off"
            # built whole only where one band may hold every row (the CUDA run's short prompts)
            for state in states:
                built = state._forget_mask is not None
                assert built if not on else not built or state.q_index.shape[0] <= prefill._POOL_ROWS
                if on and meta and "flex" in str(state._biases.keys()):
                    # only sink, link and top-level gist keys move to the front (a lower level's
                    # gist is seen inside its section only: in front it leaves partial blocks everywhere)
                    plan = next(v for k, v in state._biases.items() if isinstance(k, tuple) and k[0] == "flex")
                    lay = state.layout
                    front = prefill.front_columns(lay)
                    assert front.sum() < (lay.is_sink | lay.is_link | lay.is_gist).sum()  # not every gist
                    for b in range(lay.batch_size):
                        n = int(front[b].sum())
                        assert front[b, plan.perm[b, :n]].all() and not front[b, plan.perm[b, n : lay.seq_len]].any()
            assert not on or min(calls) < layout.seq_len - split + 1  # the second forward's rows too
        for a, b in zip(logits[True], logits[False], strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_flex_stays_off_where_it_cannot_serve(monkeypatch):
    """Training forwards (a gradient), dropout, few rows, GSA_RAG_KERNELS=0 and head dims the
    kernels do not take keep SDPA."""
    flex_everywhere(monkeypatch, 256)
    q = torch.randn(1, 4, 256, 16, device=DEVICE)
    k = torch.randn(1, 2, 256, 16, device=DEVICE)
    assert attention._flex_serves(q, k, k, 0.0)
    assert not attention._flex_serves(q, k, k, 0.1)
    assert not attention._flex_serves(q[:, :, :255], k, k, 0.0)
    assert not attention._flex_serves(q.requires_grad_(), k, k, 0.0)
    q = q.detach()
    assert not attention._flex_serves(torch.randn(1, 4, 256, 24, device=DEVICE), k, k, 0.0)
    monkeypatch.setenv("GSA_RAG_KERNELS", "0")
    assert not attention._flex_serves(q, k, k, 0.0)


def test_a_failed_flex_prefill_falls_back_to_sdpa_and_is_not_tried_again(monkeypatch):
    """A compile that cannot run here (no C compiler, an Inductor error) costs one warning: that
    forward and every later one take SDPA, with SDPA's output."""
    model = tiny_model(LlamaConfig)
    config, layout = one_prompt(3)
    flex_everywhere(monkeypatch)
    monkeypatch.setattr(attention, "_FLEX_FAILED", None)
    with torch.no_grad():
        monkeypatch.setattr(attention, "FLEX_PREFILL", False)
        ref = forward(model, layout, layout.seq_len, DynamicCache(), config)[0].logits
        monkeypatch.setattr(attention, "FLEX_PREFILL", True)
        calls = []

        def broken(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("InductorError: no working C compiler")

        monkeypatch.setattr(prefill, "masked_prefill", broken)
        with pytest.warns(RuntimeWarning, match="FlexAttention prefill failed .*no working C compiler"):
            out = forward(model, layout, layout.seq_len, DynamicCache(), config)[0].logits
        assert calls == [1] and "no working C compiler" in attention._FLEX_FAILED
        again = forward(model, layout, layout.seq_len, DynamicCache(), config)[0].logits
    assert calls == [1]
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(again, ref)


def test_a_hook_sees_the_same_masks_on_the_flex_path(monkeypatch):
    """Gist memory's hook (offloaded KV to fetch) is handed each layer's whole mask: the flex path
    builds it whole for a forward with a hook and hands over the same masks as SDPA's path."""
    model = tiny_model(LlamaConfig)
    config, layout = one_prompt(5)
    flex_everywhere(monkeypatch)
    calls = []
    original = prefill.masked_prefill
    monkeypatch.setattr(prefill, "masked_prefill", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    seen, logits = {}, {}
    for on in (False, True):
        monkeypatch.setattr(attention, "FLEX_PREFILL", on)
        seen[on] = []

        states = []

        def hooked(layout, num_new, config, masks=seen[on], states=states):
            states.append(GistState.for_new_tokens(layout, num_new, config))
            states[-1].hook = lambda layer, query, key, value, mask: masks.append(mask.clone())
            return states[-1]

        with torch.no_grad():
            logits[on] = forward(model, layout, layout.seq_len, DynamicCache(), config, state_factory=hooked)[0].logits
        assert states[0]._forget_mask is not None  # built once, whole, for the hook
    assert len(calls) == 3, "the flex path did not run in every layer"
    assert len(seen[True]) == len(seen[False]) == 3
    for a, b in zip(seen[True], seen[False], strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)


def counting_compile(fn):
    """(fn through torch.compile with dynamic shapes, the list of Dynamo's graphs): a backend that
    counts the graphs and runs them eagerly (no Inductor: the guards, hence the recompiles, are
    Dynamo's)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(fn, dynamic=True, backend=backend), graphs


@pytest.fixture
def counted_compiles(monkeypatch):
    """masked_prefill's compiled FlexAttention traced by Dynamo, its graphs counted."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    compiled, graphs = counting_compile(flex_attention)
    monkeypatch.setitem(prefill._compiled_flex, True, compiled)
    yield graphs
    torch._dynamo.reset()


def _run(B, R, T, split=None):
    """masked_prefill of the last R of T rows under a causal mask; `split`: the query a view of
    the first `split` rows of a longer forward's, as the engine passes it."""
    mask = torch.ones(B, R, T, dtype=torch.bool, device=DEVICE).tril(T - R)
    plan = masked_prefill_plan(mask, None, BLOCK)
    rows = torch.randn(B, 4, (split or R) + 7, 16, device=DEVICE)[:, :, :R]
    k = torch.randn(B, 2, T, 16, device=DEVICE)
    out = masked_prefill(rows, k, k, plan, 0.25, compiled=True)
    ref = F.scaled_dot_product_attention(rows, k.repeat_interleave(2, 1), k.repeat_interleave(2, 1),
                                         attn_mask=mask[:, None], scale=0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_new_lengths_do_not_compile_again(counted_compiles):
    """After two lengths, further lengths, strided query views and rows equal to keys reuse the
    compiled FlexAttention: the engine meets a new length at nearly every prompt, and each compile
    costs seconds (a strided query view was one more input layout, once in 128 prompts)."""
    _run(1, 3 * BLOCK, 4 * BLOCK)
    _run(1, 5 * BLOCK - 3, 6 * BLOCK + 1)
    warm = len(counted_compiles)
    assert warm <= 2
    for R, T, split in [(2 * BLOCK + 5, 3 * BLOCK, None), (4 * BLOCK, 4 * BLOCK, None), (3 * BLOCK, 5 * BLOCK, 4 * BLOCK),
                        (BLOCK + 1, 7 * BLOCK - 2, 2 * BLOCK)]:
        _run(1, R, T, split)
    assert len(counted_compiles) == warm


def test_a_batch_of_runs_as_large_as_runs_compiles_no_extra_graph(counted_compiles):
    """A first batch of RUNS (8) sequences: another batch size then reuses the graph, as for any
    other first batch (the runs' bounds, kept [B, rows, RUNS], once shared the batch's size
    symbol and so fixed the batch at 8)."""
    _run(prefill.RUNS, 2 * BLOCK, 3 * BLOCK)
    _run(prefill.RUNS, 3 * BLOCK - 5, 4 * BLOCK + 3)
    warm = len(counted_compiles)
    _run(2, 2 * BLOCK + 7, 3 * BLOCK)
    assert len(counted_compiles) == warm


def test_past_the_recompile_limit_flex_raises_rather_than_running_eagerly(counted_compiles, monkeypatch):
    """torch.compile past its recompile limit would run FlexAttention eagerly and silently (every
    score: out of memory at a long prefill on CUDA); masked_prefill raises instead, which the
    engine's fallback turns into SDPA."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    _run(1, 2 * BLOCK, 3 * BLOCK)
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        _run(2, 2 * BLOCK, 3 * BLOCK)  # another batch size: a second graph, past the limit of one


@pytest.mark.parametrize("reads_mask", [False, True])
def test_the_eval_recorder_takes_the_flex_path_without_the_whole_mask(reads_mask, monkeypatch):
    """rag_eval's selection recorder (a wrapper of the engine's GistState) passes `lazy` on: its
    rows are the same as on SDPA's path, and the whole mask is built only for a hook that reads it."""
    from gsa_rag.eval.harness import _recording_factory

    model = tiny_model(Qwen2Config)
    config, layout = one_prompt(9)
    flex_everywhere(monkeypatch)
    monkeypatch.setattr(prefill, "_POOL_ROWS", BLOCK)
    rows = {}
    for on in (False, True):
        monkeypatch.setattr(attention, "FLEX_PREFILL", on)
        recorder = _recording_factory(None)(layout, layout.seq_len, config)
        hook = lambda layer, query, key, value, mask: None
        hook.reads_mask = reads_mask
        recorder._inner.hook = hook
        with torch.no_grad():
            forward(model, layout, layout.seq_len, DynamicCache(), config, state_factory=lambda *a, r=recorder: r)
        rows[on] = recorder.rows
        assert (recorder._inner._forget_mask is not None) == (not on or reads_mask)
    assert rows[True].keys() == rows[False].keys() == {0, 1, 2}
    for layer in rows[True]:
        assert torch.equal(rows[True][layer], rows[False][layer])


def test_hgsa_plans_grow_linearly_with_the_length():
    """The partial blocks of an H-GSA prefill's plan (the decode benchmarks' layout, 32x) grow
    about linearly with the length when only top-level gists move to the front (4K -> 8K: 102 ->
    205 blocks); with every gist in front they grew about 2.9x (157 -> 460), and every row block
    held some."""
    from gsa_rag.kernels.bench import decode_case

    def partial_blocks(context, front):
        config, layout = decode_case(1, context, 8, meta_chunks=(4,), device=DEVICE)
        state = GistState.for_new_tokens(layout, layout.seq_len, config)
        split = state.tail_rows().start
        plan = masked_prefill_plan(lambda lo, hi: state.forget_rows(lo, hi)[:, 0], front(layout), 128,
                                   size=(1, split, layout.seq_len))
        if front is prefill.front_columns:  # top-level gists in front: a few runs a row, kept as their bounds
            assert plan.runs is not None
        return int(plan.block_mask.kv_num_blocks.sum())

    every_gist = lambda layout: layout.is_sink | layout.is_link | layout.is_gist
    assert partial_blocks(8192, prefill.front_columns) <= 2.2 * partial_blocks(4096, prefill.front_columns)
    assert partial_blocks(8192, every_gist) > 2.5 * partial_blocks(4096, every_gist)


def test_flex_tiles_by_head_dim():
    """The compiled kernel's tiles come from FLEX_TILES for the head dim (64 x 64 for 64), and
    only where they divide the BlockMask's block; other head dims take FlexAttention's own."""
    assert prefill._tiles(64, 128) == {"BLOCK_M": 64, "BLOCK_N": 64}
    assert prefill._tiles(64, 16) == {} and prefill._tiles(128, 128) == {} and prefill._tiles(16, 128) == {}


@pytest.fixture
def counted_mask_compiles(monkeypatch):
    """masks.dense_gist_mask_fused on this device, traced by Dynamo, its graphs counted (the
    engine compiles it with Inductor on CUDA only)."""
    import torch._dynamo

    from gsa_rag import masks

    torch._dynamo.reset()
    compiled, graphs = counting_compile(masks.dense_gist_mask)
    monkeypatch.setattr(masks, "FUSED_MASK_DEVICES", (DEVICE,))
    monkeypatch.setattr(masks, "_compiled_mask", compiled)
    yield graphs
    torch._dynamo.reset()


def test_the_plans_bands_take_the_compiled_rule_without_recompiling(counted_mask_compiles):
    """A plan's bands of forgetting rows come from the compiled rule (one fused pass on CUDA): the
    same rows as the eager rule, and one graph for every length of a layout's depth (GSA, H-GSA
    of two levels, of three) and every batch past 1 (three levels, a loop bound of 2, once fixed a
    batch of 2 too)."""
    from gsa_rag.kernels.bench import decode_case

    from gsa_rag.masks import dense_gist_mask

    for batch, context, meta in [(2, 1200, (4, 4)), (3, 1500, (4, 4)), (1, 1000, ()), (1, 1700, ()), (1, 2300, ()),
                                 (1, 1200, (4,)), (1, 2100, (4,))]:
        config, layout = decode_case(batch, context, 8, meta_chunks=meta, device=DEVICE)
        state = GistState.for_new_tokens(layout, layout.seq_len, config)
        band = state.forget_rows(100, 100 + attention.FOLD_MAX_ROWS + 1)
        assert torch.equal(band[:, 0], dense_gist_mask(layout, 1, state.q_index[100 : 101 + attention.FOLD_MAX_ROWS]))
    assert len(counted_mask_compiles) == 3


def test_kernels_off_keeps_the_rule_eager(counted_mask_compiles, monkeypatch):
    from gsa_rag.kernels.bench import decode_case

    from gsa_rag import masks

    monkeypatch.setenv("GSA_RAG_KERNELS", "0")
    _, layout = decode_case(1, 600, 8, device=DEVICE)
    q = torch.arange(0, 300, device=DEVICE)
    assert torch.equal(masks.dense_gist_mask_fused(layout, 1, q), masks.dense_gist_mask(layout, 1, q))
    assert counted_mask_compiles == []


def test_a_failed_mask_compile_warns_and_builds_the_rows_eagerly(monkeypatch):
    from gsa_rag.kernels.bench import decode_case

    from gsa_rag import masks

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(masks, "FUSED_MASK_DEVICES", (DEVICE,))
    monkeypatch.setattr(masks, "_compiled_mask", broken)
    _, layout = decode_case(1, 600, 8, device=DEVICE)
    q = torch.arange(0, 300, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="compiling the forgetting mask failed"):
        rows = masks.dense_gist_mask_fused(layout, 1, q)
    assert torch.equal(rows, masks.dense_gist_mask(layout, 1, q)) and masks._compiled_mask is False
    assert torch.equal(masks.dense_gist_mask_fused(layout, 1, q), rows)  # eager from then on, no second warning


@pytest.mark.skipif(DEVICE == "cpu" and not (shutil.which("c++") or shutil.which("g++")),
                    reason="no C++ compiler for Inductor's CPU code")
def test_the_compiled_rule_equals_the_eager_rule_on_random_layouts(monkeypatch):
    """Inductor's code for the forgetting rule (the engine compiles it on CUDA; here on this
    device) against the eager rule, every row of random batches: left padding, independent
    passages with link tokens, H-GSA of two and three levels."""
    import warnings

    import torch._dynamo

    from gsa_rag import masks

    torch._dynamo.reset()
    monkeypatch.setattr(masks, "FUSED_MASK_DEVICES", (DEVICE,))
    monkeypatch.setattr(masks, "_compiled_mask", None)
    rng = random.Random(3)
    for meta, reuse in [((), False), ((), True), ((2,), False), ((2, 3), False), ((2,), True)]:
        config = GistConfig(chunk_size=rng.randrange(2, 6), meta_chunks=meta, sink=rng.randrange(0, 4),
                            word_aware=False)
        rows = []
        for _ in range(rng.randrange(2, 4)):  # rows of different lengths: left padding
            segments = []
            for p in range(rng.randrange(1, 5)):
                ids = tuple(rng.randrange(1, 990) for _ in range(rng.randrange(5, 60)))
                segments.append(Segment(ids, True, passage_id=p, independent=reuse))
                if reuse:
                    segments.append(Segment((5, 6), True, passage_id=p, link=True))
            segments.append(Segment(tuple(rng.randrange(1, 990) for _ in range(rng.randrange(1, 8))), False))
            rows.append(segments)
        layout = build_layout(rows, config, FakeTokenizer(), device=DEVICE)
        q = torch.arange(layout.seq_len, device=DEVICE)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed compile warns and builds the rows eagerly
            rows_compiled = masks.dense_gist_mask_fused(layout, 1, q)
        assert torch.equal(rows_compiled, masks.dense_gist_mask(layout, 1, q)), (meta, reuse)
    assert masks._compiled_mask not in (None, False)
    torch._dynamo.reset()
