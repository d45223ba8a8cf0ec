"""RAG prompt -> segments, through the model's chat template.

The template is rendered with placeholders where user text goes (system line, each passage,
the question). The rendered string is split at the placeholders: template pieces are
tokenized normally (they hold the template's special tokens), user pieces with special-token
parsing off, so no passage or question can forge a special token. A template that trims a
message's content (Llama-3's `| trim`, Qwen3's `lstrip('\\n')`) cannot strip a placeholder, so the
text is stripped here as the template would have (`_template_trims`).

Segments: everything up to the end of the last passage is context (compressed); the
question and the assistant header are the raw tail. Each passage is its own segment, so it
ends with its own closing gist.

`build_message_segments` is the general form (chat messages whose contents are ordered
`Part`s, a part marked as a passage or not); `build_segments` is that form for a question
over passages. Framework integrations split a finished prompt into parts
(gsa_rag.integrations.prompt_split) and hand the engine a `SegmentPrompt`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from gsa_rag.errors import InputError, InputTypeError
from gsa_rag.layout import TOKENIZER_LOCK, Segment, encode_text

DEFAULT_SYSTEM = "Answer the question using the documents. Reply with a short answer only."
# the system line a question over gist memory gets when none is given: the memory's own (the line
# its passages were encoded under, so their cached KV is reused), else DEFAULT_SYSTEM
OWN_SYSTEM = type("OwnSystem", (), {"__repr__": lambda self: "OWN_SYSTEM"})()
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: no template touches them
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
_PREFIX, _TAIL = "prefix", "tail"
MESSAGE_ROLES = ("system", "user", "assistant")


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
    from gsa_rag.validation import check_text

    if isinstance(item, Passage):
        return item
    if isinstance(item, (str, bytes, bytearray, memoryview)):  # bytes: refused, with the decode to use
        return Passage(check_text(item, "a passage"))
    if isinstance(item, dict) and "text" in item:
        return Passage(_field_text(item["text"], "a passage's text"), _field_text(item.get("title") or "", "a passage's title"))
    if isinstance(getattr(item, "text", None), str):
        return Passage(check_text(item.text, "a passage's text"), _field_text(getattr(item, "title", "") or "", "a passage's title"))
    raise InputTypeError(f"a passage must be a str, a dict with 'text', or have a .text, got {type(item).__name__}")


def _field_text(value, what: str) -> str:
    # str() of bytes would be the text "b'...'": refuse bytes, keep str() for numbers and the like
    from gsa_rag.validation import check_text

    return check_text(value if isinstance(value, (str, bytes, bytearray, memoryview)) else str(value), what)


def _render_messages(tokenizer, messages: list[dict]) -> str:
    """Renders chat messages through the model's chat template, ready for the answer."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # base models without a template: plain text, same placeholders; led by BOS where the tokenizer
    # puts one before a text (Llama / Mistral base models: the model was trained with it)
    return _bos_text(tokenizer) + "\n\n".join(m["content"] for m in messages) + "\nAnswer:"


def _bos_text(tokenizer) -> str:
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    with TOKENIZER_LOCK:
        adds = tokenizer("x")["input_ids"][:1] == [bos_id]
    return bos if adds else ""


