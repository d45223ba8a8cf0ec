"""`train sft --selection-loss W`: the auxiliary listwise loss on the gist scores (gsa_rag.train.selection_loss).

Weight 0 is today's training bit for bit; the loss is the hand-computed cross-entropy over the
scores selection ranks; it alone trains the LoRA/attention weights and the gist rows; and a few
steps with it raise the gold chunks' rank and the gold selection recall of a tiny model."""

import json
import math

import pytest
import torch
from test_train import fork_two_ranks, tiny_dir  # noqa: F401  (tiny_dir: a fixture)

from gsa_rag.attention import GistState
from gsa_rag.config import GistConfig
from gsa_rag.eval.harness import gold_selection
from gsa_rag.layout import Segment
from gsa_rag.models import load_model
from gsa_rag.train.data import TrainExample, collate, rag_example, rag_examples
from gsa_rag.train.loop import (
    TrainArgs,
    _wrap_trainable,
    batch_loss,
    batch_losses,
    reuse_link_ids,
)
from gsa_rag.train.selection_loss import ScoreCollector, eligible_chunk_mask, query_rows

CONFIG = GistConfig(chunk_size=4, sink=2, top_k=1, word_aware=False)


@pytest.fixture()
def tiny(tiny_dir):  # noqa: F811
    return load_model(str(tiny_dir), device="cpu")


def _ids(n, start):
    return tuple(range(1000 + start, 1000 + start + n))


def hand_examples():
    """Two hand-made examples (word_aware off, chunk 4, sink 2: every chunk id is known).

    Row 0: prefix (6 tokens: sink + chunk 0), passage 0 (chunks 1, 2), passage 1 = gold (chunks
    3, 4), passage 2 (chunk 5, the local window), tail of 5 tokens (2 answer tokens).
    Row 1: prefix (chunk 0), passage 0 = gold (chunk 1), passage 1 (chunks 2, 3, local window 3),
    tail of 7 tokens (3 answer tokens); shorter, so it is left-padded.
    """
    first = TrainExample([Segment(_ids(6, 0), True), Segment(_ids(8, 10), True, passage_id=0),
                          Segment(_ids(8, 20), True, passage_id=1), Segment(_ids(4, 30), True, passage_id=2),
                          Segment(_ids(5, 40), False)], loss_tokens=2, gold=frozenset({1}))
    second = TrainExample([Segment(_ids(6, 50), True), Segment(_ids(4, 60), True, passage_id=0),
                           Segment(_ids(8, 70), True, passage_id=1), Segment(_ids(7, 80), False)],
                          loss_tokens=3, gold=frozenset({0}))
    return [first, second]


def test_gold_passages_survive_loading_and_map_to_chunk_ids(tiny, tmp_path):
    _, tok = tiny
    batch = collate(hand_examples(), CONFIG, tok)
    layout = batch.layout
    assert layout.num_chunks.tolist() == [6, 4]
    assert batch.gold_chunks.tolist() == [[False, False, False, True, True, False],
                                          [False, True, False, False, False, False]]
    assert eligible_chunk_mask(layout, CONFIG.num_previous_chunks).tolist() == [[True] * 5 + [False],
                                                                                [True] * 3 + [False] * 3]
    assert batch.prompt_end.tolist() == [layout.seq_len - 3, layout.seq_len - 4]
    # from canonical JSONL: is_gold survives loading, and passage dropping keeps the indices right
    data = tmp_path / "rag.jsonl"
    record = {"id": "x", "question": "When was the Vasa raised?", "answers": ["1961"], "source": "test", "passages": [
        {"title": "Stockholm", "text": "Stockholm is the capital of Sweden. " * 30, "is_gold": False},
        {"title": "Vasa", "text": "The warship Vasa sank in 1628 and was raised in 1961.", "is_gold": True},
        {"title": "Oslo", "text": "Oslo is the capital of Norway.", "is_gold": None}]}
    data.write_text(json.dumps(record) + "\n" + json.dumps(dict(record, id="y", passages=record["passages"][2:])))
    full, no_gold = sorted(rag_examples([str(data)], tok), key=lambda e: -len(e.gold))
    assert full.gold == {1} and no_gold.gold == frozenset()
    (short,) = [e for e in rag_examples([str(data)], tok, max_prompt_tokens=150) if e.gold]
    assert short.gold == {0}  # the long non-gold passage before it was dropped: the gold one is now first
    # the KV-reuse layout maps the same passages to its own chunks
    link_ids = reuse_link_ids(TrainArgs(stage="sft", output="", reuse=True), CONFIG, tok)
    passages = [{"title": "A", "text": "alpha beta gamma delta"}, {"title": "B", "text": "one two", "is_gold": True}]
    reuse = collate([rag_example(tok, "Q?", passages, "two", link_ids=link_ids)], CONFIG, tok)
    gold_cols = reuse.layout.valid[0] & ~reuse.layout.is_gist[0] & (reuse.layout.passage_id[0] == 1)
    assert reuse.gold_chunks[0].nonzero().flatten().tolist() == reuse.layout.chunk_id[0, gold_cols].unique().tolist()


