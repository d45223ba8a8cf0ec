"""Gist adapters: a PEFT LoRA adapter (with the trained gist/link token rows) plus the
GistConfig it was trained with and the fingerprint of the base model it belongs to.

Layout of an adapter directory:
    adapter_config.json, adapter_model.safetensors   PEFT's own files
    gsa_adapter.json                                 format version, base model, fingerprint,
                                                     gist config, training arguments, metrics
    README.md                                        the model card (optional)
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from gsa_rag.config import GistConfig
from gsa_rag.errors import AdapterMismatchError, ConfigError

# 2: base_fingerprint may be a "v2-" one, which a gsa-rag that reads only format 1 would take
# for another base model; bumped so that such a version says "upgrade gsa-rag" instead
FORMAT_VERSION = 2
READ_FORMATS = (1, 2)  # format 1 manifests (the bundled adapter) differ only in their fingerprint
MANIFEST = "gsa_adapter.json"
BUNDLED = Path(__file__).parent / "adapters_bundled"


def bundled_default_adapter() -> Path | None:
    """The trained adapter shipped for the default model, if this install carries one."""
    path = BUNDLED / "smollm2-135m-gsa8"
    return path if (path / MANIFEST).is_file() else None


# base_fingerprint's format: "v2-" and 16 hex digits; adapters written before it store a
# format-1 fingerprint (16 hex digits: the first 8 values of every parameter rounded to bf16, which
# a float16 load changes: fp32 -> fp16 -> bf16 rounds some values twice, to the other neighbour)
FINGERPRINT_PREFIX = "v2-"
SIGN_SAMPLES = 256  # leading values of every parameter whose sign bits are hashed
# format-1 fingerprints of known bases -> their format-2 fingerprint, so that adapters saved with
# the old one also load on a float16 copy of their base (where the old one cannot be recomputed)
_LEGACY_BASES = {
    "22c812a7b259b7fc": "v2-8475770298132d2b",  # the default model (SmolLM2-135M-Instruct): the bundled adapter
}


class BaseFingerprint(str):
    """What `base_fingerprint` returns: the fingerprint (a str, what manifests store), which also
    carries the model's format-1 fingerprint (`legacy`) so that `check_base` accepts adapters
    saved before format 2 on their base model."""

    legacy: str | None = None


def base_fingerprint(model) -> str:
    """Which base model an adapter belongs to, the same for float32, bfloat16 and float16 loads
    of the same weights.

    Hashes the config (without load details such as dtype), every parameter's name and shape,
    and the sign bits of the first SIGN_SAMPLES values of every parameter (the first rows: the
    gist rows appended at the end of the embedding are the adapter's business, not the base's).
    A sign bit is the one piece of a value that no rounding between these dtypes changes (a value
    too small for float16 becomes a zero of the same sign), so no value near a rounding boundary
    can flip the hash; any other model (other weights, even a fine-tune of the same base) differs
    in thousands of them. The result also carries the format-1 fingerprint (`.legacy`).
    """
    from gsa_rag.models import _VOLATILE_CONFIG_KEYS

    skip = set(_VOLATILE_CONFIG_KEYS) | {"dtype", "torch_dtype"}
    config = {k: v for k, v in model.config.to_dict().items() if k not in skip}
    config_bytes = json.dumps(config, sort_keys=True, default=str).encode()
    digest, legacy = hashlib.sha256(b"gsa-rag base fingerprint 2;" + config_bytes), hashlib.sha256(config_bytes)
    for name, param in model.named_parameters():
        shape = f"{name}:{tuple(param.shape)};".encode()
        flat = param.detach().reshape(-1)
        digest.update(shape)
        digest.update(bytes(torch.signbit(flat[:SIGN_SAMPLES].float()).cpu().tolist()))
        legacy.update(shape)
        legacy.update(flat[:8].to(torch.bfloat16).float().cpu().numpy().tobytes())
    fingerprint = BaseFingerprint(FINGERPRINT_PREFIX + digest.hexdigest()[:16])
    fingerprint.legacy = legacy.hexdigest()[:16]
    return fingerprint


def same_base(stored: str, fingerprint: str) -> bool:
    """Whether an adapter whose manifest stores `stored` belongs to the model of `fingerprint`
    (`base_fingerprint`'s result; a format-1 manifest matches its `.legacy`)."""
    if stored == fingerprint:
        return True
    if stored == getattr(fingerprint, "legacy", None):
        return True
    return _LEGACY_BASES.get(stored) == fingerprint


def _dir(adapter_dir: str | Path) -> Path:
    """An adapter folder as the user named it, `~` expanded (as model paths are)."""
    return Path(adapter_dir).expanduser()


def read_manifest(adapter_dir: str | Path) -> dict:
    path = _dir(adapter_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a gsa-rag adapter (no {MANIFEST}); train one with `gsa-rag train`")
    manifest = json.loads(path.read_text())
    version = manifest.get("format_version")
    # type check: True == 1 and 2.0 == 2, neither written by any gsa-rag
    if type(version) is not int or version not in READ_FORMATS:
        raise AdapterMismatchError(f"{path}: adapter format {version!r} is not one this gsa-rag reads "
                                   f"({', '.join(map(str, READ_FORMATS))}); upgrade gsa-rag or retrain the adapter")
    return manifest


def adapter_config(adapter_dir: str | Path) -> GistConfig:
    return GistConfig.from_dict(read_manifest(adapter_dir)["gist_config"])


def warn_if_untrained_layout(manifest_dir: str | Path, config: GistConfig, stacklevel: int = 3) -> None:
    """Warns (UserWarning) when `config` lays the context out otherwise than the model behind
    `manifest_dir` (an adapter, or a `--full` model folder) was trained with.

    The layout is what gist memory keys its cached KV by (memory.ENCODING_FIELDS: chunk size,
    hierarchy, sink, local window, word-aware cuts, gist tokens): the tokens and masks under which
    the model learnt to pack chunks into gists. The other fields (top_k, k_policy, top_p, ...) only
    change what a question unfolds, the user's to tune. chunk_size 0 is the full-attention
    baseline: no gists, a choice that is never a mistake.
    """
    from gsa_rag.memory import encoding_config

    if not config.uses_gists:
        return
    try:
        trained = adapter_config(manifest_dir)
    except ConfigError:  # written by a newer gsa-rag (fields this one lacks): a given config still runs
        return
    want, given = encoding_config(trained), encoding_config(config)
    fields = [name for name in want if name in given and want[name] != given[name]]
    if not fields:
        return

    def values(c: GistConfig) -> str:
        return ", ".join(f"{name}={getattr(c, name)!r}" for name in fields)

    warnings.warn(
        f"the given GistConfig lays the context out otherwise than {manifest_dir} was trained with: "
        f"{values(config)} where it was trained with {values(trained)}; answers will be worse than with "
        f"the trained layout. To use the trained layout, leave `config` out (on the command line: the options "
        f"that set these fields) or pass dataclasses.replace(config, {values(trained)})",
        UserWarning, stacklevel=stacklevel)  # default: from_pretrained's caller


def trained_manifest_dir(model, adapter) -> Path | None:
    """Where the gist config a model was trained with is written: the adapter's folder, or, with
    no adapter, a model folder that `gsa-rag train --full` wrote (its weights beside a manifest);
    None when neither holds one."""
    if adapter is not None:
        return _dir(adapter)
    if model is not None and (Path(str(model)).expanduser() / MANIFEST).is_file():
        return Path(str(model)).expanduser()
    return None


def write_manifest(adapter_dir: str | Path, *, base_model: str, fingerprint: str, config: GistConfig, **extra) -> None:
    manifest = {"format_version": FORMAT_VERSION, "base_model": base_model, "base_fingerprint": fingerprint,
                "gist_config": config.to_dict(), **extra}
    path = _dir(adapter_dir) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(path)


def check_base(adapter_dir: str | Path, fingerprint: str) -> None:
    """Raises AdapterMismatchError (a ValueError) when the adapter was trained on another base model."""
    manifest = read_manifest(adapter_dir)
    stored = manifest["base_fingerprint"]
    if not same_base(stored, fingerprint):
        old = "" if str(stored).startswith(FINGERPRINT_PREFIX) else (
            " (its fingerprint is of the older format, computed from values rounded to bf16: on a float16 load of "
            "its own base it may differ; load the base in bfloat16 or float32)")
        raise AdapterMismatchError(
            f"adapter {adapter_dir} was trained on base model {manifest['base_model']!r} "
            f"(fingerprint {stored}), not on this one ({fingerprint}); "
            "load it with the base model it was trained on" + old
        )


def apply_adapter(model, adapter_dir: str | Path, fingerprint: str):
    """Loads the adapter onto `model` (gist tokens already added) and merges it for inference.

    Raises:
        AdapterMismatchError (a ValueError): the adapter was trained on another base model.
    """
    adapter_dir = _dir(adapter_dir)
    check_base(adapter_dir, fingerprint)
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading a gist adapter needs PEFT: pip install 'gsa-rag[train]'") from e
    with warnings.catch_warnings():
        # PEFT's own call into a transformers API deprecated in v5: nothing a user of ours can change
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
