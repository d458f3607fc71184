"""Which Hugging Face causal LMs are supported, loading them frozen, and validating an exit layer.

Support means: the decoder stack is ``model.model.layers`` of pre-norm blocks called as
``layer(hidden, attention_mask=..., position_embeddings=(cos, sin), past_key_values=cache)``, the rotary
embedding is ``model.model.rotary_emb``, the final norm ``model.model.norm`` and the head ``lm_head``.
Llama, Mistral, Qwen2 and Qwen3 share that layout (each has a test with a tiny random config).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from kangaroo_lit.errors import ConfigError, ModelSourceError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"bfloat16"`` etc. (also ``"bf16"``, ``"fp32"``, ...) to a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32", "fp64": "float64", "double": "float64"}
    name = aliases.get(dtype, dtype)
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def check_architecture(config: PretrainedConfig, source: str = "the base model") -> None:
    """Raise a clear error unless ``config`` is a supported decoder-only architecture."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSourceError(
            f"{source} has model_type {model_type!r}, which kangaroo_lit does not support; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def check_exit_layer(exit_layer: int, num_layers: int) -> None:
    """The shallow network is layers ``0..exit_layer``; at least one deep layer must remain to verify."""
    if not isinstance(exit_layer, int) or isinstance(exit_layer, bool):
        raise TypeError(f"exit_layer must be an int, got {type(exit_layer).__name__}")
    if not 0 <= exit_layer <= num_layers - 2:
        raise ConfigError(
            f"exit_layer={exit_layer} is out of range for a model with {num_layers} decoder layers: "
            f"allowed 0..{num_layers - 2} (the shallow network is layers 0..exit_layer and at least "
            f"one deep layer must remain)"
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model",
                   "vocab.txt")


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` means a directory on disk rather than a Hugging Face Hub id (``org/name``).

    Something that exists on disk is a path. Otherwise it is a path when it starts with ``/``, ``.``
    or ``~``, holds more than one ``/`` (``runs/x/hf``) or the platform's own separator, since a Hub id
    is ``name`` or ``org/name``. A relative ``runs/x`` that does not exist reads as a Hub id, so the
    messages for Hub ids say that no such local directory exists either.
    """
    if Path(name).expanduser().exists():
        return True
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _offline() -> bool:
    """Hugging Face offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), read now, not at import."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or any(
        f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_model_source(name_or_path: str, need: str = "config.json") -> None:
    """Refuse a model name that cannot be loaded, with one line saying why (before HF says it less clearly).

    A path must be a directory holding ``need`` (``config.json``; ``"tokenizer"`` checks for tokenizer
    files instead). Hub ids are left to the loader; :func:`hub_error` words its failure.

    Raises:
        ModelSourceError: ``no such directory: X``, ``X is a file, not a model directory``,
            ``no config.json in X`` or ``no tokenizer files in X``.
    """
    name = str(name_or_path)
    if not name.strip():
        raise ModelSourceError("the base model name is empty; give a Hugging Face model name or a local directory")
    if not looks_like_local_path(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelSourceError(f"no such directory: {name}")
    if not path.is_dir():
        raise ModelSourceError(f"{name} is a file, not a model directory (give the directory holding config.json)")
    if need == "tokenizer":
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ModelSourceError(f"no tokenizer files in {name} (expected tokenizer.json or tokenizer.model with "
                                   "tokenizer_config.json, as save_pretrained writes them)")
    elif not (path / need).is_file():
        raise ModelSourceError(f"no {need} in {name} (a Hugging Face model directory holds config.json, the "
                               "weights and the tokenizer files)")


def hub_error(name: str, err: BaseException, what: str = "model") -> ModelSourceError:
    """The one-line error for a ``what`` (model, tokenizer) that HF could not load from ``name``."""
    if not looks_like_local_path(name):
        no_dir = f"there is no local directory {name!r} either"
        if _offline():
            return ModelSourceError(
                f"{what} {name!r} is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE); "
                f"download it first (`hf download {name}`) or pass a local directory ({no_dir})")
        return ModelSourceError(f"cannot load {what} {name!r} from the Hugging Face Hub ({no_dir}): "
                                f"{_first_line(err)}")
    return ModelSourceError(f"cannot load the {what} in {name}: {_first_line(err)}")


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer.from_pretrained`` with one-line errors for a missing directory, files or Hub id."""
    from transformers import AutoTokenizer

    check_model_source(name_or_path, need="tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise hub_error(str(name_or_path), err, "tokenizer") from err


def load_base_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """Load a supported HF causal LM by Hub name or local path, frozen and in eval mode.

    ``sdpa`` is the default attention: kangaroo_lit passes explicit 4-D additive masks when a cache or
    padding is involved and relies on SDPA's causal flag otherwise; ``eager`` also works.

    Raises:
        ModelSourceError: a missing directory, one without ``config.json`` or weights, a Hub id that
            cannot be fetched (or is not cached in offline mode), or an unsupported architecture.
    """
    name = str(name_or_path)
    check_model_source(name)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise hub_error(name, err) from err
    check_architecture(config, source=f"model {name_or_path!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
        )
    except OSError as err:  # no weights in the directory, or not in the cache
        raise hub_error(name, err) from err
    model.requires_grad_(False)
    model.eval()
    return model


def layer_attention_types(config: PretrainedConfig) -> list[str]:
    """Per layer, ``"full_attention"`` or ``"sliding_attention"`` (Mistral: every layer slides)."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return list(types[:n])
    if getattr(config, "sliding_window", None):
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def stop_token_ids(tokenizer, lm) -> list[int]:
    """The ids that end a generation, as HF ``generate`` stops at them: the tokenizer's EOS, then every end
    token of the HF model ``lm``'s generation config (chat models often add an end-of-turn token)."""
    configured = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    found: list[int] = []
    for tok in [tokenizer.eos_token_id, *(configured if isinstance(configured, (list, tuple)) else [configured])]:
        if tok is not None and int(tok) not in found:
            found.append(int(tok))
    return found
