"""Training examples as segments, and the collator that lays them out with gists.

Both stages produce `Segment` lists, so a training batch goes through the same `build_layout`
and the same gsa attention function as inference: nothing is re-implemented for training.

- Stage 1 (CPT): documents are tokenized, joined with EOS, and packed into blocks of
  `block_tokens` raw tokens. The first `block_tokens - tail_tokens` are context (gists inserted,
  forgetting mask); the last `tail_tokens` are a raw tail that recalls by selection, as a
  question does, so stage 1 trains both forgetting and recall. Loss: every next raw token.
- Stage 2 (SFT): a RAG example is rendered with the chat template exactly as at inference
  (prompt.build_segments) and the answer + end-of-turn token is appended to the raw tail.
  Loss: the answer tokens only.
- Stage 2 with KV reuse (`--reuse`): the gist-memory layout, built by the very code GistMemory
  uses (prompt.build_reuse_segments): every passage rendered without its number and encoded as
  an independent segment (it sees itself and the sink only), followed by the link tokens that
  bridge it to later tokens, then the raw tail + answer. Loss: the answer tokens only.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gsa_rag.config import GistConfig
from gsa_rag.layout import GistLayout, Segment, build_layout
from gsa_rag.prompt import build_reuse_segments, build_segments
from gsa_rag.train.selection_loss import gold_chunk_mask

IGNORE = -100


@dataclass
class TrainExample:
    """Segments plus how many tokens at the end of the raw tail carry loss (None: all raw tokens).

    `gold`: the passages (0-based, prompt order: `Segment.passage_id`) marked gold; empty where
    none is known (CPT blocks, files without `is_gold`)."""

    segments: list[Segment]
    loss_tokens: int | None = None
    gold: frozenset[int] = frozenset()


HF_PREFIX = "hf:"


def read_texts(paths: list[str | Path]) -> Iterator[str]:
    """Yields documents from plain-text files (one document per file), JSONL files with `text`,
    or, when online, Hugging Face datasets named `hf:NAME[:CONFIG]:SPLIT` (their `text` column,
    streamed), e.g. `hf:wikitext:wikitext-103-raw-v1:train`."""
    for path in paths:
        if str(path).startswith(HF_PREFIX):
            yield from _hf_texts(str(path))
            continue
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training text {path} not found")
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record.get("text"), str):
                            raise ValueError(f"{path}:{n}: a JSONL training record needs a string 'text' field")
                        yield record["text"]
        else:
            yield path.read_text(encoding="utf-8")


def _hf_texts(spec: str) -> Iterator[str]:
    parts = spec[len(HF_PREFIX) :].split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"{spec!r}: write a Hugging Face dataset as hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError(f"{spec}: reading Hugging Face datasets needs `pip install datasets` (and a network)") from e
    for n, record in enumerate(load_dataset(name, config, split=split, streaming=True)):
        if not isinstance(record.get("text"), str):
            raise ValueError(f"{spec}: record {n} has no string 'text' column; CPT reads the 'text' column")
        if record["text"].strip():
            yield record["text"]


def pack_documents(texts, tokenizer, block_tokens: int, tail_tokens: int, max_blocks: int | None = None) -> list[TrainExample]:
    """Packs documents into CPT blocks (see the module docstring)."""
    if not 0 <= tail_tokens < block_tokens:
        raise ValueError(f"tail_tokens must be in [0, block_tokens), got {tail_tokens} of {block_tokens}")
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    blocks: list[TrainExample] = []
    for text in texts:
        buffer += tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [eos]
        while len(buffer) >= block_tokens:
            block, buffer = buffer[:block_tokens], buffer[block_tokens:]
            cut = block_tokens - tail_tokens
            blocks.append(TrainExample([Segment(tuple(block[:cut]), True), Segment(tuple(block[cut:]), False)]))
            if max_blocks is not None and len(blocks) >= max_blocks:
                return blocks
    return blocks


def rag_example(tokenizer, question: str, passages, answer: str, system=None,
                link_ids: list[int] | None = None) -> TrainExample:
    """One SFT example: the inference prompt with `answer` + end-of-turn appended to the tail.

    Args:
        link_ids: None for the ordinary prompt (`prompt.build_segments`, as `engine.generate`
            lays it out); a list (possibly empty) for the KV-reuse prompt with these link
            tokens after every passage (`prompt.build_reuse_segments`, as `GistMemory` lays it out).
    """
    kwargs = {} if system is None else {"system": system}
    if link_ids is None:
        segments = build_segments(tokenizer, question, passages, **kwargs)
    else:
        segments = build_reuse_segments(tokenizer, question, passages, list(link_ids), **kwargs)
    answer_ids = tokenizer(answer, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    answer_ids.append(tokenizer.eos_token_id)
    tail = segments[-1]
    segments[-1] = Segment(tail.ids + tuple(answer_ids), compress=False)
    gold = frozenset(i for i, p in enumerate(passages) if _is_gold(p))
    return TrainExample(segments, loss_tokens=len(answer_ids), gold=gold)


def _is_gold(passage) -> bool:
    """A passage's `is_gold` (attribute or dict key); False where absent or null."""
    value = passage.get("is_gold") if isinstance(passage, dict) else getattr(passage, "is_gold", None)
    return value is True


