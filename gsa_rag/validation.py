"""Checks on what users pass in, done once at the public entry points (engine, memory).

Decisions (each is a test in tests/test_reliability.py):

* A question must be non-empty text (not only whitespace).
* `passages=None` and `passages=[]` both mean closed book: a retriever that found nothing is
  normal, and the model then answers from what it knows. An empty or whitespace-only passage
  *inside* a list is refused (it would cost a gist and carry nothing; it is usually a bug
  upstream), with its index in the message.
* Text must be `str`. Bytes are refused, whatever their encoding, with the decode call to use;
  a `str` holding lone surrogates (bytes decoded with errors="surrogateescape") is refused too,
  since no tokenizer can encode it.
* A prompt longer than the model's window (`max_position_embeddings`), counted as raw tokens
  (gists share positions, so they cost none) plus `max_new_tokens`, is refused with
  `ContextTooLongError` unless `GistConfig(overflow="drop_passages")`, which drops the last
  passages (retrievers rank best first) until the prompt fits. A passage that cannot fit the
  window on its own is refused by GistMemory.add.
* `stop`: one str is one stop string (not one per character, as iterating it would give); a
  list must hold only str.
* A prompt given whole as a SegmentPrompt (the framework integrations) cannot drop passages:
  over the window it is refused with ContextTooLongError, whatever `overflow` says.
* Sampling (checked by generation.SamplingParams): max_new_tokens an int >= 1; temperature a
  finite number >= 0 (0 is greedy; every value > 0 samples, however tiny or huge); top_p a number
  in (0, 1]; seed None or an int in [-2**63, 2**64 - 1] (what torch's generator takes), checked
  even when greedy ignores it. bool is refused for each (True is no temperature); a str is not
  parsed as a number.
* `GistEngine.layout` checks passage lists as `generate` does (None is closed book there too).
* k: GistConfig refuses top_k < 1; top_k above the number of chunks selects every chunk
  (selection.choose_chunks clamps). `GistMemory.search(k=...)` refuses k < 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gsa_rag.errors import ContextTooLongError, InputError, InputTypeError

_BINARY = (bytes, bytearray, memoryview)


def check_text(value, what: str) -> str:
    """Returns `value` if it is text a tokenizer can take; raises InputTypeError/InputError.

    Args:
        value: the candidate text.
        what: how the message names it ("the question", "passage 2").
    """
    if isinstance(value, _BINARY):
        raise InputTypeError(
            f"{what} is bytes, not text: decode it first with data.decode('utf-8'), or "
            "data.decode('utf-8', errors='replace') if it may not be valid UTF-8"
        )
    if not isinstance(value, str):
        raise InputTypeError(f"{what} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(
            f"{what} holds a character that is not valid Unicode (a lone surrogate at index {error.start}, as "
            "bytes decoded with errors='surrogateescape' leave): decode the bytes with errors='replace' instead"
        ) from None
    return value


def check_question(question, what: str = "the question") -> str:
    check_text(question, what)
    if not question.strip():
        raise InputError(f"{what} is empty (or only whitespace): pass the question to answer")
    return question


def check_stop(stop) -> tuple[str, ...]:
    """Stop strings as a tuple: None -> (), one str -> (str,) (not its characters), else each
    item must be a str."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, _BINARY) or not isinstance(stop, Iterable):
        raise InputTypeError(f"stop must be a str or a list of str, got {type(stop).__name__}")
    stop = tuple(stop)
    bad = [s for s in stop if not isinstance(s, str)]
    if bad:
        raise InputTypeError(f"stop strings must be str, got {type(bad[0]).__name__} ({bad[0]!r})")
    return stop


def check_passage_list(passages, what: str = "passages") -> list:
    """A list of passages (None: closed book, empty list); the items are checked by `check_passage`."""
    if passages is None:
        return []
    if isinstance(passages, (str, dict, *_BINARY)):
        raise InputTypeError(f"{what} must be a list of passages, got one {type(passages).__name__}: wrap it, [text]")
    passages = list(passages)
    for i, item in enumerate(passages):
        check_passage(item, f"passage {i}")
    return passages


