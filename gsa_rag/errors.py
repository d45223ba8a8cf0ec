"""Every error gsa-rag raises on purpose, as one hierarchy; each message names the fix.

    GsaRagError                         catch this to catch them all
    ├── InputError (ValueError)         bad user input: empty question, empty passage, bad k, ...
    │   ├── InputTypeError (TypeError)  input of the wrong type: bytes instead of str, a number as passage
    │   └── ContextTooLongError         the prompt does not fit the model's window (see GistConfig.overflow)
    ├── ConfigError (ValueError)        an invalid GistConfig field, or an engine assembled by hand wrongly
    ├── UnsupportedModelError (ValueError)  a model GSA cannot run on: no RoPE, sliding-window, RoPE types
    │                                       whose rotations do not compose (gist memory)
    ├── AdapterMismatchError (ValueError)   a gist adapter for another base model or adapter format
    └── MemoryFormatError (ValueError)      a saved gist memory that is foreign, newer, corrupt or tampered

The builtin bases (ValueError, TypeError) are kept so code written before this module, which
catches those, keeps working. The table of inputs tried and what the user sees is in
tests/test_reliability.py (each case is a test).
"""

from __future__ import annotations


class GsaRagError(Exception):
    """Base of every error gsa-rag raises deliberately."""


class InputError(GsaRagError, ValueError):
    """A question, passage or call argument that cannot be answered as given."""


class InputTypeError(InputError, TypeError):
    """An input of the wrong type (e.g. bytes where text is expected)."""


class ContextTooLongError(InputError):
    """The laid-out prompt plus the answer budget exceeds the model's context window."""


class ConfigError(GsaRagError, ValueError):
    """An invalid setting (GistConfig field, sampling parameter), or engine parts that do not fit."""


class UnsupportedModelError(GsaRagError, ValueError):
    """A model architecture GSA cannot run on correctly."""


class AdapterMismatchError(GsaRagError, ValueError):
    """A gist adapter that does not belong to the loaded base model (or this gsa-rag)."""


class MemoryFormatError(GsaRagError, ValueError):
    """A saved memory that cannot be loaded: foreign model or config, corrupt or unknown format."""


__all__ = [
    "AdapterMismatchError",
    "ConfigError",
    "ContextTooLongError",
    "GsaRagError",
    "InputError",
    "InputTypeError",
    "MemoryFormatError",
    "UnsupportedModelError",
]
