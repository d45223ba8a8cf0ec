"""The benchmark loop behind benchmarks/rag_eval.py: run one method over a set, score it, time it.

For each batch the method gives the passages and the layout (and, answering from gist memory,
a cache already holding the passages' KV); the harness decodes greedily with
`generation.generate_tokens` (exactly what `GistEngine.generate` does: same stop ids, banned
gist tokens, decoding), and records per question:

- best-subspan EM, EM, token F1 against every accepted answer;
- attended keys: what the question's last token sees (prefill), and the mean over the answer's
  decoding steps; both averaged over all layers and heads;
- gold selection (methods that select chunks): in every selecting layer and KV head, whether
  the question's last token unfolded a chunk of a gold passage (the local window excluded),
  and the chance of that under a random choice of as many chunks (over gist memory too: the
  prefill over a GistCache hands its masks to the cache's observers);
- time to first token (layout + prefill + first sample) and time per output token, per batch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from gsa_rag.attention import layer_mask
from gsa_rag.cache import GistCache
from gsa_rag.engine import GistEngine
from gsa_rag.eval.methods.base import Method, RunContext
from gsa_rag.eval.metrics import (
    best_subspan_em,
    bootstrap_ci,
    exact_match,
    normalize_answer,
    token_f1,
)
from gsa_rag.generation import SamplingParams, generate_tokens
from gsa_rag.selection import eligible_chunk_mask, gold_chunk_mask


@dataclass
class RunSettings:
    """Decoding and reporting settings shared by every method of a run."""

    batch_size: int = 8
    max_new_tokens: int = 32
    seed: int = 0
    bootstrap: int = 1000
    progress: bool = True


# --------------------------------------------------------------------------------------------
# recording what the question selected


class _Recorder:
    """Wraps the prefill's attention state; keeps each layer's visibility row of the last query
    token ([B, H, T] bool). Everything else is delegated to the wrapped state."""

    def __init__(self, inner):
        self._inner = inner
        self.rows: dict[int, torch.Tensor] = {}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def layer_mask(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, lazy: bool = False):
        # the attention function asks for the split mask (gsa_rag.attention.LayerMask); `lazy`
        # passes on (a long prefill through FlexAttention never builds the whole mask)
        mask = layer_mask(self._inner, layer_idx, query, key, lazy=lazy)
        self.rows[layer_idx] = mask.last_row().clone()
        return mask


def _recording_factory(factory):
    from gsa_rag.attention import GistState

    make = factory or GistState.for_new_tokens

    def make_state(layout, num_new, config):
        state = make(layout, num_new, config)
        # decode steps stay unwrapped: the engine's kernel path takes a plain GistState only
        # (kernels.dispatch.sparse_decode_attention), and a wrapped one timed the dense fallback
        return _Recorder(state) if num_new == layout.seq_len else state

    return make_state


def _record_through_cache(cache: GistCache, rows: dict[int, torch.Tensor]):
    """The same rows for a prefill over a GistCache (gist memory): that forward makes its own
    GistState (no state factory), but hands every layer's mask to the cache's observers. Returns
    the observer, which the caller removes after the first forward (an observer keeps the hook,
    and a full mask per layer, on every decode step)."""

    def record(layer_idx, mask):
        rows.setdefault(layer_idx, mask[:, :, -1].clone())

    cache.observers.append(record)
    return record


def unfolded_chunks(layout, rows: list[torch.Tensor], num_previous_chunks: int) -> torch.Tensor:
    """Which chunks each visibility row unfolded, outside the local window (visible anyway).

    A chunk counts as unfolded when the row sees one of its raw passage tokens. Columns every
    later row sees whatever it selects do not count: gists, the sink, the local window, and on
    a KV-reuse layout (gist memory, `gsa:reuse=1`) the link tokens, which sit raw in the last
    chunk of their passage (gsa_rag.layout) — counting them made every passage's last chunk
    look unfolded by every head of every layer.

    Args:
        layout: the prompt's layout (chunk_id, is_gist, is_link, num_chunks).
        rows: per layer, bool [B, H or 1, T], the keys one query row saw.
        num_previous_chunks: the local window's size in chunks.

    Returns:
        bool [L, B, H, C], C = the most chunks of any row.
    """
    C = int(layout.num_chunks.max())
    H = max(r.shape[1] for r in rows)
    vis = torch.stack([r.expand(-1, H, -1) for r in rows])  # [L, B, H, T]
    T = vis.shape[-1]
    chunk = layout.chunk_id[:, :T]
    eligible_chunks = (layout.num_chunks - num_previous_chunks).clamp(min=0)  # [B]
    raw = ~layout.is_gist[:, :T] & ~layout.is_link[:, :T]
    eligible = raw & (chunk >= 0) & (chunk < eligible_chunks[:, None])  # [B, T]
    index = torch.where(eligible, chunk, C)[None, :, None, :].expand_as(vis)
    hits = torch.zeros(*vis.shape[:3], C + 1, dtype=torch.long, device=vis.device)
    chosen = (vis & eligible[None, :, None, :]).long()
    return hits.scatter_add(-1, index, chosen)[..., :C] > 0


def gold_selection(layout, rows: dict[int, torch.Tensor], gold: list[set[int]], num_previous_chunks: int,
                   first_selecting_layer: int) -> list[dict | None]:
    """Did the question's last token unfold a chunk of a gold passage?

    Args:
        layout: the prompt's layout (chunk_id, passage_id, is_gist, num_chunks).
        rows: per layer, bool [B, H, T], the keys the last query row saw.
        gold: per row, the passage numbers (0-based, prompt order) that are gold.
        num_previous_chunks: the local window: those last chunks are visible anyway, not chosen.
        first_selecting_layer: layers below it do not select.

    Returns:
        Per row, {"gold_recall": share of (selecting layer, KV head) that unfolded a gold chunk,
        "gold_chance": the same share expected from a uniform choice of as many chunks,
        "gold_any": whether any did}, or None where no gold chunk could be chosen.
    """
    layers = sorted(layer for layer in rows if layer >= first_selecting_layer)
    B = layout.batch_size
    if not layers:
        return [None] * B
    selected = unfolded_chunks(layout, [rows[layer] for layer in layers], num_previous_chunks)  # [L, B, H, C]
    C = selected.shape[-1]
    eligible_chunks = (layout.num_chunks - num_previous_chunks).clamp(min=0)  # [B]
    # the rule the selection loss trains on: gold chunks among those selection chooses from
    gold_all = (gold_chunk_mask(layout, gold) & eligible_chunk_mask(layout, num_previous_chunks))[:, :C]  # [B, C]
    out: list[dict | None] = []
    for b in range(B):
        n = int(eligible_chunks[b])
        gold_chunks = gold_all[b]
        g = int(gold_chunks.sum())
        if not gold[b] or g == 0 or n == 0:
            out.append(None)
            continue
        sel = selected[:, b]  # [L, H, C]
        hit = (sel & gold_chunks).any(-1)
        chance = [_chance_of_gold(n, g, int(s)) for s in sel.sum(-1).flatten().tolist()]
        out.append({"gold_recall": float(hit.float().mean()), "gold_chance": sum(chance) / len(chance),
                    "gold_any": bool(hit.any())})
    return out


def _chance_of_gold(n: int, g: int, s: int) -> float:
    """P(at least one of g gold chunks among s chosen uniformly from n) = 1 - C(n-g, s) / C(n, s)."""
    if s <= 0:
        return 0.0
    if s > n - g:
        return 1.0
    log_miss = (math.lgamma(n - g + 1) - math.lgamma(n - g - s + 1)) - (math.lgamma(n + 1) - math.lgamma(n - s + 1))
    return 1.0 - math.exp(log_miss)


# --------------------------------------------------------------------------------------------
# memory


class PeakMemory:
    """Peak memory of a stretch of work: CUDA allocator peak, or the process's peak RSS on the
    CPU (reset through /proc/self/clear_refs where allowed, else the lifetime peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda allocated" if device.type == "cuda" else "cpu rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.kind = "cpu rss"
            except OSError:
                self.kind = "cpu rss (process lifetime peak)"

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        except (ImportError, OSError):
            return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# one batch, one method


@dataclass
class _BatchResult:
    predictions: list[str]
    new_tokens: list[int]
    attended_question: list[float]
    attended_decode: list[float]
    prompt_tokens: list[int]
    selection: list[dict | None]
    ttft: float
    tpot: float | None
    steps: int


def _per_row_attended(state) -> torch.Tensor:
    """[B]: keys the last query row sees, mean over all layers and heads."""
    return torch.stack([v.float().mean(-1) for v in state.attended.values()]).mean(0)


def answer_batch(engine: GistEngine, method: Method, questions: list[str], passages: list[list],
                 params: SamplingParams, record_selection: bool = False, gold: list[set[int]] | None = None
                 ) -> _BatchResult:
    """Greedy answers for one batch under a method, with its budgets, selection and timing."""
    device = engine.device
    tokenizer = engine.tokenizer
    stops = engine.stop_ids()
    banned = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in engine.config.special_tokens],
                          dtype=torch.long, device=device)
    _sync(device)
    start = time.perf_counter()
    layout, cache = method.prepare(engine, questions, passages)
    factory = method.state_factory(engine.config)
    cache_rows: dict[int, torch.Tensor] = {}
    recorder = None
    if record_selection and isinstance(cache, GistCache):
        recorder = _record_through_cache(cache, cache_rows)
    elif record_selection:
        factory = _recording_factory(factory)
    first_state: list = []
    decode_budget: list[torch.Tensor] = []

    def observe(state) -> None:
        if not first_state:
            first_state.append(state)
            if recorder is not None:  # the prefill's rows are recorded: decode steps run without it
                cache.observers.remove(recorder)
        else:
            decode_budget.append(_per_row_attended(state))

    rows: list[list[int]] = [[] for _ in questions]
    first = end = start
    steps = 0
    for step, token in enumerate(generate_tokens(engine.model, layout, engine.config, params, stops, banned,
                                                 observe, state_factory=factory, cache=cache)):
        ids = token.tolist()  # synchronises
        if step == 0:
            first = time.perf_counter()
        for row, t in zip(rows, ids):
            if not row or row[-1] not in stops:
                row.append(t)
        steps = step + 1
    end = time.perf_counter()

    state = first_state[0]
    at_question = _per_row_attended(state).tolist()
    per_step = torch.stack(decode_budget) if decode_budget else None  # [S-1, B]
    attended_decode = []
    for b, row in enumerate(rows):
        n = min(len(row) - 1, 0 if per_step is None else per_step.shape[0])
        attended_decode.append(float(per_step[:n, b].mean()) if n > 0 else at_question[b])
    selection = [None] * len(questions)
    if record_selection and gold is not None:
        rows_seen = state.rows if isinstance(state, _Recorder) else cache_rows
        selection = gold_selection(layout, rows_seen, gold, engine.config.num_previous_chunks,
                                   method.first_selecting_layer(engine.config))
    prompt_tokens = (layout.valid & ~layout.is_gist).sum(-1).tolist()
    predictions = [tokenizer.decode([i for i in r if i not in stops], skip_special_tokens=True) for r in rows]
    return _BatchResult(
        predictions=predictions,
        new_tokens=[len([i for i in r if i not in stops]) for r in rows],
        attended_question=at_question,
        attended_decode=attended_decode,
        prompt_tokens=prompt_tokens,
        selection=selection,
        ttft=first - start,
        tpot=(end - first) / (steps - 1) if steps > 1 else None,
        steps=steps,
    )