def check_passage(item, what: str) -> None:
    """Refuses a passage whose text is not text, or is empty; titles must be text too."""
    if isinstance(item, str) and not item.strip():
        raise InputError(f"{what} is empty (or only whitespace): drop it (passages=None or [] answers closed book)")
    from gsa_rag.prompt import as_passage  # after the check: it imports torch (the CLI's refusal comes first)

    passage = as_passage(item)  # refuses wrong types and bytes with the passage's own message
    if not passage.text.strip():
        raise InputError(f"{what} has no text (empty or only whitespace): drop it, or give it text")


def context_window(model) -> int | None:
    """The model's trained context length in positions, or None when its config does not say."""
    # imported here: the CLI imports this module before torch
    from gsa_rag.models import text_config

    config = text_config(model.config)
    window = getattr(config, "max_position_embeddings", None)
    if not window:
        return None
    # YaRN and dynamic NTK stretch the trained positions by their factor: Qwen documents 128K as
    # max_position_embeddings 32K with YaRN factor 4 over an original 32K
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("yarn", "dynamic") and rope.get("factor"):
        original = rope.get("original_max_position_embeddings") or window
        window = max(window, int(rope["factor"] * original))
    return int(window)


def prompt_positions(layout) -> list[int]:
    """RoPE positions each row of a layout uses: its raw tokens (gists reuse their neighbour's)."""
    return (layout.valid & ~layout.is_gist).sum(-1).tolist()


def passage_tokens(layout, row: int) -> list[int]:
    """Raw tokens (positions) of each passage of one row, by passage id (links included)."""
    import torch  # here: the CLI checks a question with this module before torch loads (seconds)

    ids = layout.passage_id[row][layout.valid[row] & ~layout.is_gist[row]]
    n = int(ids.max()) + 1 if ids.numel() else 0
    return torch.bincount(ids[ids >= 0], minlength=n).tolist() if n else []


def overflow(layout, window: int | None, max_new_tokens: int) -> list[int]:
    """Per row, how many positions the prompt plus the answer budget exceed the window (0: fits)."""
    if window is None:
        return [0] * layout.batch_size
    return [max(0, n + max_new_tokens - window) for n in prompt_positions(layout)]


def passages_to_keep(layout, row: int, excess: int) -> int | None:
    """How many leading passages of `row` to keep so that `excess` positions are freed by
    dropping the rest; None when dropping every passage is still not enough."""
    sizes = passage_tokens(layout, row)
    freed = 0
    for keep in range(len(sizes) - 1, -1, -1):
        freed += sizes[keep]
        if freed >= excess:
            return keep
    return None


def too_long(positions: int, max_new_tokens: int, window: int, *, without_passages: bool = False,
             prebuilt: bool = False) -> ContextTooLongError:
    """The error for a prompt over the window. `prebuilt`: the prompt came as a SegmentPrompt (a
    framework prompt already split into parts), whose passages the engine cannot drop."""
    fix = ("shorten the question or the system line, or lower max_new_tokens" if without_passages else
           "pass fewer or shorter passages (e.g. a lower similarity_top_k), or lower max_new_tokens" if prebuilt else
           "pass fewer or shorter passages, lower max_new_tokens, or set GistConfig(overflow='drop_passages') "
           "to drop the last passages until it fits")
    what = ("even without passages, the prompt" if without_passages else
            "the prompt (given whole, so overflow='drop_passages' cannot drop its passages)" if prebuilt else "the prompt")
    return ContextTooLongError(
        f"{what} needs {positions + max_new_tokens} positions ({positions} prompt tokens + max_new_tokens="
        f"{max_new_tokens}) but the model's window is {window}: {fix}"
    )


def truncate_lists(passage_lists: Sequence[list], keep: Sequence[int | None]) -> list[list]:
    return [list(p) if k is None else list(p)[:k] for p, k in zip(passage_lists, keep)]
