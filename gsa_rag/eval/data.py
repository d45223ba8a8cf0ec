"""RAG evaluation sets in the project's canonical JSONL schema.

One JSON object a line::

    {"id": "nq-17", "question": "...", "answers": ["...", "..."],
     "passages": [{"title": "...", "text": "...", "is_gold": true}, ...], "source": "nq-open"}

`answers` lists every accepted alias; `is_gold` is true/false, or null where unknown.

Example:
    >>> examples = load_examples("nq", split="dev", limit=2)  # doctest: +SKIP
    >>> len(examples[0].passages)  # doctest: +SKIP
    10
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

KNOWN_SETS = ("nq", "hotpotqa", "triviaqa", "musique")


@dataclass
class Passage:
    """One retrieved (or gold) passage."""

    title: str
    text: str
    # True: holds the evidence; False: a distractor; None: unknown (e.g. open retrieval)
    is_gold: bool | None = None


@dataclass
class Example:
    """One question with its accepted answers and its passages, in retrieval order."""

    id: str
    question: str
    answers: list[str]
    passages: list[Passage] = field(default_factory=list)
    source: str = ""
    # any other fields of the record (HotpotQA keeps "type" and "level"), for breakdowns
    meta: dict = field(default_factory=dict)


_EXAMPLE_KEYS = {"id", "question", "answers", "passages", "source"}


def data_root() -> Path:
    """Where the evaluation sets live.

    Returns:
        `$GSA_RAG_DATA` if set, else `../shared/data` relative to the working directory.

    Raises:
        FileNotFoundError: neither exists.
    """
    env = os.environ.get("GSA_RAG_DATA")
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"GSA_RAG_DATA={env!r} is not a directory")
        return root
    root = Path.cwd().parent / "shared" / "data"
    if root.is_dir():
        return root
    raise FileNotFoundError(
        f"no data directory: set GSA_RAG_DATA to the folder holding {', '.join(KNOWN_SETS)} "
        f"(each with <split>.jsonl), or run from a checkout next to ../shared/data (looked in {root})"
    )


def resolve_path(path_or_name: str | os.PathLike, split: str = "dev") -> Path:
    """A set name ("nq", ...) -> `data_root()/name/{split}.jsonl`; anything else is a file path."""
    name = str(path_or_name)
    if name in KNOWN_SETS and not Path(name).is_file():
        path = data_root() / name / f"{split}.jsonl"
    else:
        path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path} (known sets: {', '.join(KNOWN_SETS)})")
    return path


def load_examples(path_or_name: str | os.PathLike, split: str = "dev", limit: int | None = None) -> list[Example]:
    """Read examples from a canonical JSONL file or a named set.

    Args:
        path_or_name: a `.jsonl` path, or one of "nq", "hotpotqa", "triviaqa", "musique".
        split: for a named set, which file ("dev", "train").
        limit: keep only the first `limit` examples (file order).

    Returns:
        The examples, in file order.

    Raises:
        FileNotFoundError: the file (or the data root) does not exist.
        ValueError: a line is not valid JSON or does not follow the schema; the message names
            the file and the 1-based line number.
    """
    path = resolve_path(path_or_name, split)
    examples: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                examples.append(parse_example(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}:{lineno}: bad example ({type(error).__name__}: {error})") from error
    return examples


def parse_example(record: dict) -> Example:
    """Build an Example from one decoded JSON object, checking the schema."""
    if not isinstance(record, dict):
        raise TypeError(f"expected a JSON object, got {type(record).__name__}")
    answers = record["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise TypeError("'answers' must be a list of strings")
    passages = record.get("passages") or []
    if not isinstance(passages, list):
        raise TypeError("'passages' must be a list")
    return Example(
        id=str(record["id"]),
        question=_require_str(record, "question"),
        answers=list(answers),
        passages=[_parse_passage(p) for p in passages],
        source=str(record.get("source") or ""),
        meta={k: v for k, v in record.items() if k not in _EXAMPLE_KEYS},
    )


def _parse_passage(record: dict) -> Passage:
    if not isinstance(record, dict):
        raise TypeError(f"a passage must be a JSON object, got {type(record).__name__}")
    is_gold = record.get("is_gold")
    if is_gold is not None and not isinstance(is_gold, bool):
        raise TypeError(f"'is_gold' must be true, false or null, got {is_gold!r}")
    return Passage(title=str(record.get("title") or ""), text=_require_str(record, "text"), is_gold=is_gold)


def _require_str(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise TypeError(f"{key!r} must be a string, got {type(value).__name__}")
    return value