def _render_template(tokenizer, system: str | None, user: str) -> str:
    messages = [{"role": "user", "content": user}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return _render_messages(tokenizer, messages)


# each probed on its own, as a run the template cannot have written next to the content itself
# (a newline after a role header): one that is gone, or cut short, the template strips
_PROBE_CHARACTERS, _PROBE_RUN = " \n\t", 3


def _chat_template(tokenizer) -> str | None:
    """The template string the tokenizer renders with; None without one. A dict of named
    templates renders its "default" one (transformers' rule), so that string keys the caches."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.get_chat_template()


def _template_trims(tokenizer, roles: tuple[str, ...]) -> tuple[tuple[str | None, str | None], ...]:
    """Per message of these roles: the characters the chat template strips from the start and
    from the end of its content, as `str.lstrip`/`str.rstrip` take them: "" for none, None for
    all whitespace (Llama-3's `content | trim`), else just those (Qwen3's `lstrip('\\n')`).

    User text goes through the template as a placeholder, so such a filter never touches it;
    the caller strips the text itself, as the template would have.
    """
    template = _chat_template(tokenizer)
    if template is None:
        return (("", ""),) * len(roles)
    return _probe_trims(tokenizer, template, roles)


@lru_cache(maxsize=64)
def _probe_trims(tokenizer, template: str, roles: tuple[str, ...]) -> tuple[tuple[str | None, str | None], ...]:
    leads, trails = [set() for _ in roles], [set() for _ in roles]
    for char in _PROBE_CHARACTERS:  # one render per character: strips stop at the first one kept
        run = char * _PROBE_RUN
        probe = [{"role": role, "content": run + _PLACEHOLDER.format(i) + run} for i, role in enumerate(roles)]
        rendered = _render_messages(tokenizer, probe)
        for i in range(len(roles)):
            if run + _PLACEHOLDER.format(i) not in rendered:
                leads[i].add(char)
            if _PLACEHOLDER.format(i) + run not in rendered:
                trails[i].add(char)
    return tuple((_strip_chars(lead), _strip_chars(trail)) for lead, trail in zip(leads, trails, strict=True))


def _strip_chars(stripped: set[str]) -> str | None:
    # every probed kind stripped: taken for `str.strip()` (Jinja's trim), which strips all whitespace
    if stripped == set(_PROBE_CHARACTERS):
        return None
    return "".join(sorted(stripped))


def _strip_like_template(texts: list[str], lead: str | None, trail: str | None) -> list[str]:
    """One message's content pieces, in order, with the characters a stripping template would
    strip from the whole content removed (through pieces that are only such characters);
    `lead`/`trail` as `_template_trims` gives them."""
    texts = list(texts)
    if lead != "":
        for i in range(len(texts)):
            texts[i] = texts[i].lstrip(lead)
            if texts[i]:
                break
    if trail != "":
        for i in reversed(range(len(texts))):
            texts[i] = texts[i].rstrip(trail)
            if texts[i]:
                break
    return texts


def _prompt_roles(system: str | None) -> tuple[str, ...]:
    return ("user",) if system is None else ("system", "user")


def _question_piece(question: str) -> str:
    return f"Question: {question}"


def build_segments(tokenizer, question: str, passages, system: str | None = DEFAULT_SYSTEM) -> list[Segment]:
    """Lays a RAG prompt out as segments (see the module docstring).

    Args:
        tokenizer: the model's tokenizer (with a chat template, or plain text without one).
        question: the user's question.
        passages: strings, Passages or dicts with text/title; may be empty (closed book).
        system: the system line; None for none.
    """
    passages = [as_passage(p) for p in passages]
    user_pieces = [p.render(i + 1) for i, p in enumerate(passages)] + [_question_piece(question)]
    first_user = 0 if system is None else 1
    trims = _template_trims(tokenizer, _prompt_roles(system))
    user_pieces = _strip_like_template(user_pieces, *trims[-1])
    pieces = ([] if system is None else _strip_like_template([system], *trims[0])) + user_pieces
    user = "".join(_PLACEHOLDER.format(first_user + i) for i in range(len(user_pieces)))
    rendered = _render_template(tokenizer, None if system is None else _PLACEHOLDER.format(0), user)
    # owner of each piece: PREFIX (system line), a passage number, or TAIL (the question)
    owners = [_PREFIX] * first_user + list(range(len(passages))) + [_TAIL]
    return _segments_from_rendered(tokenizer, rendered, pieces, owners, head=_PREFIX)


@dataclass(frozen=True)
class Part:
    """A piece of a chat message's content (see `build_message_segments`).

    Attributes:
        text: user text (tokenized with special-token parsing off).
        compress: True for a passage (context, its own gist chunks and closing gist).
    """

    text: str
    compress: bool = False


@dataclass(frozen=True)
class SegmentPrompt:
    """A prompt already laid out as segments; `GistEngine.generate`/`stream` take it in place
    of a question (with no passages).

    Attributes:
        segments: from `build_message_segments` (or `build_segments`).
    """

    segments: tuple[Segment, ...]


def build_message_segments(tokenizer, messages) -> list[Segment]:
    """Lays out chat messages whose contents are ordered lists of parts, through the chat template.

    The general form of `build_segments`: the same placeholder rendering, so no part can forge
    a special token. Every `compress=True` part is a passage: its own compressed segment (own
    chunks, own closing gist). A plain part (and the template text after it) belongs to
      * the compressed prefix when it comes before the first passage (system line, history,
        the template's header before the context),
      * the passage before it when it sits between two passages (separators),
      * the raw tail (full attention, selects chunks) when it comes after the last passage.
    Template text before the first part goes with the prefix. With no passage at all the whole
    prompt is one raw segment: no gists, exactly the unmodified model over its chat template.

    Args:
        tokenizer: the model's tokenizer (with a chat template, or plain text without one).
        messages: `{"role": ..., "content": str | Sequence[Part | (text, compress)]}` in
            order; a str content is one plain part. Assistant turns (history) are allowed.

    Returns:
        Segments: compressed ones (prefix, passages) first, then the raw tail.

    Example:
        >>> build_message_segments(tok, [{"role": "user", "content": [
        ...     Part("Context:\n"), Part("Paris is in France.", True), Part("\nQ: Where is Paris?")]}])
    """
    parts: list[Part] = []
    texts: list[str] = []
    rendered_messages = []
    roles = tuple(message.get("role") for message in messages)
    for role in roles:
        if role not in MESSAGE_ROLES:
            # roles are rendered as template text, where special-token strings are live
            raise InputError(f"message role must be one of {MESSAGE_ROLES}, got {role!r}")
    for message, (lead, trail) in zip(messages, _template_trims(tokenizer, roles), strict=True):
        content = message["content"]
        items = [Part(content)] if isinstance(content, str) else [p if isinstance(p, Part) else Part(*p) for p in content]
        first = len(parts)
        parts.extend(items)
        texts.extend(_strip_like_template([p.text for p in items], lead, trail))
        placeholders = "".join(_PLACEHOLDER.format(first + i) for i in range(len(items)))
        rendered_messages.append({"role": message["role"], "content": placeholders})
    passages = [i for i, p in enumerate(parts) if p.compress]
    owners: list[object] = []
    for i, part in enumerate(parts):
        if part.compress:
            owners.append(passages.index(i))
        elif not passages or i > passages[-1]:
            owners.append(_TAIL)
        elif i < passages[0]:
            owners.append(_PREFIX)
        else:
            owners.append(owners[-1])  # a separator between passages joins the one before it
    rendered = _render_messages(tokenizer, rendered_messages)
    return _segments_from_rendered(tokenizer, rendered, texts, owners, head=_PREFIX if passages else _TAIL)


def _segments_from_rendered(tokenizer, rendered: str, pieces: list[str], owners: list, head) -> list[Segment]:
    """Splits a template rendered with placeholders into segments.

    Template text goes with the piece before it (the text before the first piece: `head`);
    consecutive runs of one owner merge. Owners: PREFIX (compressed, no passage), a passage
    number (compressed, its own closing gist), TAIL (raw).
    """
    parts = _PLACEHOLDER_RE.split(rendered)  # template, index, template, index, ..., template
    if [int(x) for x in parts[1::2]] != list(range(len(pieces))):
        raise ValueError("the chat template dropped or reordered message content; gsa-rag cannot lay it out")
    runs: list[tuple[object, list[int]]] = [(head, _template_ids(tokenizer, parts[0]))]
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
    if not text:
        return []
    with TOKENIZER_LOCK:  # see layout.TOKENIZER_LOCK: never interleaved with user-text tokenization
        return tokenizer(text, add_special_tokens=False)["input_ids"]


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


def _tail_question_piece(question: str, trims: tuple[str | None, str | None]) -> str:
    """The question piece as `build_segments` tokenizes it: the user message's only piece without
    passages, stripped with that message's `trims` (a template may strip only its first message)."""
    return _strip_like_template([_question_piece(question)], *trims)[0]


@lru_cache(maxsize=8)
def _encoded_length(tokenizer, piece: str) -> int:
    return len(encode_text(tokenizer, piece))


def question_tail(tokenizer, empty_tail: Segment, question: str, system: str | None) -> Segment:
    """`prompt_ends(tokenizer, question, system)[1]` from `empty_tail`, the tail of the empty
    question under the same system line. A tail is the question piece's tokens, then the
    template's text after it, which does not depend on the question: so only the question is
    tokenized, and the template is not rendered again (gist memory asks this per question)."""
    trims = _template_trims(tokenizer, _prompt_roles(system))[-1]  # the user message's, under this system line
    head = _encoded_length(tokenizer, _tail_question_piece("", trims))
    return Segment(tuple(encode_text(tokenizer, _tail_question_piece(question, trims))) + empty_tail.ids[head:],
                   compress=False, passage_id=empty_tail.passage_id)