def test_weight_zero_is_todays_loss_and_gradients(tiny):
    model, tok = tiny
    config = GistConfig(chunk_size=4, sink=2, top_k=1)
    batch = collate(hand_examples(), config, tok)
    model.train()

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    layout = batch.layout  # the loss as train.loop computed it before the option existed
    state = GistState.for_new_tokens(layout, layout.seq_len, config)
    before = model(input_ids=layout.input_ids, position_ids=layout.position_ids, labels=batch.labels,
                   gsa_state=state, use_cache=False).loss
    before.backward()
    want = grads()
    model.zero_grad()
    total, answer, selection = batch_losses(model, batch, config, selection_weight=0.0)
    assert selection is None and total is answer
    total.backward()
    assert torch.equal(total, before)
    got = grads()
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert torch.equal(batch_loss(model, batch, config), before)


def _layer_queries_keys(model, layout, config) -> dict:
    """layer -> (query, key) as the attention function saw them in one forward over `layout`."""
    seen = {}

    def hook(layer_idx, query, key, value, mask):
        seen[layer_idx] = (query.detach(), key.detach())

    state = GistState.for_new_tokens(layout, layout.seq_len, config)
    state.hook = hook
    with torch.no_grad():
        model(input_ids=layout.input_ids, position_ids=layout.position_ids, gsa_state=state, use_cache=False)
    return seen


