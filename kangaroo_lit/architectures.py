"""Which Hugging Face causal LMs are supported, loading them frozen, and validating an exit layer.

Support means: the decoder stack is ``model.model.layers`` of pre-norm blocks called as
``layer(hidden, attention_mask=..., position_embeddings=(cos, sin), past_key_values=cache)``, the rotary
embedding is ``model.model.rotary_emb``, the final norm ``model.model.norm`` and the head ``lm_head``.
Llama, Mistral, Qwen2 and Qwen3 share that layout (each has a test with a tiny random config).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

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
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def check_architecture(config: PretrainedConfig, source: str = "the base model") -> None:
    """Raise a clear error unless ``config`` is a supported decoder-only architecture."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source} has model_type {model_type!r}, which kangaroo_lit does not support; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def check_exit_layer(exit_layer: int, num_layers: int) -> None:
    """The shallow network is layers ``0..exit_layer``; at least one deep layer must remain to verify."""
    if not isinstance(exit_layer, int) or isinstance(exit_layer, bool):
        raise TypeError(f"exit_layer must be an int, got {type(exit_layer).__name__}")
    if not 0 <= exit_layer <= num_layers - 2:
        raise ValueError(
            f"exit_layer={exit_layer} is out of range for a model with {num_layers} decoder layers: "
            f"allowed 0..{num_layers - 2} (the shallow network is layers 0..exit_layer and at least "
            f"one deep layer must remain)"
        )


def load_base_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """Load a supported HF causal LM by Hub name or local path, frozen and in eval mode.

    ``sdpa`` is the default attention: kangaroo_lit passes explicit 4-D additive masks when a cache or
    padding is involved and relies on SDPA's causal flag otherwise; ``eager`` also works.
    """
    config = AutoConfig.from_pretrained(name_or_path)
    check_architecture(config, source=f"model {name_or_path!r}")
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
    )
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
