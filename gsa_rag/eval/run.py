"""Answer a canonical RAG set with one engine and score it (the `gsa-rag eval` command).

The full comparison harness (vector-store baselines, plots) is benchmarks/rag_eval.py; this
is the small loop both share: batches of questions with their given passages, greedy.
"""

from __future__ import annotations

import platform
import time

import torch
from tqdm import tqdm

from gsa_rag.eval.data import load_examples
from gsa_rag.eval.metrics import best_subspan_em, bootstrap_ci, exact_match, token_f1


def _attended_keys(state) -> list[float]:
    """Per batch row: mean keys seen by the last query row, over selecting layers and heads."""
    layers = [v.float().mean(-1) for layer, v in state.attended.items() if layer >= state.config.first_selecting_layer]
    return torch.stack(layers).mean(0).tolist() if layers else [0.0] * state.layout.batch_size


def evaluate(engine, data: str, *, split: str = "dev", limit: int | None = None, batch_size: int = 8,
             max_new_tokens: int = 32, examples: list | None = None) -> dict:
    """Greedy answers and best-subspan EM / F1 / EM for `data` (a set name or a JSONL path).

    `examples`: `load_examples(data, split=split, limit=limit)` when the caller has read them
    already (`gsa-rag eval` checks a local set before the model loads); None reads them here.

    Returns:
        {"summary": {...}, "examples": [{id, question, answers, prediction, em, ...}]}
    """
    if examples is None:
        examples = load_examples(data, split=split, limit=limit)
    rows = []
    start = time.perf_counter()
    for i in tqdm(range(0, len(examples), batch_size), desc=f"eval {data}", unit="batch"):
        batch = examples[i : i + batch_size]
        budgets: list[list[float]] = []
        predictions = engine.generate(
            [ex.question for ex in batch],
            [ex.passages for ex in batch],
            max_new_tokens=max_new_tokens,
            observe=lambda state, budgets=budgets: budgets.append(_attended_keys(state)),
        )
        for row, (ex, pred) in enumerate(zip(batch, predictions)):
            rows.append({
                "id": ex.id,
                "question": ex.question,
                "answers": ex.answers,
                "prediction": pred,
                "subspan_em": best_subspan_em(pred, ex.answers),
                "em": exact_match(pred, ex.answers),
                "f1": token_f1(pred, ex.answers),
                "attended_keys": budgets[0][row] if budgets else 0.0,  # at the question's last token
            })
    elapsed = time.perf_counter() - start
    em = [r["subspan_em"] for r in rows]
    lo, hi = bootstrap_ci(em)
    config = engine.config
    summary = {
        "data": str(data),
        "split": split,
        "n": len(rows),
        "subspan_em": 100 * sum(em) / len(em),
        "subspan_em_ci95": [100 * lo, 100 * hi],
        "em": 100 * sum(r["em"] for r in rows) / len(rows),
        "f1": 100 * sum(r["f1"] for r in rows) / len(rows),
        "attended_keys": sum(r["attended_keys"] for r in rows) / len(rows),
        "gist_config": config.to_dict(),
        "model": engine.model.config.model_type,
        "device": str(engine.device),
        "device_name": torch.cuda.get_device_name() if engine.device.type == "cuda" else platform.processor() or "cpu",
        "seconds": elapsed,
    }
    return {"summary": summary, "examples": rows}
