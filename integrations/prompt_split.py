"""Where the passages are in a framework's prompt: the split that lets gists compress them.

Frameworks (LlamaIndex, LangChain) hand an LLM one finished prompt: a string, or chat
messages. The retrieved passages are somewhere inside it. `split_prompt` finds them so that
they are compressed with gists while every other word stays raw. The rule, in order:

1. **Memory** (only when a GistMemory is given). Every stored passage whose text occurs
   verbatim, on lines of its own, in the *question message* (the last message holding any) is
   a passage (a passage quoted inside a sentence is left as text); matches
   are taken longest passage first, one occurrence each, never overlapping. Route
   "memory": the model gets the memory's own KV-reuse prompt (`GistMemory.prepare`): the
   memory's system line (its passages were encoded after it), the matched passages in the
   order they appear (cached KV, never re-encoded), then as the question, raw:
   earlier user/assistant turns as `Role: text` lines (whole), then the question message with each
   matched passage cut out (runs of blank lines collapsed). System messages of the prompt
   are replaced by the memory's system line, the only loss; nothing else is dropped. (A
   prompt that is nothing but passages has no question: it falls through to rule 2.)
2. **Template** (LlamaIndex's standard QA templates, `llama_index_patterns`). A
   `ContextPattern` is the fixed text just before a template's context variable and just
   after it (derived from the template objects themselves: text QA, tree summarize, refine,
   their chat variants; only templates whose context comes before every other variable, so
   the question stays raw: the completion refine template, which asks first, is left to rule
   3), e.g. before = "Context information is below.\\n-----...-----\\n",
   after = "\\n-----...-----\\nGiven the context information ...". In each message, the
   earliest `before` followed by an `after` (the first one after it; ties: the longest
   `before`) delimits the context. It is cut at the node separator ("\\n\\n", what LlamaIndex
   joins node texts with): each non-blank piece is a passage, the separators stay as text.
   Route "template".
3. **Raw** (anything else). The whole prompt is plain text: no gists, full attention, exactly
   what the unmodified model sees through its chat template. Correct for any prompt.

For routes 2 and 3 the result is chat messages whose contents are lists of
`gsa_rag.prompt.Part`; `gsa_rag.prompt.build_message_segments` lays them out (text before the
first passage: compressed prefix; between passages: with the passage before; after the last:
the raw tail). The parts of a message always concatenate back to its content exactly.

Example:
    >>> plan = split_prompt("Context information is below.\\n---------------------\\n"
    ...                     "Paris is in France.\\n\\nRome is in Italy.\\n---------------------\\n"
    ...                     "Given the context information and not prior knowledge, answer the query.\\n"
    ...                     "Query: Where is Rome?\\nAnswer: ")
    >>> plan.route, [p.text for p in plan.messages[0]["content"] if p.compress]
    ('template', ['Paris is in France.', 'Rome is in Italy.'])
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from gsa_rag.prompt import Part

NODE_SEPARATOR = "\n\n"  # LlamaIndex joins node texts with it (PromptHelper.repack, context-only synthesis)
ROLES = ("system", "user", "assistant")
_CONTEXT_VARIABLES = ("context_str", "context_msg")
_BLANK_RUNS = re.compile(r"\n\s*\n(\s*\n)+")


@dataclass(frozen=True)
class ContextPattern:
    """The fixed text around a template's context variable.

    Attributes:
        before: text right before the context (from the previous variable or the template start).
        after: text right after it (to the next variable or the template end).
        separator: what the context's passages are joined with.
        name: where the pattern came from (for messages and tests).
    """

    before: str
    after: str
    separator: str = NODE_SEPARATOR
    name: str = ""


@dataclass
class PromptPlan:
    """How a prompt reaches the engine.

    Attributes:
        route: "memory", "template" or "raw" (see the module docstring).
        messages: routes template/raw: chat messages whose contents are lists of Parts.
        question: route memory: the raw question text.
        passage_ids: route memory: the matched passages' ids in prompt order.
    """

    route: str
    messages: list[dict] = field(default_factory=list)
    question: str = ""
    passage_ids: list[str] = field(default_factory=list)

    @property
    def passages(self) -> list[str]:
        """Routes template/raw: the passage texts, in order."""
        return [p.text for m in self.messages for p in m["content"] if p.compress]


def as_messages(prompt: str | Sequence[dict]) -> list[dict]:
    """A prompt string -> one user message; chat messages are checked and copied.

    Raises:
        ValueError: an unknown role, or content that is not a string.
    """
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = []
    for m in prompt:
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if not messages:
        raise ValueError("an empty prompt: give a string or at least one message")
    return messages


def split_prompt(prompt: str | Sequence[dict], memory=None, patterns: Sequence[ContextPattern] | None = None) -> PromptPlan:
    """Splits a prompt into passages and raw text (the rule: the module docstring).

    Args:
        prompt: a completion prompt, or chat messages `[{"role", "content"}, ...]`.
        memory: a GistMemory whose stored passages are matched verbatim; None: skip route 1.
        patterns: context patterns for route 2; None: `llama_index_patterns()`.
    """
    messages = as_messages(prompt)
    if memory is not None and len(memory):
        plan = _memory_plan(messages, memory)
        if plan is not None:
            return plan
    patterns = llama_index_patterns() if patterns is None else tuple(patterns)
    split = [_split_message(m, patterns) for m in messages]
    route = "template" if any(p.compress for m in split for p in m["content"]) else "raw"
    return PromptPlan(route, messages=split)


def _split_message(message: dict, patterns: Sequence[ContextPattern]) -> dict:
    content = message["content"]
    found = _find_context(content, patterns)
    if found is None:
        return {"role": message["role"], "content": [Part(content)]}
    start, end, separator = found
    parts = [Part(content[:start])]
    for k, piece in enumerate(content[start:end].split(separator)):
        if k:
            parts.append(Part(separator))
        parts.append(Part(piece, compress=bool(piece.strip())))
    parts.append(Part(content[end:]))
    return {"role": message["role"], "content": [p for p in parts if p.text]}


def _find_context(content: str, patterns: Sequence[ContextPattern]) -> tuple[int, int, str] | None:
    """(start, end, separator) of the context in `content`, or None."""
    best = None
    for pattern in patterns:
        i = content.find(pattern.before)
        if i < 0 or not pattern.before:
            continue
        start = i + len(pattern.before)
        # the first `after`: a passage that happens to contain it only leaves the rest raw
        end = content.find(pattern.after, start) if pattern.after else len(content)
        if end < 0:
            continue
        key = (i, -len(pattern.before))
        if best is None or key < best[0]:
            best = (key, (start, end, pattern.separator))
    return None if best is None else best[1]


def _memory_plan(messages: list[dict], memory) -> PromptPlan | None:
    texts = {}
    for pid in memory.ids:
        text = memory.passage(pid).text
        if text.strip():
            texts.setdefault(text, pid)  # one id per text (ids are content hashes by default)
    spans: list[list[tuple[int, int, str]]] = []
    for m in messages:
        taken: list[tuple[int, int, str]] = []
        for text in sorted(texts, key=len, reverse=True):
            start = 0
            while (i := m["content"].find(text, start)) >= 0:
                j = i + len(text)
                if _on_own_lines(m["content"], i, j) and not any(i < b and a < j for a, b, _ in taken):
                    taken.append((i, j, texts[text]))
                    break  # one occurrence per passage: it is laid out once
                start = i + 1
        spans.append(sorted(taken))
    last = max((k for k, s in enumerate(spans) if s), default=None)
    if last is None:
        return None
    content, pieces, cursor = messages[last]["content"], [], 0
    for i, j, _ in spans[last]:
        pieces.append(content[cursor:i])
        cursor = j
    pieces.append(content[cursor:])
    history = [f"{m['role'].capitalize()}: {m['content']}" for m in messages[:last] if m["role"] != "system"]
    later = [m["content"] for m in messages[last + 1 :]]
    question = "\n\n".join([*history, _BLANK_RUNS.sub("\n\n", "".join(pieces)).strip(), *later]).strip()
    if not question:  # nothing but passages: no question to ask over them, so not this route
        return None
    return PromptPlan("memory", question=question, passage_ids=[pid for _, _, pid in spans[last]])


def _on_own_lines(content: str, i: int, j: int) -> bool:
    """Whether content[i:j] stands on its own lines (only spaces or tabs beside it up to a line
    break or the message's ends): how frameworks write context blocks, and what keeps a short
    stored passage ("Paris") from being cut out of the question that mentions it."""
    before = content[:i].rstrip(" \t")
    after = content[j:].lstrip(" \t")
    return (not before or before.endswith("\n")) and (not after or after.startswith("\n"))


@lru_cache(maxsize=1)
def llama_index_patterns() -> tuple[ContextPattern, ...]:
    """The context patterns of LlamaIndex's standard QA templates, read from the installed
    llama-index-core (text QA, tree summarize, refine and their chat variants); () without it."""
    try:
        from llama_index.core.prompts import chat_prompts, default_prompts
    except ImportError:
        return ()
    templates = {
        "text_qa": default_prompts.DEFAULT_TEXT_QA_PROMPT,
        "tree_summarize": default_prompts.DEFAULT_TREE_SUMMARIZE_PROMPT,
        "refine": default_prompts.DEFAULT_REFINE_PROMPT,
        "chat_text_qa": chat_prompts.CHAT_TEXT_QA_PROMPT,
        "chat_tree_summarize": chat_prompts.CHAT_TREE_SUMMARIZE_PROMPT,
        "chat_refine": chat_prompts.CHAT_REFINE_PROMPT,
    }
    patterns = []
    for name, template in templates.items():
        texts = [template.template] if hasattr(template, "template") else [m.content or "" for m in template.message_templates]
        patterns.extend(p for text in texts for p in patterns_from_template(text, name))
    return tuple(dict.fromkeys(patterns))


def patterns_from_template(template: str, name: str = "") -> list[ContextPattern]:
    """ContextPatterns of a str.format template: its context variable, when that is the first
    variable (the question and any other filled-in text come after the context, so they stay
    raw; a template that asks its question first would have it swallowed by the compressed
    prefix, so it yields no pattern and such prompts go raw).

    Example:
        >>> patterns_from_template("Docs:\\n{context_str}\\nQ: {query_str}")
        [ContextPattern(before='Docs:\\n', after='\\nQ: ', separator='\\n\\n', name='')]
        >>> patterns_from_template("Q: {query_str}\\nDocs:\\n{context_str}\\nA:")
        []
    """
    fields = [f for f in string.Formatter().parse(template)]  # (literal, field, spec, conversion)
    variables = [k for k, f in enumerate(fields) if f[1] is not None]
    if not variables or fields[variables[0]][1] not in _CONTEXT_VARIABLES:
        return []
    k = variables[0]
    after = fields[k + 1][0] if k + 1 < len(fields) else ""
    return [ContextPattern(before=fields[k][0], after=after, name=name)]
