"""User text reaches the chat template as placeholders, so the layout strips it as the template
strips each message's content: exactly the characters the template strips, at each end."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from gsa_rag.prompt import (
    Part,
    build_message_segments,
    build_segments,
    prompt_ends,
    question_tail,
)


def _template(content: str) -> str:
    # SmolLM2's tokens, with `content` the expression each message's content is written with
    return ("{% for m in messages %}<|im_start|>{{ m.role }}\n" + content + "<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


TRIMMING = _template("{{ m.content | trim }}")  # Llama-3
RSTRIP_NEWLINES = _template("{{ m.content.rstrip('\\n') }}")
# Qwen3's assistant turns
LSTRIP_NEWLINES = _template("{% if m.role == 'assistant' %}{{ m.content.lstrip('\\n') }}{% else %}{{ m.content }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)


def _with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def _hf_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _hf_text(tok, messages) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _ids(segments) -> list[int]:
    return [i for s in segments for i in s.ids]


def test_a_dict_of_chat_templates_lays_out_as_its_default_one(tokenizer):
    """transformers lets a tokenizer hold named templates and renders the "default" one."""
    named = _with_template(tokenizer, {"default": TRIMMING, "tool_use": RSTRIP_NEWLINES})
    plain = _with_template(tokenizer, TRIMMING)
    system, question = " Be brief.\n", "Where is Paris?  "
    assert build_segments(named, question, ["Paris is in France."], system) == build_segments(plain, question, ["Paris is in France."], system)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": [Part(" Context: "), Part("Paris.", True), Part(" Q? \n")]}]
    assert build_message_segments(named, messages) == build_message_segments(plain, messages)
    for line in (system, None):
        empty_tail = prompt_ends(named, "", line)[1]
        assert question_tail(named, empty_tail, question, line) == prompt_ends(plain, question, line)[1]
    whole = [{"role": "user", "content": "  Name a colour.\n"}]
    assert _ids(build_message_segments(named, whole)) == _hf_ids(named, whole)


def test_a_template_stripping_only_newlines_keeps_spaces_and_tabs(tokenizer):
    tok = _with_template(tokenizer, RSTRIP_NEWLINES)
    messages = [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "Name a colour. \t\n\n"},
                {"role": "assistant", "content": "Red.\n"}, {"role": "user", "content": "Another?  "}]
    (segment,) = build_message_segments(tok, messages)
    assert list(segment.ids) == _hf_ids(tok, messages)
    assert "Name a colour. \t<|im_end|>" in tok.decode(segment.ids)
    # through parts: newline-only parts go, the spaces before them stay
    parts = [Part("Name a colour.  "), Part("\n"), Part("\n\n")]
    (segment,) = build_message_segments(tok, [{"role": "user", "content": parts}])
    assert list(segment.ids) == _hf_ids(tok, [{"role": "user", "content": "Name a colour.  \n\n\n"}])
    question = "Where is Paris? \n"
    segments = build_segments(tok, question, [], None)
    assert _ids(segments) == _hf_ids(tok, [{"role": "user", "content": f"Question: {question}"}])


def test_a_template_stripping_leading_newlines_of_one_role_strips_only_those(tokenizer):
    tok = _with_template(tokenizer, LSTRIP_NEWLINES)
    messages = [{"role": "user", "content": "\nName a colour.\n"}, {"role": "assistant", "content": "\n\nRed.\n"},
                {"role": "user", "content": "\nAnother?"}]
    (segment,) = build_message_segments(tok, messages)
    assert list(segment.ids) == _hf_ids(tok, messages)
    # leading spaces after the newlines stay (text compared: the template's "\n" and the kept
    # spaces tokenize apart here, together in HF's rendering)
    messages[1]["content"] = "\n\n  Red."
    (segment,) = build_message_segments(tok, messages)
    assert tok.decode(segment.ids) == _hf_text(tok, messages)