def rag_examples(paths, tokenizer, max_prompt_tokens: int | None = None, seed: int = 0,
                 link_ids: list[int] | None = None) -> list[TrainExample]:
    """SFT examples from canonical RAG JSONL files (the first answer is the target); `link_ids`:
    see `rag_example` (not None: the KV-reuse layout).

    Examples whose prompt exceeds `max_prompt_tokens` lose passages from the end until it fits
    (gold passages last), so no example is silently truncated mid-passage.
    """
    from gsa_rag.eval.data import load_examples

    rng = random.Random(seed)
    out = []
    for path in paths:
        # a set name means its train split (load_examples' default, dev, is what gets evaluated)
        for ex in load_examples(path, split="train"):
            if not ex.answers:
                raise ValueError(f"{path}: example {ex.id!r} has no answers; SFT trains on the first answer")
            passages = list(ex.passages)
            example = rag_example(tokenizer, ex.question, passages, ex.answers[0], link_ids=link_ids)
            while max_prompt_tokens and _length(example) > max_prompt_tokens and passages:
                drop = next((i for i in reversed(range(len(passages))) if not passages[i].is_gold), len(passages) - 1)
                passages.pop(drop)
                example = rag_example(tokenizer, ex.question, passages, ex.answers[0], link_ids=link_ids)
            out.append(example)
    rng.shuffle(out)
    return out


def _length(example: TrainExample) -> int:
    return sum(len(s.ids) for s in example.segments)


@dataclass
class Batch:
    layout: GistLayout
    labels: torch.Tensor  # long [B, T], IGNORE where no loss
    gold_chunks: torch.Tensor | None = None  # bool [B, C], chunks holding a gold passage's raw tokens
    prompt_end: torch.Tensor | None = None  # long [B], column of each row's last prompt token

    def to(self, device) -> Batch:
        def move(t):
            return None if t is None else t.to(device)

        return Batch(self.layout.to(device), self.labels.to(device), move(self.gold_chunks), move(self.prompt_end))


def collate(examples: list[TrainExample], config: GistConfig, tokenizer) -> Batch:
    """Lays out a batch with gists and builds next-token labels aligned with input_ids.

    Labels follow transformers' convention (the model shifts them): a label at column j is the
    target of column j - 1. Gists are never targets (the layout inserts them); padding and the
    prompt of SFT examples carry no loss. `gold_chunks` maps each example's gold passages to the
    chunks holding their raw tokens (layout passage_id / chunk_id); `prompt_end` is the column of
    its last prompt token (the last column where the whole tail is prompt).
    """
    layout = build_layout([ex.segments for ex in examples], config, tokenizer)
    labels = layout.input_ids.masked_fill(layout.is_gist | ~layout.valid, IGNORE)
    for b, ex in enumerate(examples):
        if ex.loss_tokens is not None:
            labels[b, : layout.seq_len - ex.loss_tokens] = IGNORE
    labels[:, 0] = IGNORE
    gold_chunks = gold_chunk_mask(layout, [ex.gold for ex in examples])
    prompt_end = torch.tensor([layout.seq_len - 1 - (ex.loss_tokens or 0) for ex in examples], dtype=torch.long)
    return Batch(layout, labels, gold_chunks, prompt_end)
