"""Answer metrics for open-domain QA, SQuAD-normalised.

best-subspan EM is the headline number (as in the GSA paper and "Lost in the Middle"): a
prediction scores when any accepted answer appears inside it, so a chatty but correct answer
still counts. Exact match and token F1 are the stricter SQuAD metrics.

Example:
    >>> best_subspan_em("It was The Beatles, of course.", ["Beatles"])
    1.0
    >>> round(token_f1("the big red dog", ["red dog"]), 3)
    0.8
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, squeeze whitespace (SQuAD).

    Example:
        >>> normalize_answer("The  Eiffel-Tower!")
        'eiffeltower'
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def best_subspan_em(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any normalised answer is a substring of the normalised prediction, else 0.0.

    Empty answers never match (an empty string is a substring of everything).
    """
    pred = normalize_answer(prediction)
    return float(any(gold and gold in pred for gold in map(normalize_answer, answers)))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0.

    Answers that normalise to nothing (an alias like "(a") are skipped, as in `best_subspan_em`:
    else an empty prediction, or "The", would match them.
    """
    pred = normalize_answer(prediction)
    return float(any(gold and pred == gold for gold in map(normalize_answer, answers)))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 of the prediction against its best-matching answer (0.0 with no answers;
    answers that normalise to nothing are skipped, as in `exact_match`)."""
    return max((_f1(prediction, gold) for gold in answers if normalize_answer(gold)), default=0.0)


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # SQuAD convention: two empty answers agree, one empty answer gets nothing
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def bootstrap_ci(values: Sequence[float], n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap confidence interval for the mean of `values`.

    Args:
        values: per-example scores (e.g. 0/1 EM).
        n: bootstrap resamples.
        seed: makes the interval reproducible.
        alpha: 0.05 gives a 95% interval.

    Returns:
        `(lo, hi)`; `(nan, nan)` for no values.

    Raises:
        ValueError: `n < 1` or `alpha` outside (0, 1).
    """
    if n < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n >= 1 and 0 < alpha < 1, got n={n}, alpha={alpha}")
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(rng.choices(values, k=k)) / k for _ in range(n))
    lo = means[int((alpha / 2) * (n - 1))]
    hi = means[round((1 - alpha / 2) * (n - 1))]
    return lo, hi
