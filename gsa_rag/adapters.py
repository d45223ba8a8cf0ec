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
from pathlib import Path

import torch

from gsa_rag.config import GistConfig
from gsa_rag.errors import AdapterMismatchError

FORMAT_VERSION = 1
MANIFEST = "gsa_adapter.json"
BUNDLED = Path(__file__).parent / "adapters_bundled"


def bundled_default_adapter() -> Path | None:
    """The trained adapter shipped for the default model, if this install carries one."""
    path = BUNDLED / "smollm2-135m-gsa8"
    return path if (path / MANIFEST).is_file() else None


def base_fingerprint(model) -> str:
    """Which base model an adapter belongs to, independent of the dtype it was loaded in.

    Hashes the config (without load details such as dtype), every parameter's name and shape,
    and the first values of every parameter rounded to bf16 (the first rows: the gist rows
    appended at the end of the embedding are the adapter's business, not the base's).
    """
    from gsa_rag.models import _VOLATILE_CONFIG_KEYS

    skip = set(_VOLATILE_CONFIG_KEYS) | {"dtype", "torch_dtype"}
    config = {k: v for k, v in model.config.to_dict().items() if k not in skip}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        head = param.detach().reshape(-1)[:8].to(torch.bfloat16).float().cpu()
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


def read_manifest(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a gsa-rag adapter (no {MANIFEST}); train one with `gsa-rag train`")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AdapterMismatchError(f"{path}: adapter format {manifest.get('format_version')} is not {FORMAT_VERSION}; "
                         "upgrade gsa-rag or retrain the adapter")
    return manifest


def adapter_config(adapter_dir: str | Path) -> GistConfig:
    return GistConfig.from_dict(read_manifest(adapter_dir)["gist_config"])


def trained_manifest_dir(model, adapter) -> Path | None:
    """Where the gist config a model was trained with is written: the adapter's folder, or, with
    no adapter, a model folder that `gsa-rag train --full` wrote (its weights beside a manifest);
    None when neither holds one."""
    if adapter is not None:
        return Path(adapter)
    if model is not None and (Path(str(model)).expanduser() / MANIFEST).is_file():
        return Path(str(model)).expanduser()
    return None


def write_manifest(adapter_dir: str | Path, *, base_model: str, fingerprint: str, config: GistConfig, **extra) -> None:
    manifest = {"format_version": FORMAT_VERSION, "base_model": base_model, "base_fingerprint": fingerprint,
                "gist_config": config.to_dict(), **extra}
    path = Path(adapter_dir) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(path)


def check_base(adapter_dir: str | Path, fingerprint: str) -> None:
    """Raises AdapterMismatchError (a ValueError) when the adapter was trained on another base model."""
    manifest = read_manifest(adapter_dir)
    if manifest["base_fingerprint"] != fingerprint:
        raise AdapterMismatchError(
            f"adapter {adapter_dir} was trained on base model {manifest['base_model']!r} "
            f"(fingerprint {manifest['base_fingerprint']}), not on this one ({fingerprint}); "
            "load it with the base model it was trained on"
        )


def apply_adapter(model, adapter_dir: str | Path, fingerprint: str):
    """Loads the adapter onto `model` (gist tokens already added) and merges it for inference.

    Raises:
        AdapterMismatchError (a ValueError): the adapter was trained on another base model.
    """
    check_base(adapter_dir, fingerprint)
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading a gist adapter needs PEFT: pip install 'gsa-rag[train]'") from e
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