def _random_model(tiny_dir, config, seed):  # noqa: F811
    """(three-layer random Llama with the tiny tokenizer's vocabulary and gist tokens, tokenizer)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from gsa_rag.models import add_gist_tokens

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True), attn_implementation="gsa").eval()
    add_gist_tokens(model, tok, config)
    return model, tok


def _hand_selection_loss(model, batch, config, rows: str, target: str) -> float:
    """The loss from the layers' query and key, one head, row and chunk at a time."""
    layout = batch.layout
    seen = _layer_queries_keys(model, layout, config)
    per_example = []
    for b in range(layout.batch_size):
        num_eligible = int(layout.num_chunks[b]) - config.num_previous_chunks
        gold = [c for c in range(num_eligible) if batch.gold_chunks[b, c]]
        if rows == "last":
            cols = [int(batch.prompt_end[b])]
        else:
            cols = layout.is_tail[b].nonzero().flatten().tolist()
        layer_losses = []
        for layer, (query, key) in sorted(seen.items()):
            if layer < config.first_selecting_layer:
                continue
            Hq, D, G = query.shape[1], query.shape[-1], query.shape[1] // key.shape[1]
            head_losses = []
            for h in range(Hq):
                row_losses = []
                for t in cols:
                    s = [float(query[b, h, t] @ key[b, h // G, int(layout.gist_index[b, c])]) / math.sqrt(D)
                         for c in range(num_eligible)]
                    m = max(s)
                    log_z = m + math.log(sum(math.exp(x - m) for x in s))
                    if target == "all":  # uniform over gold chunks
                        row_losses.append(-sum(s[g] - log_z for g in gold) / len(gold))
                    else:  # the gold chunks' total probability
                        row_losses.append(-(math.log(sum(math.exp(s[g] - m) for g in gold)) + m - log_z))
                head_losses.append(sum(row_losses) / len(row_losses))
            layer_losses.append(sum(head_losses) / len(head_losses))
        per_example.append(sum(layer_losses) / len(layer_losses))
    return sum(per_example) / len(per_example)


@pytest.mark.parametrize("rows,target", [("last", "any"), ("tail", "any"), ("last", "all"), ("tail", "all")])
def test_selection_loss_is_the_hand_computed_listwise_loss(tiny_dir, rows, target):  # noqa: F811
    model, tok = _random_model(tiny_dir, CONFIG, seed=1)  # three layers: two select
    batch = collate(hand_examples(), CONFIG, tok)
    with torch.no_grad():
        total, answer, selection = batch_losses(model, batch, CONFIG, selection_weight=0.5, selection_rows=rows,
                                                selection_target=target)
    want = _hand_selection_loss(model, batch, CONFIG, rows, target)
    assert selection.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert selection.item() > 0
    torch.testing.assert_close(total, answer + 0.5 * selection)


def test_collected_scores_are_the_scores_selection_ranks(tiny):
    """With top-1, the chunks the attention mask unfolds at the prompt's last row are exactly the
    argmax of the collected scores per query head, unioned over each KV head's group, plus the
    local window."""
    model, tok = tiny
    batch = collate(hand_examples(), CONFIG, tok)
    layout = batch.layout
    cols, _ = query_rows(layout, batch.prompt_end, "last")
    collector = ScoreCollector(layout, cols, CONFIG.first_selecting_layer)
    masks = {}

    def hook(layer_idx, query, key, value, mask):
        collector(layer_idx, query, key, value, mask)
        masks[layer_idx] = mask

    state = GistState.for_new_tokens(layout, layout.seq_len, CONFIG)
    state.hook = hook
    with torch.no_grad():
        model(input_ids=layout.input_ids, position_ids=layout.position_ids, gsa_state=state, use_cache=False)
    assert sorted(collector.scores) == [1]
    scores, mask = collector.scores[1], masks[1]  # [B, Hq, 1, C], [B, Hkv, T, T]
    Hkv = mask.shape[1]
    for b in range(layout.batch_size):
        n = int(layout.num_chunks[b])
        row = mask[b, :, int(batch.prompt_end[b])]  # [Hkv, T]
        unfolded = row[:, layout.gist_index[b, :n]]  # [Hkv, n]: chunk c's gist visible
        best = scores[b, :, 0, :n].argmax(-1)  # [Hq]
        for kv in range(Hkv):
            group = best.view(Hkv, -1)[kv].tolist()
            local = set(range(n - CONFIG.num_previous_chunks, n))
            assert set(unfolded[kv].nonzero().flatten().tolist()) == set(group) | local


def test_selection_loss_alone_trains_lora_and_gist_rows(tiny):
    model, tok = tiny
    model = _wrap_trainable(model, tok, TrainArgs(stage="sft", output="", lora_r=4), CONFIG)
    with torch.no_grad():  # LoRA B starts at 0, which would hide the A matrices' gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    batch = collate(hand_examples(), CONFIG, tok)
    _, _, selection = batch_losses(model, batch, CONFIG, selection_weight=1.0)
    selection.backward()
    moved = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0}
    for part in ("layers.1.self_attn.q_proj.lora_A", "layers.1.self_attn.k_proj.lora_B",
                 "layers.0.self_attn.v_proj.lora_A", "layers.0.mlp.down_proj.lora_B", "trainable_tokens"):
        assert any(part in n for n in moved), part
    # nothing after the selecting layer's keys and queries: not its values, output, MLP or the head
    assert not any("layers.1.self_attn.v_proj" in n or "layers.1.mlp" in n or "o_proj" in n and "layers.1" in n
                   for n in moved)


def test_gradient_checkpointing_gives_the_same_selection_gradients(tiny):
    model, tok = tiny
    batch = collate(hand_examples(), CONFIG, tok)
    model.train()
    plain = batch_loss(model, batch, CONFIG, selection_weight=2.0)
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = batch_loss(model, batch, CONFIG, selection_weight=2.0)
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, plain)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)


WORDS = ["river", "stone", "maple", "copper", "harbor", "lantern", "violet", "meadow", "falcon", "cedar",
         "orbit", "velvet", "canyon", "ember", "glacier", "quartz", "tundra", "willow", "saffron", "beacon"]


