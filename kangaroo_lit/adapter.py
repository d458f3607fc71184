"""The Kangaroo adapter: RMSNorm -> one self-attention (RoPE, GQA) -> residual add -> RMSNorm.

It bridges the shallow exit ``hidden_states[exit_layer + 1]`` to the exit head. Kangaroo's has no MLP:
about ``4 d^2`` parameters. ``mlp_width > 0`` adds one (EAGLE's drafter is a whole decoder layer,
attention + MLP): RMSNorm -> the base architecture's gated MLP at that width -> residual add, before
the output norm; its ``down_proj`` starts at zero, so an untrained adapter is the same early exit.

Its attention (and MLP) are the base architecture's own classes, built from a one-layer copy of the
base config, so heads, KV heads, head dim, RoPE scaling, attention bias and Qwen3's q/k norms all
follow the base model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache


class KangarooAdapter(nn.Module):
    """One attention block (and optionally an MLP block), with its own norms.

    Args:
        base_config: the base model's config (copied; the adapter's config has one layer).
        attention_cls: the base architecture's attention class (e.g. ``LlamaAttention``).
        norm_cls: the base architecture's RMSNorm class.
        layer_type: ``"full_attention"`` or ``"sliding_attention"`` for the one layer.
        mlp_cls: the base architecture's MLP class (e.g. ``LlamaMLP``); needed when ``mlp_width > 0``.
        mlp_width: intermediate width of an MLP block after the attention (0: none, Kangaroo's adapter).
    """

    def __init__(
        self,
        base_config: PretrainedConfig,
        attention_cls: type[nn.Module],
        norm_cls: type[nn.Module],
        layer_type: str = "full_attention",
        mlp_cls: type[nn.Module] | None = None,
        mlp_width: int = 0,
    ) -> None:
        super().__init__()
        if mlp_width < 0 or (mlp_width and mlp_cls is None):
            raise ValueError(f"mlp_width must be >= 0 (with an MLP class when > 0), got {mlp_width}")
        config = copy.deepcopy(base_config)
        config.num_hidden_layers = 1
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [layer_type]
        self.config = config
        self.layer_type = layer_type
        self.input_norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        # layer_idx=0: the adapter's KV cache is its own one-layer DynamicCache.
        self.self_attn = attention_cls(config, layer_idx=0)
        self.mlp_width = mlp_width
        self.mlp_norm: nn.Module | None = None
        self.mlp: nn.Module | None = None
        if mlp_width:
            config.intermediate_size = mlp_width
            self.mlp_norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = mlp_cls(config)
        self.output_norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)

    @torch.no_grad()
    def init_from_base(self, first_deep_layer: nn.Module, final_norm: nn.Module) -> None:
        """Start as the untrained early exit: the draft is ``lm_head(norm(h))`` until training moves it.

        The attention's q/k/v (and q/k norms) and the input norm are copied from the first deep layer
        (a sensible attention to start from); ``o_proj`` is zeroed so the attention branch adds
        nothing at first; the output norm is a copy of the base's final norm, which ``lm_head``
        expects. Zeroing ``o_proj`` still lets gradients reach it, and through it q/k/v.
        """
        self.input_norm.load_state_dict(first_deep_layer.input_layernorm.state_dict())
        attn_state = {k: v for k, v in first_deep_layer.self_attn.state_dict().items()}
        self.self_attn.load_state_dict(attn_state)
        self.self_attn.o_proj.weight.zero_()
        if self.self_attn.o_proj.bias is not None:
            self.self_attn.o_proj.bias.zero_()
        self.output_norm.load_state_dict(final_norm.state_dict())
        if self.mlp is not None:
            # Start as a no-op branch too: the first deep layer's MLP norm, default-initialised
            # gate/up projections, a zero down projection (gradients still reach all of them).
            self.mlp_norm.load_state_dict(first_deep_layer.post_attention_layernorm.state_dict())
            self.mlp.down_proj.weight.zero_()
            if getattr(self.mlp.down_proj, "bias", None) is not None:
                self.mlp.down_proj.bias.zero_()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Map shallow hidden states to exit-head inputs.

        Args:
            hidden_states: (B, T, d) output of decoder layer ``exit_layer`` (any float dtype; it is
                cast to the adapter's dtype and the result cast back).
            position_embeddings: RoPE ``(cos, sin)``, each (B, T, head_dim), from the base's rotary.
            attention_mask: (B, 1, T, T_past + T) additive mask, or None for plain causal attention
                without cache under SDPA only (its causal flag); HF's eager attention reads None as
                bidirectional, so it always needs the mask (``KangarooModel._masks`` decides).
            cache: the adapter's own one-layer cache, updated in place.

        Returns:
            (B, T, d) normalised hidden states for the exit head.
        """
        in_dtype = hidden_states.dtype
        param_dtype = self.input_norm.weight.dtype
        h = hidden_states.to(param_dtype)
        cos, sin = position_embeddings
        attn_out, _ = self.self_attn(
            hidden_states=self.input_norm(h),
            position_embeddings=(cos.to(param_dtype), sin.to(param_dtype)),
            attention_mask=None if attention_mask is None else attention_mask.to(param_dtype),
            past_key_values=cache,
        )
        h = h + attn_out
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h))
        return self.output_norm(h).to(in_dtype)
