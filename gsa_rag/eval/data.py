"""RAG evaluation sets in the project's canonical JSONL schema.

One JSON object a line::

    {"id": "nq-17", "question": "...", "answers": ["...", "..."],
     "passages": [{"title": "...", "text": "...", "is_gold": true}, ...], "source": "nq-open"}

`answers` lists every accepted alias; `is_gold` is true/false, or null where unknown.

When online, the public sets load through `datasets` and are converted to the same schema:
`load_examples("hf:nq_open")`, `"hf:trivia_qa"`, `"hf:hotpot_qa"` (see `load_hf_examples`).
The pooled Wikipedia corpus for open-domain retrieval loads with `load_corpus`.

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
        path_or_name: a `.jsonl` path, one of "nq", "hotpotqa", "triviaqa", "musique", or
            "hf:<name>" for a public set through `datasets` (see `load_hf_examples`).
        split: for a named set, which file ("dev", "train").
        limit: keep only the first `limit` examples (file order).

    Returns:
        The examples, in file order.

    Raises:
        FileNotFoundError: the file (or the data root) does not exist.
        ValueError: a line is not valid JSON or does not follow the schema; the message names
            the file and the 1-based line number.
    """
    if str(path_or_name).startswith(HF_PREFIX):
        return load_hf_examples(str(path_or_name)[len(HF_PREFIX) :], split=split, limit=limit)
    path = resolve_path(path_or_name, split)
    examples, first_line = [], {}
    for lineno, example in _parse_jsonl(path, parse_example, "example", limit):
        # results, rankings and resumed runs are keyed by id: a repeated one would mix two questions up
        if example.id in first_line:
            raise ValueError(f"{path}:{lineno}: example id {example.id!r} repeats line {first_line[example.id]}; "
                             "ids must be unique")
        first_line[example.id] = lineno
        examples.append(example)
    return examples


def _parse_jsonl(path: Path, parse, what: str, limit: int | None = None):
    """Yields (line number, parse(record)) for the non-blank lines of a JSONL file, at most
    `limit`; a line that is not JSON or that `parse` rejects raises ValueError naming file:line."""
    count = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and count >= limit:
                return
            if not line.strip():
                continue
            try:
                item = parse(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}:{lineno}: bad {what} ({type(error).__name__}: {error})") from error
            count += 1
            yield lineno, item


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


# --------------------------------------------------------------------------------------------
# the public sets through `datasets` (online)

HF_PREFIX = "hf:"
# short name -> (hub repo, config); the repos the short names redirect to on the hub
HF_SETS = {
    "nq_open": ("google-research-datasets/nq_open", None),
    "trivia_qa": ("mandarjoshi/trivia_qa", "rc.nocontext"),
    "hotpot_qa": ("hotpotqa/hotpot_qa", "distractor"),
}
_HF_SPLITS = {"dev": "validation", "validation": "validation", "train": "train"}


def load_hf_examples(name: str, split: str = "dev", limit: int | None = None) -> list[Example]:
    """A public QA set through `datasets.load_dataset`, converted to the canonical schema.

    Needs network access the first time (then the `datasets` cache). NQ-open and TriviaQA
    (rc.nocontext) come without passages: use them closed-book or with open-domain retrieval
    over the corpus. HotpotQA (distractor) keeps its 10 paragraphs; `is_gold` marks the
    supporting-fact titles, and `type` / `level` go to `meta`.

    Args:
        name: "nq_open", "trivia_qa" or "hotpot_qa".
        split: "dev" (the public validation split) or "train".
        limit: keep only the first `limit` examples.

    Raises:
        ValueError: unknown set or split.
        ImportError: `datasets` is not installed (the message says what to install).
    """
    if name not in HF_SETS:
        raise ValueError(f"unknown public set {name!r}; known: {', '.join(HF_PREFIX + n for n in HF_SETS)}")
    if split not in _HF_SPLITS:
        raise ValueError(f"unknown split {split!r} for {name}; use one of {', '.join(_HF_SPLITS)}")
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"loading {HF_PREFIX}{name} needs the `datasets` package: pip install datasets") from error
    repo, config = HF_SETS[name]
    hf_split = _HF_SPLITS[split] + (f"[:{limit}]" if limit is not None else "")
    rows = datasets.load_dataset(repo, config, split=hf_split) if config else datasets.load_dataset(repo, split=hf_split)
    convert = {"nq_open": _from_nq_open, "trivia_qa": _from_trivia_qa, "hotpot_qa": _from_hotpot_qa}[name]
    examples = [convert(row, i, split) for i, row in enumerate(rows)]
    return examples[:limit] if limit is not None else examples


def _from_nq_open(row: dict, index: int, split: str) -> Example:
    return Example(id=f"nq_open-{split}-{index}", question=row["question"], answers=list(row["answer"]),
                   source="nq_open")


def _from_trivia_qa(row: dict, index: int, split: str) -> Example:
    answer = row["answer"]
    answers = list(dict.fromkeys([answer["value"], *answer.get("aliases", [])]))  # value first, no repeats
    return Example(id=f"trivia_qa-{row.get('question_id') or index}", question=row["question"], answers=answers,
                   source="trivia_qa")


def _from_hotpot_qa(row: dict, index: int, split: str) -> Example:
    gold_titles = set(row["supporting_facts"]["title"])
    context = row["context"]
    passages = [
        Passage(title=title, text=" ".join(s.strip() for s in sentences if s.strip()), is_gold=title in gold_titles)
        for title, sentences in zip(context["title"], context["sentences"], strict=True)
    ]
    return Example(id=f"hotpot_qa-{row['id']}", question=row["question"], answers=[row["answer"]], passages=passages,
                   source="hotpot_qa", meta={"type": row.get("type"), "level": row.get("level")})


# --------------------------------------------------------------------------------------------
# the retrieval corpus


@dataclass
class CorpusPassage:
    """One passage of the pooled Wikipedia corpus (`corpus/wiki_passages.jsonl`)."""

    id: str
    title: str
    text: str
    source: str = ""


def load_corpus(path: str | os.PathLike | None = None, limit: int | None = None) -> list[CorpusPassage]:
    """The passages to retrieve from in the open-domain settings.

    Args:
        path: a JSONL file of `{id, title, text, source}`; default `data_root()/corpus/wiki_passages.jsonl`.
        limit: keep only the first `limit` passages.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a bad line (the message names the file and line), or a repeated id.
    """
    path = Path(path).expanduser() if path is not None else data_root() / "corpus" / "wiki_passages.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no corpus file at {path}")
    def parse(record: dict) -> CorpusPassage:
        return CorpusPassage(id=str(record["id"]), title=str(record.get("title") or ""),
                             text=_require_str(record, "text"), source=str(record.get("source") or ""))

    passages: list[CorpusPassage] = []
    seen: set[str] = set()
    for lineno, passage in _parse_jsonl(path, parse, "corpus passage", limit):
        if passage.id in seen:
            raise ValueError(f"{path}:{lineno}: repeated passage id {passage.id!r}")
        seen.add(passage.id)
        passages.append(passage)
    return passages