def _training_examples(tok, config, n=4):
    """RAG examples over five passages of six distinct words; the gold one sits in a different
    place each, never in the last passage (the local window, which selection does not rank)."""
    examples = []
    for i in range(n):
        passages = [{"title": WORDS[(3 * i + p) % 20].title(),
                     "text": " ".join(WORDS[(3 * i + p + 5 * j) % 20] for j in range(6)),
                     "is_gold": p == (i + 1) % 4} for p in range(5)]
        examples.append(rag_example(tok, f"Which {WORDS[(3 * i + (i + 1) % 4) % 20]}?", passages, WORDS[i]))
    return examples


def _gold_rank_and_recall(model, batch, config, gold):
    """(mean over examples, selecting layers and query heads of the gold chunks' best rank among
    the eligible ones, mean gold selection recall of gsa_rag.eval.harness.gold_selection)."""
    layout = batch.layout
    cols, _ = query_rows(layout, batch.prompt_end, "last")
    collector = ScoreCollector(layout, cols, config.first_selecting_layer)
    rows = {}

    def hook(layer_idx, query, key, value, mask):
        collector(layer_idx, query, key, value, mask)
        index = batch.prompt_end[:, None, None, None].expand(-1, mask.shape[1], 1, mask.shape[-1])
        rows[layer_idx] = mask.gather(2, index)[:, :, 0]  # [B, H, T]: the prompt's last row

    state = GistState.for_new_tokens(layout, layout.seq_len, config)
    state.hook = hook
    with torch.no_grad():
        model(input_ids=layout.input_ids, position_ids=layout.position_ids, gsa_state=state, use_cache=False)
    eligible = eligible_chunk_mask(layout, config.num_previous_chunks)
    ranks = []
    for scores in collector.scores.values():  # [B, Hq, 1, C]
        s = scores[:, :, 0].masked_fill(~eligible[:, None], float("-inf"))
        rank = (s[..., None, :] > s[..., :, None]).sum(-1)  # [B, Hq, C]: chunks scored above each
        best = rank.masked_fill(~batch.gold_chunks[:, None], 10**6).min(-1).values
        ranks.append(best.float().mean())
    recall = gold_selection(layout, rows, gold, config.num_previous_chunks, config.first_selecting_layer)
    return float(torch.stack(ranks).mean()), sum(r["gold_recall"] for r in recall) / len(recall)


def test_a_few_steps_with_the_selection_loss_raise_gold_rank_and_recall(tiny_dir):  # noqa: F811
    config = GistConfig(chunk_size=4, sink=2, top_k=1)
    results = {}
    for weight in (0.0, 5.0):
        model, tok = load_model(str(tiny_dir), device="cpu")
        torch.manual_seed(0)
        model = _wrap_trainable(model, tok, TrainArgs(stage="sft", output="", lora_r=8), config)
        examples = _training_examples(tok, config)
        gold = [set(ex.gold) for ex in examples]
        batch = collate(examples, config, tok)
        before = _gold_rank_and_recall(model, batch, config, gold)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        # every step's logits span the whole vocabulary at every column: the cost of this test; by
        # step 8 the selection loss has the gold chunks first (rank 0, recall 1) and the plain run
        # has not moved them (rank ~5.5, recall <= 0.25)
        for _ in range(8):
            optimizer.zero_grad()
            batch_loss(model, batch, config, selection_weight=weight).backward()
            optimizer.step()
        model.eval()
        results[weight] = (before, _gold_rank_and_recall(model, batch, config, gold))
    (rank0, recall0), (rank_plain, recall_plain) = results[0.0]
    assert results[5.0][0] == (rank0, recall0)  # the same start
    rank_sel, recall_sel = results[5.0][1]
    assert rank_sel < rank0 and recall_sel > recall0, results  # gold chunks climb; selection finds them more often
    assert rank_sel < rank_plain and recall_sel > recall_plain, results  # more than the answer loss alone does


def _rag_file(tmp_path):
    data = tmp_path / "rag.jsonl"
    passages = [{"title": "Vasa", "text": "The warship Vasa sank in 1628 and was raised in 1961.", "is_gold": True},
                {"title": "Stockholm", "text": "Stockholm is the capital of Sweden, built on fourteen islands.",
                 "is_gold": False}]
    record = {"id": "x", "question": "When was the Vasa raised?", "answers": ["1961"], "source": "test",
              "passages": passages}
    data.write_text("\n".join(json.dumps(dict(record, id=str(i), passages=passages[::1 - 2 * (i % 2)]))
                              for i in range(4)))
    return str(data)