def run_method(engine_base: GistEngine, method: Method, examples, ctx: RunContext, settings: RunSettings) -> dict:
    """Answers every example with one method; returns {"spec", "label", ..., "summary", "results"}."""
    config = method.gist_config(ctx)
    engine = GistEngine(engine_base.model, engine_base.tokenizer, config)
    engine.adapter = getattr(engine_base, "adapter", None)  # gist memory reads its trained link count
    setup_start = time.perf_counter()
    method.setup(examples, ctx)
    setup_seconds = time.perf_counter() - setup_start
    params = SamplingParams(max_new_tokens=settings.max_new_tokens)
    memory = PeakMemory(engine.device)
    memory.reset()
    torch.manual_seed(settings.seed)
    results, ttfts, tpots = [], [], []
    start = time.perf_counter()
    batch_size = min(settings.batch_size, method.batch_limit or settings.batch_size)
    batches = range(0, len(examples), batch_size)
    for i in tqdm(batches, desc=method.label, unit="batch", disable=not settings.progress):
        batch = examples[i : i + batch_size]
        shown = [method.passages(ex) for ex in batch]
        gold = [{j for j, p in enumerate(ps) if getattr(p, "is_gold", None)} for ps in shown]
        out = answer_batch(engine, method, [ex.question for ex in batch], shown, params,
                           record_selection=method.selects, gold=gold)
        ttfts.append(out.ttft)
        if out.tpot is not None:
            tpots.append(out.tpot)
        for b, ex in enumerate(batch):
            pred = out.predictions[b]
            row = {
                "id": ex.id,
                "prediction": pred,
                "subspan_em": best_subspan_em(pred, ex.answers),
                "em": exact_match(pred, ex.answers),
                "f1": token_f1(pred, ex.answers),
                "attended_question": round(out.attended_question[b], 2),
                "attended_decode": round(out.attended_decode[b], 2),
                "prompt_tokens": out.prompt_tokens[b],
                "new_tokens": out.new_tokens[b],
                "passages_shown": len(shown[b]),
                "answer_shown": answer_in_passages(ex.answers, shown[b]),
            }
            if out.selection[b] is not None:
                row.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.selection[b].items()})
            row.update(method.extra(ex))
            results.append(row)
    seconds = time.perf_counter() - start
    summary = summarize(results, examples, settings)
    summary.update({
        "ttft_s": _mean(ttfts),
        "tpot_s": _mean(tpots),
        "peak_memory_mb": memory.peak_mb(),
        "memory_kind": memory.kind,
        "seconds": seconds,
        "setup_seconds": setup_seconds,
        "batch_size": batch_size,
        **method.finish(),
    })
    return {
        "spec": method.spec,
        "name": method.name,
        "family": method.family or method.name,
        "label": method.label,
        "options": method.options(),
        "gist_config": config.to_dict(),
        "compression_ratio": method.compression_ratio(),
        "summary": summary,
        "results": results,
    }


