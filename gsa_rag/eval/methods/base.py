"""The interface every benchmark method implements, and the spec strings that name them.

A method decides two things for a batch of questions: which passages each question sees, and
how attention treats them (a GistConfig, and optionally its own layout and attention state, or
a cache already holding the passages' KV).
The harness (gsa_rag.eval.harness) does everything else: batching, decoding, timing, metrics.

Adding a method is one file in this package: a dataclass subclass of `Method` with a `name`;
its fields are its options, set from a spec string such as "gsa:chunk=16:policy=adaptive".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from transformers import DynamicCache

from gsa_rag.config import GistConfig
from gsa_rag.generation import StateFactory
from gsa_rag.layout import GistLayout

REGISTRY: dict[str, type[Method]] = {}


@dataclass
class RunContext:
    """What a method may need to prepare itself (retrieval, model shape).

    Attributes:
        data: the set's name or path (for cache file names).
        num_layers: decoder layers of the model.
        retrieval_dir: where retrieval rankings are cached.
        embed_device: device for the retrieval embedder.
        load_corpus: returns the corpus for open-domain retrieval (may raise FileNotFoundError).
        trained: the GistConfig the model was trained with (its adapter's, or a `train --full`
            folder's); gist methods take from it every field their spec does not set. None: an
            untrained model, GistConfig()'s defaults.
    """

    data: str
    num_layers: int
    retrieval_dir: str
    embed_device: str = "cpu"
    load_corpus: object = None
    trained: GistConfig | None = None


@dataclass
class Method:
    """One way of answering a RAG question. Subclasses are dataclasses whose fields are options.

    Class attributes:
        name: the spec name ("gsa", "vector", ...).
        family: groups rows in plots ("gsa", "vector", ...); default the name.
        selects: True when question tokens choose chunks (gold-selection recall applies).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    selects: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
                raise ValueError(f"two methods are called {cls.name!r}")
            REGISTRY[cls.name] = cls

    # --- what subclasses override ---------------------------------------------------------

    @property
    def label(self) -> str:
        """The row label in tables and plots."""
        return self.spec

    def gist_config(self, ctx: RunContext) -> GistConfig:
        """The config the engine runs with (default: no gists, full attention)."""
        return GistConfig(chunk_size=0)

    def setup(self, examples, ctx: RunContext) -> None:
        """Untimed preparation before answering (e.g. retrieval)."""

    def passages(self, example) -> list:
        """The passages this question sees, in prompt order (default: all that were given)."""
        return list(example.passages)

    def extra(self, example) -> dict:
        """Per-question fields for the results JSON (e.g. what was retrieved)."""
        return {}

    def layout(self, engine, questions: list[str], passages: list[list]) -> GistLayout:
        """The token layout of a batch (default: the engine's, gists as its config says)."""
        return engine.layout(questions, passages)

    def state_factory(self, config: GistConfig) -> StateFactory | None:
        """A fresh attention-state factory for one batch (default None: GistState)."""
        return None

    def prepare(self, engine, questions: list[str], passages: list[list]) -> tuple[GistLayout, DynamicCache | None]:
        """The batch's layout and a cache already holding KV of its first columns (e.g. a
        GistCache from gist memory; the prefill then runs only the rest). Default: `layout`,
        no cache."""
        return self.layout(engine, questions, passages), None

    @property
    def batch_limit(self) -> int | None:
        """The most questions one batch may hold (a GistCache holds one); None: no limit."""
        return None

    def finish(self) -> dict:
        """Called once every question is answered: run-level fields for the summary; releases
        what the run held (e.g. a gist memory)."""
        return {}

    def first_selecting_layer(self, config: GistConfig) -> int:
        """The first layer whose question tokens select chunks (for gold-selection recall)."""
        return config.first_selecting_layer

    def compression_ratio(self) -> float | None:
        """Nominal context compression for the EM-vs-compression plot (None: not on it)."""
        return None

    # --- shared ---------------------------------------------------------------------------

    @property
    def spec(self) -> str:
        """The canonical spec string: name, then every option that differs from its default."""
        parts = [self.name]
        for f in _option_fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={value}")
        return ":".join(parts)

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in _option_fields(self)}


TRAINED = -1  # a layout option's default: the value the model was trained with


def over_trained(ctx: RunContext | None, *, sink: int, window: int, **fields) -> GistConfig:
    """A gist method's GistConfig: `fields` (what its options set) and `sink` / `window`
    (num_previous_chunks) unless TRAINED, over the config the model was trained with. Every
    other field (word cuts, gist tokens, first selecting layer, ...) is then the trained one: a
    model is evaluated in the layout it learnt unless the spec asks for another.

    Raises:
        ValueError: a bad value (sink or window below TRAINED; GistConfig's own checks).
    """
    for option, name, value in (("sink", "sink", sink), ("window", "num_previous_chunks", window)):
        if value < TRAINED:
            raise ValueError(f"option {option} must be >= 0, or {TRAINED} (its default) for the trained value; got {value}")
        if value != TRAINED:
            fields[name] = value
    trained = ctx.trained if ctx is not None and ctx.trained is not None else GistConfig()
    return dataclasses.replace(trained, **fields)


def layout_label(sink: int, window: int) -> str:
    """The label's note for layout options a spec sets (", sink 2, window 0"), so its row is told apart."""
    return "".join(f", {name} {value}" for name, value in (("sink", sink), ("window", window)) if value != TRAINED)


def _option_fields(cls_or_obj) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls_or_obj) if f.init]


def parse_spec(spec: str) -> Method:
    """"gsa:chunk=16:k=2" -> GSA(chunk=16, k=2). Values are converted to the option's type.

    Raises:
        ValueError: unknown method or option, or a value of the wrong type.
    """
    _load_all()
    name, *pairs = spec.strip().split(":")
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    fields = {f.name: f for f in _option_fields(cls)}
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            known = ", ".join(fields) or "none"
            raise ValueError(f"bad option {pair!r} in {spec!r}; {name} takes key=value with keys: {known}")
        kind = type(fields[key].default)
        try:
            options[key] = _convert(raw, kind)
        except ValueError as error:
            raise ValueError(f"option {key} of {name} wants a {kind.__name__}, got {raw!r}") from error
    return cls(**options)


def _convert(raw: str, kind: type):
    if kind is bool:
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(raw)
        return raw.lower() in ("1", "true", "yes")
    return kind(raw)


def _load_all() -> None:
    """Imports every module of this package, so each method registers itself."""
    import importlib
    import pkgutil

    import gsa_rag.eval.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def available() -> dict[str, type[Method]]:
    """Every registered method, by name."""
    _load_all()
    return dict(REGISTRY)