def test_cli_logs_both_losses_records_the_weight_and_refuses_misuse(tiny_dir, tmp_path):  # noqa: F811
    from gsa_rag.cli import main

    common = ["--model", str(tiny_dir), "--data", _rag_file(tmp_path), "--steps", "2", "--batch-size", "2",
              "--log-every", "1", "--chunk-size", "4", "--sink", "2"]
    out = tmp_path / "sel"
    main(["train", "sft", *common, "--output", str(out), "--selection-loss", "0.5", "--reuse"])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    for record in log:
        assert record["loss"] == pytest.approx(record["answer_loss"] + 0.5 * record["selection_loss"], rel=1e-5)
        assert record["selection_loss"] > 0
    manifest = json.loads((out / "gsa_adapter.json").read_text())
    assert manifest["train_args"]["selection_loss"] == 0.5 and manifest["train_args"]["selection_rows"] == "last"
    assert manifest["train_args"]["selection_target"] == "any"
    assert manifest["final_selection_loss"] > 0
    plain = tmp_path / "plain"
    main(["train", "sft", *common, "--output", str(plain)])
    assert "selection_loss" not in json.loads((plain / "train_log.jsonl").read_text().splitlines()[0])
    assert json.loads((plain / "gsa_adapter.json").read_text())["train_args"]["selection_loss"] == 0.0
    for bad in (["train", "cpt", *common, "--selection-loss", "1"],  # no passages in CPT
                ["train", "sft", *common[:-4], "--chunk-size", "0", "--selection-loss", "1"],  # no gists to choose
                ["train", "sft", *common, "--selection-loss", "-1"],
                ["train", "sft", *common, "--selection-loss", "1", "--selection-target", "some"]):
        with pytest.raises(SystemExit):
            main([*bad, "--output", str(tmp_path / "bad")])
    no_gold = tmp_path / "no_gold.jsonl"
    no_gold.write_text((tmp_path / "rag.jsonl").read_text().replace('"is_gold": true', '"is_gold": null'))
    with pytest.raises(SystemExit):
        main(["train", "sft", *common[:2], "--data", str(no_gold), *common[4:], "--selection-loss", "1",
              "--output", str(tmp_path / "bad")])


