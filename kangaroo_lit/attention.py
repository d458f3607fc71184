"""SDPA for inference passes over several new tokens with grouped key/value heads, without copying the cache.

HF's ``sdpa`` attention lets torch's SDPA read grouped key/value heads in place (``enable_gqa``) only when
there is no attention mask, and packs a single query per key/value head otherwise. A verification pass
over ``x, d1..dk`` has both several queries and a mask (the new tokens are causal among themselves after
the cache; a draft tree's mask is not even causal), so HF repeats every key and value head
``num_key_value_groups`` times first: a copy of the layer's whole cache, in every layer, every round.
On SmolLM2-135M (3 groups) at 600 cached tokens those copies and the wider attention cost about 0.2 of a
plain decoding step per round, growing with the context (``BENCHMARKS.md``, "Attention without repeated
key/value heads").

:data:`ATTENTION_NAME` is HF's ``sdpa`` with one change: on CPU, without gradients, a masked pass over
several queries of a grouped-query layer calls torch's SDPA with ``enable_gqa=True`` (the same
attention, read from the ``H_kv`` cached heads); everything else is delegated to HF's own
``sdpa_attention_forward`` unchanged: the one-token steps of the vanilla loop, training, and any GPU
(where CUDA's SDPA falls back to its math kernel for a masked ``enable_gqa``, which is why HF avoids it).
It is registered under HF's public ``AttentionInterface`` / ``AttentionMaskInterface`` (the mask is
``sdpa``'s), the first time a :class:`~kangaroo_lit.model.KangarooModel` is built on an ``sdpa`` base:
importing the package registers nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "kangaroo_sdpa"
# Backends whose masks are SDPA's (4-D boolean or additive, or None for a plain causal pass).
SDPA_BACKENDS = ("sdpa", ATTENTION_NAME)


def grouped_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF's attention-function signature; see the module docstring for when it differs from ``sdpa``.

    Args:
        module: the attention layer (``num_key_value_groups`` query heads share a key/value head).
        query: (B, H, T, head_dim).
        key, value: (B, H_kv, T_past + T, head_dim), the cache included.
        attention_mask: (B or 1, 1, T, T_past + T) boolean or additive mask, or None.

    Returns:
        ``(output, None)``: (B, T, H, head_dim) and no attention weights, as HF's ``sdpa`` returns.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        groups > 1
        and query.shape[2] > 1
        and attention_mask is not None
        and query.device.type == "cpu"
        and not torch.is_grad_enabled()
        and kwargs.get("position_bias") is None
    ):
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def use_grouped_sdpa(model: PreTrainedModel) -> None:
    """Switch an ``sdpa`` model to :data:`ATTENTION_NAME` (registering it first); other backends are left as they are.

    Outputs are unchanged (the same attention, computed without the copy); config files saved from the
    model do not record the choice (HF keeps the backend out of ``config.json``).
    """
    if model.config._attn_implementation != "sdpa":
        return
    # Registering again is harmless (the same function under the same name).
    AttentionInterface.register(ATTENTION_NAME, grouped_sdpa_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)
