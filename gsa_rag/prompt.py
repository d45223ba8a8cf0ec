"""RAG prompt -> segments, through the model's chat template.

The template is rendered with placeholders where user text goes (system line, each passage,
the question). The rendered string is split at the placeholders: template pieces are
tokenized normally (they hold the template's special tokens), user pieces with special-token
parsing off, so no passage or question can forge a special token.

Segments: everything up to the end of the last passage is context (compressed); the
question and the assistant header are the raw tail. Each passage is its own segment, so it
ends with its own closing gist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gsa_rag.layout import Segment, encode_text

DEFAULT_SYSTEM = "Answer the question using the documents. Reply with a short answer only."
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: no template touches them
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
_PREFIX, _TAIL = "prefix", "tail"


@dataclass(frozen=True)
class Passage:
    text: str
    title: str = ""

    def render(self, number: int | None) -> str:
        """`Document [n] (Title: t) text` + newline; without the number (None) for KV reuse,
        where a passage is encoded once whatever its place in a prompt."""
        title = f" (Title: {self.title})" if self.title else ""
        label = "" if number is None else f" [{number}]"
        return f"Document{label}{title} {self.text}\n"


def as_passage(item) -> Passage:
    """Accepts a string, a mapping with `text` (and optional `title`), or any object with
    `text` and `title` attributes (a Passage, an eval example's passage)."""
    if isinstance(item, Passage):
        return item
    if isinstance(item, str):
        return Passage(item)
    if isinstance(item, dict) and "text" in item:
        return Passage(str(item["text"]), str(item.get("title") or ""))
    if isinstance(getattr(item, "text", None), str):
        return Passage(item.text, str(getattr(item, "title", "") or ""))
    raise TypeError(f"a passage must be a str, a dict with 'text', or have a .text, got {type(item).__name__}")


def _render_template(tokenizer, system: str | None, user: str) -> str:
    messages = [{"role": "user", "content": user}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # base models without a template: plain text, same placeholders
    head = f"{system}\n\n" if system is not None else ""
    return f"{head}{user}\nAnswer:"


def build_segments(tokenizer, question: str, passages, system: str | None = DEFAULT_SYSTEM) -> list[Segment]:
    """Lays a RAG prompt out as segments (see the module docstring).

    Args:
        tokenizer: the model's tokenizer (with a chat template, or plain text without one).
        question: the user's question.
        passages: strings, Passages or dicts with text/title; may be empty (closed book).
        system: the system line; None for none.
    """
    passages = [as_passage(p) for p in passages]
    user_pieces = [p.render(i + 1) for i, p in enumerate(passages)] + [f"Question: {question}"]
    first_user = 0 if system is None else 1
    pieces = ([system] if system is not None else []) + user_pieces
    user = "".join(_PLACEHOLDER.format(first_user + i) for i in range(len(user_pieces)))
    rendered = _render_template(tokenizer, None if system is None else _PLACEHOLDER.format(0), user)

    parts = _PLACEHOLDER_RE.split(rendered)  # template, index, template, index, ..., template
    if [int(x) for x in parts[1::2]] != list(range(len(pieces))):
        raise ValueError("the chat template dropped or reordered message content; gsa-rag cannot lay it out")

    # owner of each piece: PREFIX (system line), a passage number, or TAIL (the question);
    # template text goes with the piece before it (the text before the first piece: PREFIX)
    owners = [_PREFIX] * first_user + list(range(len(passages))) + [_TAIL]
    runs: list[tuple[object, list[int]]] = [(_PREFIX, _template_ids(tokenizer, parts[0]))]
    for i, owner in enumerate(owners):
        ids = encode_text(tokenizer, pieces[i]) + _template_ids(tokenizer, parts[2 * i + 2])
        if runs[-1][0] == owner:
            runs[-1][1].extend(ids)
        else:
            runs.append((owner, ids))
    return [
        Segment(tuple(ids), compress=owner != _TAIL, passage_id=owner if isinstance(owner, int) else -1)
        for owner, ids in runs
        if ids
    ]


def _template_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def reuse_segments(prefix: Segment, passages: list[list[int]], tail: Segment, link_ids: list[int]) -> list[Segment]:
    """The KV-reuse (gist memory) layout of a prompt: prefix, then per passage an independent
    segment followed by its link tokens, then the raw tail. See gsa_rag.memory for the rule.

    Args:
        prefix: the template prefix segment (system line, user header); holds the sink.
        passages: each passage's token ids, rendered with `Passage.render(None)`.
        tail: the raw tail (question, assistant header, and an answer when training).
        link_ids: the link token ids put after every passage (may be empty).
    """
    segments = [prefix]
    for p, ids in enumerate(passages):
        segments.append(Segment(tuple(ids), compress=True, passage_id=p, independent=True))
        if link_ids:
            segments.append(Segment(tuple(link_ids), compress=True, passage_id=p, link=True))
    segments.append(tail)
    return segments


def build_reuse_segments(tokenizer, question: str, passages, link_ids: list[int], system: str | None = DEFAULT_SYSTEM) -> list[Segment]:
    """`build_segments` for KV reuse (training `--reuse`, gist memory): passages rendered
    without their number and encoded independently, `link_ids` after each one."""
    prefix, tail = prompt_ends(tokenizer, question, system)
    ids = [encode_text(tokenizer, as_passage(p).render(None)) for p in passages]
    return reuse_segments(prefix, ids, tail, link_ids)


def prompt_ends(tokenizer, question: str, system: str | None = DEFAULT_SYSTEM) -> tuple[Segment, Segment]:
    """(prefix, tail) of the prompt: the segments around the passages."""
    segments = build_segments(tokenizer, question, [], system)
    if len(segments) == 1:  # a template without text before the question
        return Segment((), compress=True), segments[0]
    prefix, tail = segments
    return prefix, tail