def test_ddp_two_processes_train_with_the_selection_loss(tiny_dir, tmp_path):  # noqa: F811
    fork_two_ranks(["train", "sft", "--reuse", "--selection-loss", "1", "--model", str(tiny_dir), "--data",
                    _rag_file(tmp_path), "--output", str(tmp_path / "ddp"), "--steps", "2", "--batch-size", "1",
                    "--log-every", "1", "--chunk-size", "4"])
    manifest = json.loads((tmp_path / "ddp" / "gsa_adapter.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["train_args"]["selection_loss"] == 1.0
    log = [json.loads(line) for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["selection_loss"] > 0 for r in log)


@pytest.mark.parametrize("target", ["any", "all"])
def test_an_example_without_gold_gives_finite_gradients(target):
    """A batch may hold an example with no eligible gold chunk: it must drop out, not NaN the step."""
    from gsa_rag.train.selection_loss import listwise_loss

    torch.manual_seed(0)
    scores = {1: torch.randn(2, 4, 1, 6, requires_grad=True)}
    gold = torch.tensor([[False, True, True, False, False, False], [False] * 6])
    eligible = torch.tensor([[True] * 5 + [False], [True] * 5 + [False]])
    loss = listwise_loss(scores, gold, eligible, torch.ones(2, 1, dtype=torch.bool), head_dim=16, target=target)
    loss.backward()
    grad = scores[1].grad
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[1].abs().sum() == 0 and grad[0].abs().sum() > 0  # only the example with gold learns


HIER = GistConfig(chunk_size=2, meta_chunks=(2,), sink=2, top_k=1, word_aware=False)  # H-GSA 4x: two levels


def test_lift_units_marks_the_sections_holding_a_marked_chunk(tiny):
    """selection.lift_units against the layout read token by token: chunk c's level-1 section is
    the section_id of its gist column."""
    from gsa_rag.selection import lift_units

    _, tok = tiny
    layout = collate(hand_examples(), HIER, tok).layout
    assert layout.levels == 2
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        mask = torch.rand(layout.gist_index.shape, generator=g) < 0.3
        got = lift_units(layout, mask, 1)
        _, valid = layout.units(1)
        for b in range(layout.batch_size):
            want = {int(layout.section_id[b, layout.gist_index[b, c], 0]) for c in range(int(layout.num_chunks[b]))
                    if mask[b, c]}
            assert set(got[b].nonzero().flatten().tolist()) == {s for s in want if valid[b, s]}


def test_hierarchical_selection_loss_is_the_mean_over_levels_of_the_hand_computed_loss(tiny_dir):  # noqa: F811
    """With H-GSA the loss runs at the chunks and at the sections (gold: a section holding a gold
    chunk; eligible: one holding an eligible chunk) and averages the levels; checked against the
    layers' query and key, one head, row and unit at a time."""
    model, tok = _random_model(tiny_dir, HIER, seed=2)
    batch = collate(hand_examples(), HIER, tok)
    layout = batch.layout
    seen = _layer_queries_keys(model, layout, HIER)
    with torch.no_grad():
        _, _, selection = batch_losses(model, batch, HIER, selection_weight=1.0)

    def level_loss(level):  # mean over examples with a gold unit of (mean over layers, heads of -log p(gold))
        per_example = []
        for b in range(layout.batch_size):
            chunks = range(int(layout.num_chunks[b]) - HIER.num_previous_chunks)  # eligible chunks
            unit = (lambda c: c) if level == 0 else (lambda c, b=b: int(layout.section_id[b, layout.gist_index[b, c], 0]))
            eligible = sorted({unit(c) for c in chunks})
            gold = {unit(c) for c in chunks if batch.gold_chunks[b, c]}
            if not gold:
                continue
            index, _ = layout.units(level)
            t = int(batch.prompt_end[b])
            layers = []
            for layer, (query, key) in sorted(seen.items()):
                if layer < HIER.first_selecting_layer:
                    continue
                G, D = query.shape[1] // key.shape[1], query.shape[-1]
                heads = []
                for h in range(query.shape[1]):
                    s = torch.tensor([float(query[b, h, t] @ key[b, h // G, int(index[b, u])]) / math.sqrt(D) for u in eligible],
                                     dtype=torch.float64)
                    p = torch.softmax(s, 0)
                    heads.append(-math.log(sum(float(p[i]) for i, u in enumerate(eligible) if u in gold)))
                layers.append(sum(heads) / len(heads))
            per_example.append(sum(layers) / len(layers))
        return sum(per_example) / len(per_example)

    levels = [level_loss(0), level_loss(1)]
    assert levels[1] > 0 and levels[0] != pytest.approx(levels[1])  # both levels matter
    assert selection.item() == pytest.approx(sum(levels) / 2, rel=1e-5, abs=1e-6)
    _, _, selection = batch_losses(model, batch, HIER, selection_weight=1.0)
    selection.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads) and any(bool(g.any()) for g in grads)


def test_rag_examples_take_a_named_set_train_split_and_refuse_rows_without_answers(tiny, tmp_path, monkeypatch):
    """`gsa-rag train sft --data nq` trains on nq/train.jsonl, never on the dev file that is
    evaluated; a row without answers is refused by name instead of failing on answers[0]."""
    _, tok = tiny
    record = {"id": "t", "question": "Which train question?", "answers": ["yes"], "source": "test",
              "passages": [{"title": "T", "text": "A passage.", "is_gold": True}]}
    (tmp_path / "nq").mkdir()
    (tmp_path / "nq" / "train.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "nq" / "dev.jsonl").write_text(json.dumps(dict(record, id="d", question="Which dev question?")) + "\n")
    monkeypatch.setenv("GSA_RAG_DATA", str(tmp_path))
    (example,) = rag_examples(["nq"], tok)
    text = tok.decode([i for seg in example.segments for i in seg.ids])
    assert "Which train question?" in text and "dev question" not in text
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(dict(record, id="no-answer", answers=[])) + "\n")
    with pytest.raises(ValueError, match="'no-answer' has no answers"):
        rag_examples([str(empty)], tok)