def answer_in_passages(answers, passages) -> bool:
    """Whether any normalised answer occurs in a shown passage (the question is answerable from it)."""
    texts = [normalize_answer(f"{getattr(p, 'title', '')} {getattr(p, 'text', p)}") for p in passages]
    golds = [g for g in map(normalize_answer, answers) if g]
    return any(g in t for g in golds for t in texts)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(results: list[dict], examples, settings: RunSettings) -> dict:
    """Means (in %) with bootstrap 95% CIs for EM, and the other per-question numbers' means."""
    n = len(results)
    em = [r["subspan_em"] for r in results]
    strict = [r["em"] for r in results]
    lo, hi = bootstrap_ci(em, n=settings.bootstrap, seed=settings.seed)
    slo, shi = bootstrap_ci(strict, n=settings.bootstrap, seed=settings.seed)
    summary = {
        "n": n,
        "subspan_em": 100 * _mean(em) if n else None,
        "subspan_em_ci95": [100 * lo, 100 * hi],
        "em": 100 * _mean(strict) if n else None,
        "em_ci95": [100 * slo, 100 * shi],
        "f1": 100 * _mean([r["f1"] for r in results]) if n else None,
        "attended_question": _mean([r["attended_question"] for r in results]),
        "attended_decode": _mean([r["attended_decode"] for r in results]),
        "prompt_tokens": _mean([r["prompt_tokens"] for r in results]),
        "new_tokens": _mean([r["new_tokens"] for r in results]),
        "answer_shown": 100 * _mean([float(r["answer_shown"]) for r in results]) if n else None,
    }
    selected = [r for r in results if "gold_recall" in r]
    if selected:
        summary.update({
            "gold_recall": 100 * _mean([r["gold_recall"] for r in selected]),
            "gold_chance": 100 * _mean([r["gold_chance"] for r in selected]),
            "gold_any": 100 * _mean([float(r["gold_any"]) for r in selected]),
            "gold_n": len(selected),
        })
    retrieved = [r for r in results if r.get("gold_retrieved") is not None]
    if retrieved:
        summary["gold_retrieved"] = 100 * _mean([float(r["gold_retrieved"]) for r in retrieved])
    # sets where only some questions have a gold passage (TriviaQA open-domain): also score those
    has_gold = {ex.id for ex in examples if any(p.is_gold for p in ex.passages)}
    if 0 < len(has_gold) < n:
        sub = [r["subspan_em"] for r in results if r["id"] in has_gold]
        summary["subspan_em_with_gold"] = 100 * _mean(sub)
        summary["n_with_gold"] = len(sub)
    return summary


def environment(device: torch.device) -> dict:
    """Versions and hardware, for the results file."""
    import platform

    import transformers

    import gsa_rag

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine() or 'cpu'} ({os.cpu_count()} cores)"
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gsa_rag": gsa_rag.__version__,
        "python": platform.python_version(),
    }

