"""KangarooModel: a frozen HF causal LM split at ``exit_layer`` into a draft path and a full path.

* Draft path: shallow layers ``0..L`` (with LoRA when enabled) -> :class:`KangarooAdapter` -> exit head.
* Full path:  shallow layers ``0..L`` -> deep layers ``L+1..N-1`` -> final norm -> ``lm_head``.

``lora_scope="draft"`` (default) applies LoRA only on the draft path: the full path, which verifies
drafts at decode time, is then the untouched base model, so decoding is lossless with respect to it.
``lora_scope="shared"`` is the original SGP code's behaviour: one shallow pass with LoRA feeds both
paths, and decoding is lossless with respect to the LoRA-merged (possibly drifted) model.

The building blocks (:meth:`embed`, :meth:`rotary`, :meth:`run_layers`, :meth:`deep_logits`,
:meth:`draft_logits`) take an optional KV cache, so the self-speculative decoder reuses them.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kangaroo_lit.adapter import KangarooAdapter
from kangaroo_lit.architectures import check_architecture, check_exit_layer, layer_attention_types
from kangaroo_lit.attention import ATTENTION_NAME, SDPA_BACKENDS, use_grouped_sdpa
from kangaroo_lit.draft_vocab import check_draft_vocab
from kangaroo_lit.masks import TreeMask, causal_attention_mask, check_right_padding
from kangaroo_lit.settings import ExitHeadMode, LoraScope, LoraSettings

# HF attention backends that take the 4-D additive masks of :func:`causal_attention_mask`. (Flash
# attention reads a 2-D padding mask instead, flex attention a BlockMask: not supported.)
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class TwoPathOutput:
    """Logits of both paths over the same positions: (B, T, V) ``main_logits``; ``exit_logits`` (B, T, V),
    or (B, T, K) over the token ids ``draft_vocab`` with a restricted draft head (``draft.vocab_size``)."""

    main_logits: torch.Tensor
    exit_logits: torch.Tensor | None
    draft_vocab: torch.Tensor | None = None


def _rebuild_exit_slice_after_load(module: KangarooModel, incompatible_keys) -> None:
    # A load_state_dict may have replaced the draft vocabulary's ids: re-slice the frozen head to them.
    module._rebuild_exit_slice()


class KangarooModel(nn.Module):
    """A frozen base LM with shallow LoRA, a Kangaroo adapter and an exit head.

    Args:
        base: a loaded HF causal LM of a supported architecture (its parameters get frozen here).
        exit_layer: L; the shallow network is decoder layers ``0..L``.
        lora: LoRA settings; None or rank 0 for no LoRA.
        exit_head: ``"shared"`` reuses the frozen ``lm_head``; ``"trainable"`` is a copy of it that trains.
        trainable_dtype: dtype of the trainable parts (fp32 keeps optimizer updates exact when the
            frozen base is bf16; their inputs are cast on the way in).
        draft_vocab: (K,) token ids the exit head scores (a restricted draft head), or None for all V.
            Kept as the persistent buffer ``draft_vocab`` (in state dicts and checkpoints). The shared head
            is then a frozen K x d slice of ``lm_head`` (buffer ``exit_weight``, not saved: re-sliced
            whenever the ids change or are loaded); the trainable head is a K-row ``exit_proj``.
        adapter_mlp: intermediate width of an MLP block in the adapter (0: none, Kangaroo's adapter).
    """

    def __init__(
        self,
        base: PreTrainedModel,
        exit_layer: int,
        lora: LoraSettings | None = None,
        exit_head: ExitHeadMode = "shared",
        trainable_dtype: torch.dtype = torch.float32,
        draft_vocab: torch.Tensor | None = None,
        adapter_mlp: int = 0,
    ) -> None:
        super().__init__()
        check_architecture(base.config)
        attn_implementation = getattr(base.config, "_attn_implementation", None)
        if attn_implementation not in (*SUPPORTED_ATTENTION, ATTENTION_NAME):  # the latter: already switched
            raise ValueError(
                f"attn_implementation {attn_implementation!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ATTENTION)}"
            )
        # sdpa, without copying the cache's grouped key/value heads in multi-token passes (kangaroo_lit.attention);
        # before the adapter is built so that its attention layer uses it too.
        use_grouped_sdpa(base)
        num_layers = base.config.num_hidden_layers
        check_exit_layer(exit_layer, num_layers)
        if exit_head not in ("shared", "trainable"):
            raise ValueError(f"exit_head must be 'shared' or 'trainable', got {exit_head!r}")
        self.exit_layer = exit_layer
        self.exit_head_mode = exit_head
        # Temperature at which the draft's top probability reads as an acceptance probability (decoding's
        # confidence; ``kangaroo-lit calibrate`` fits it, artifacts carry it); 1 = the raw softmax.
        self.confidence_temperature = 1.0
        self.lora_settings = lora if lora is not None and lora.rank > 0 else None
        if self.lora_settings is not None and self.lora_settings.scope not in ("draft", "shared"):
            raise ValueError(f"lora scope must be 'draft' or 'shared', got {self.lora_settings.scope!r}")
        base.requires_grad_(False)
        self._layer_types = layer_attention_types(base.config)

        first_deep = base.model.layers[exit_layer + 1]
        self.adapter = KangarooAdapter(
            base.config,
            attention_cls=type(first_deep.self_attn),
            norm_cls=type(base.model.norm),
            layer_type=self._layer_types[exit_layer],
            mlp_cls=type(first_deep.mlp),
            mlp_width=adapter_mlp,
        )
        self.adapter.init_from_base(first_deep, base.model.norm)
        self.adapter.to(dtype=trainable_dtype, device=base.model.norm.weight.device)
        self.adapter.requires_grad_(True)

        lm_head = base.get_output_embeddings()
        ids = None if draft_vocab is None else check_draft_vocab(draft_vocab, lm_head.out_features)
        self.register_buffer("draft_vocab", None if ids is None else ids.to(lm_head.weight.device), persistent=True)
        self.register_buffer("exit_weight", None, persistent=False)
        self.register_buffer("exit_bias", None, persistent=False)
        self.exit_proj: nn.Linear | None = None
        if exit_head == "trainable":
            rows = lm_head.out_features if ids is None else ids.numel()
            self.exit_proj = nn.Linear(lm_head.in_features, rows, bias=lm_head.bias is not None)
            self._init_exit_proj(lm_head)
            self.exit_proj.to(dtype=trainable_dtype, device=lm_head.weight.device)
        self._rebuild_exit_slice(lm_head)
        self.register_load_state_dict_post_hook(_rebuild_exit_slice_after_load)

        if self.lora_settings is not None:
            from peft import LoraConfig, get_peft_model

            s = self.lora_settings
            peft_config = LoraConfig(
                r=s.rank,
                lora_alpha=s.alpha,
                lora_dropout=s.dropout,
                target_modules=list(s.target_modules),
                layers_to_transform=list(range(exit_layer + 1)),
                layers_pattern="layers",
                bias="none",
                task_type="CAUSAL_LM",
            )
            with warnings.catch_warnings():
                # peft 0.21 asks transformers 5.2x a deprecated question here; nothing to act on.
                warnings.filterwarnings(
                    "ignore", message=r".*is_gradient_checkpointing.*is deprecated", category=FutureWarning
                )
                base = get_peft_model(base, peft_config)
            for p in base.parameters():
                if p.requires_grad:
                    p.data = p.data.to(trainable_dtype)
        self.base = base
        # Scope "draft" after merge_lora_for_decoding: the draft path's own layers 0..L, LoRA merged in.
        self.draft_layers: nn.ModuleList | None = None
        self.lora_merged = False

    # ----------------------------------------------------------------------------------------------
    # Structure
    @property
    def causal_lm(self) -> PreTrainedModel:
        """The HF ``...ForCausalLM`` (inside the PEFT wrapper while LoRA is on and not merged)."""
        return self.base.get_base_model() if self.has_lora and not self.lora_merged else self.base

    @property
    def has_lora(self) -> bool:
        return self.lora_settings is not None

    @property
    def lora_scope(self) -> LoraScope | None:
        return self.lora_settings.scope if self.lora_settings is not None else None

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.causal_lm.model.layers

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def shallow_is_shared(self) -> bool:
        """True when draft and full paths share the shallow pass (no LoRA, or ``lora_scope="shared"``)."""
        return not self.has_lora or self.lora_scope == "shared"

    @property
    def vocab_size(self) -> int:
        """V, the rows of ``lm_head`` (what the full path scores)."""
        return self.causal_lm.lm_head.out_features

    @property
    def draft_vocab_size(self) -> int | None:
        """K of a restricted draft head, None when the exit head scores the full vocabulary."""
        return None if self.draft_vocab is None else self.draft_vocab.numel()

    def set_draft_vocab(self, ids: torch.Tensor, init_head: bool = True) -> None:
        """Replace the K ids of a restricted head (same K); re-slice the shared head, and with
        ``init_head`` re-initialise a trainable head from the matching ``lm_head`` rows."""
        if self.draft_vocab is None:
            raise ValueError("this model's exit head scores the full vocabulary (built without draft_vocab)")
        ids = check_draft_vocab(ids, self.vocab_size)
        if ids.shape != self.draft_vocab.shape:
            raise ValueError(f"draft_vocab has {ids.numel()} ids, this model's head {self.draft_vocab.numel()}")
        with torch.no_grad():
            self.draft_vocab.copy_(ids)
        if init_head and self.exit_proj is not None:
            self._init_exit_proj(self.causal_lm.lm_head)
        self._rebuild_exit_slice()

    def _init_exit_proj(self, lm_head: nn.Module) -> None:
        """The trainable head starts as ``lm_head`` (its rows of the draft vocabulary, if restricted)."""
        with torch.no_grad():
            weight, bias = lm_head.weight, lm_head.bias
            if self.draft_vocab is not None:
                ids = self.draft_vocab.to(weight.device)
                weight, bias = weight[ids], None if bias is None else bias[ids]
            self.exit_proj.weight.copy_(weight)
            if bias is not None:
                self.exit_proj.bias.copy_(bias)

    def _rebuild_exit_slice(self, lm_head: nn.Module | None = None) -> None:
        """``exit_weight`` / ``exit_bias`` = the ``lm_head`` rows of ``draft_vocab`` (shared restricted head only).

        A buffer, so a decoding step does not re-slice ``lm_head``; never saved (the ids are, and the
        frozen base is not), so it is rebuilt here after every change or load of the ids.
        """
        if self.draft_vocab is None or self.exit_proj is not None:
            self.exit_weight, self.exit_bias = None, None
            return
        lm_head = lm_head if lm_head is not None else self.causal_lm.lm_head
        with torch.no_grad():
            ids = self.draft_vocab.to(lm_head.weight.device)
            self.exit_weight = lm_head.weight[ids].detach().clone()
            self.exit_bias = None if lm_head.bias is None else lm_head.bias[ids].detach().clone()

    def draft_token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Indices into the draft head's outputs -> token ids (the identity without a restricted head)."""
        return index if self.draft_vocab is None else self.draft_vocab[index]

    def scatter_draft(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(..., K) values over the draft vocabulary -> (..., V), ``fill`` elsewhere (as is without one).

        Probabilities scatter with ``fill=0`` (the draft never proposes a token outside its set), logits
        with ``fill=-inf``.
        """
        if self.draft_vocab is None:
            return values
        out = values.new_full((*values.shape[:-1], self.vocab_size), fill)
        return out.index_copy_(-1, self.draft_vocab.to(values.device), values)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything that trains: LoRA, adapter, trainable exit head."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    @contextlib.contextmanager
    def lora_enabled(self, enabled: bool):
        """Run the enclosed code with LoRA on or off (a no-op without LoRA or when asked for on).

        ``requires_grad`` of every parameter is the same inside as outside. PEFT's switch
        (``BaseTunerLayer.enable_adapters``) also freezes the LoRA weights when it disables them and
        unfreezes them when it enables them again; a switch in every forward (``lora.scope: draft``)
        and every decoding round would make the trainable set flicker (ZeRO records it once, when it
        builds its optimizer) and would unfreeze the LoRA of a model loaded frozen for inference. So
        the flags are put back right after each switch, before any layer runs: only the layers'
        disabled state changes, which is all their forward reads.
        """
        if not self.has_lora or self.lora_merged or enabled:
            yield
            return
        # Toggle the LoRA layers directly rather than with PEFT's ``disable_adapter()``: that one first
        # computes the model status (walks and reprs every module), milliseconds of Python per call,
        # paid in every decoding round of lora_scope "draft". Same effect (``enable_adapters`` is
        # what PEFT calls too), and a nested call restores what it found.
        from peft.tuners.tuners_utils import BaseTunerLayer

        if getattr(self, "_lora_layers", None) is None:
            self._lora_layers = [m for m in self.base.modules() if isinstance(m, BaseTunerLayer)]
            self._lora_params = [p for layer in self._lora_layers for p in layer.parameters()]
        flags = [p.requires_grad for p in self._lora_params]
        was_enabled = [not layer.disable_adapters for layer in self._lora_layers]
        for layer in self._lora_layers:
            layer.enable_adapters(False)
        self._restore_requires_grad(flags)
        try:
            yield
        finally:
            for layer, on in zip(self._lora_layers, was_enabled):
                if on:
                    layer.enable_adapters(True)
            self._restore_requires_grad(flags)

    def merge_lora_for_decoding(self) -> None:
        """Fold LoRA into plain layers for decoding: the same two paths, without PEFT's work in every module.

        PEFT computes each LoRA linear as the frozen layer plus two small matmuls, a dropout and a scaling,
        and scope "draft" switches every LoRA layer off and on again around each verification: on a CPU,
        at batch size 1, that Python costs about as much as the draft gains (BENCHMARKS.md, "Folding LoRA
        for decoding"). After this call:

        * scope ``"draft"``: the draft path runs its own copies of layers ``0..L`` with LoRA merged in
          (:attr:`draft_layers`, L + 1 layers more in memory); the verifier runs the base's layers with
          the LoRA modules removed (not merged), i.e. exactly the untouched base, so nothing the verifier
          computes changes and decoding stays lossless with respect to it;
        * scope ``"shared"``: LoRA is merged into layers ``0..L`` themselves (the verifying model is the
          LoRA-merged one by definition, DESIGN.md §2).

        A model built on a loaded HF model gives it back without LoRA modules. The draft's logits change
        by rounding only (``W + s B A`` instead of ``x W + s x A B``). For inference only: the model must
        be frozen, and is not meant to be trained or saved afterwards. A no-op without LoRA or when done.

        Raises:
            ValueError: a parameter still requires grad (a model being trained).
        """
        if not self.has_lora or self.lora_merged:
            return
        if any(p.requires_grad for p in self.parameters()):
            raise ValueError("merge_lora_for_decoding: the model has trainable parameters; merge a frozen model only")
        if self.lora_scope == "shared":
            self.base = self.base.merge_and_unload()
        else:
            from peft.tuners.tuners_utils import BaseTunerLayer

            copies = nn.ModuleList(copy.deepcopy(self.layers[i]) for i in range(self.exit_layer + 1))
            for parent in list(copies.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, BaseTunerLayer):
                        child.merge()
                        setattr(parent, name, child.get_base_layer())
            self.draft_layers = copies
            self.base = self.base.unload()
        self.lora_merged = True
        self._lora_layers = self._lora_params = None

    def _restore_requires_grad(self, flags: list[bool]) -> None:
        for param, flag in zip(self._lora_params, flags):
            if param.requires_grad != flag:
                param.requires_grad_(flag)

    # ----------------------------------------------------------------------------------------------
    # Building blocks (shared by training and decoding)
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) embeddings."""
        return self.causal_lm.model.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``(cos, sin)``, each (B, T, head_dim), for (B, T) ``position_ids``."""
        return self.causal_lm.model.rotary_emb(hidden, position_ids)

    def _masks(
        self,
        query_length: int,
        past_length: int,
        padding_mask: torch.Tensor | None,
        dtype: torch.dtype,
        device: torch.device,
        tree: TreeMask | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Additive masks per attention type (the decoder layers' and the adapter's).

        With ``tree``, the new tokens are the nodes of a draft tree: its explicit mask (sliding windows
        by position) replaces the causal one; it must cover exactly the past and the new keys.

        None is returned only where it means exactly the causal mask: HF's SDPA attention turns a None
        mask with more than one query into ``is_causal=True`` (which keeps SDPA's fused causal kernels),
        and that flag is top-left aligned, so it is right only without past keys, without padding and
        within the sliding window. HF's eager attention has no causal flag: None there is bidirectional
        attention (future tokens would leak into every position), so any backend but SDPA, in the base
        layers or the adapter, always gets the explicit mask of :func:`causal_attention_mask`.
        """
        kv_length = past_length + query_length
        window = getattr(self.config, "sliding_window", None)
        if tree is not None:
            if padding_mask is not None:
                raise ValueError("a tree pass takes no padding mask (batch size 1)")
            if tuple(tree.allowed.shape) != (query_length, kv_length):
                raise ValueError(f"tree mask of shape {tuple(tree.allowed.shape)} for {query_length} new tokens "
                                 f"after {past_length} cached ones")
            return {
                layer_type: tree.additive(dtype, window if layer_type == "sliding_attention" else None)
                for layer_type in set(self._layer_types) | {self.adapter.layer_type}
            }
        sdpa_only = (self.config._attn_implementation in SDPA_BACKENDS
                     and self.adapter.config._attn_implementation in SDPA_BACKENDS)
        plain_causal = (
            sdpa_only
            and query_length > 1
            and past_length == 0
            and (padding_mask is None or bool(padding_mask[:, :kv_length].all()))
        )
        masks: dict[str, torch.Tensor | None] = {}
        for layer_type in set(self._layer_types) | {self.adapter.layer_type}:
            sliding = window if layer_type == "sliding_attention" else None
            if plain_causal and (sliding is None or kv_length <= sliding):
                masks[layer_type] = None
            else:
                masks[layer_type] = causal_attention_mask(
                    query_length, past_length, dtype, device, padding_mask, sliding
                )
        return masks

    def run_layers(
        self,
        hidden: torch.Tensor,
        start: int,
        stop: int,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        tree: TreeMask | None = None,
        layers: nn.ModuleList | None = None,
    ) -> torch.Tensor:
        """Run decoder layers ``start..stop-1`` (with LoRA as currently enabled).

        Args:
            hidden: (B, T, d) input of layer ``start``.
            position_ids: (B, T) absolute positions of the T new tokens.
            padding_mask: (B, T_past + T), 1 = real token; None = no padding.
            cache: a cache whose entries ``start..stop-1`` hold the past keys/values of those layers;
                updated in place. Its length at layer ``start`` is taken as the past length.
            tree: the new tokens are draft-tree nodes attending as this says (B = 1; see :class:`TreeMask`).
            layers: the layers to index (default the base's; :attr:`draft_layers` for a merged draft path).

        Returns:
            (B, T, d) output of layer ``stop - 1``.
        """
        layers = self.layers if layers is None else layers
        if start >= stop:
            return hidden
        past_length = 0
        if cache is not None and len(cache.layers) > start:
            past_length = cache.layers[start].get_seq_length()
        masks = self._masks(hidden.shape[1], past_length, padding_mask, hidden.dtype, hidden.device, tree)
        position_embeddings = self.rotary(hidden, position_ids)
        for idx in range(start, stop):
            out = layers[idx](
                hidden,
                attention_mask=masks[self._layer_types[idx]],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def shallow(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        draft: bool = True,
        tree: TreeMask | None = None,
    ) -> torch.Tensor:
        """Layers ``0..L``: with LoRA for the draft path, without it for the full path of scope "draft".

        Returns (B, T, d) = ``hidden_states[L + 1]`` of the path chosen.
        """
        if draft and self.draft_layers is not None:  # LoRA merged into the draft path's own copies
            return self.run_layers(hidden, 0, self.exit_layer + 1, position_ids, padding_mask, cache, tree,
                                   layers=self.draft_layers)
        use_lora = draft or self.lora_scope == "shared"
        with self.lora_enabled(use_lora):
            return self.run_layers(hidden, 0, self.exit_layer + 1, position_ids, padding_mask, cache, tree)

    def deep_logits(
        self,
        shallow_hidden: torch.Tensor,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        tree: TreeMask | None = None,
    ) -> torch.Tensor:
        """Layers ``L+1..N-1`` -> final norm -> ``lm_head``: (B, T, d) -> (B, T, V) logits."""
        h = self.run_layers(shallow_hidden, self.exit_layer + 1, self.num_layers, position_ids, padding_mask, cache,
                            tree)
        return self.causal_lm.lm_head(self.causal_lm.model.norm(h))

    def draft_logits(
        self,
        shallow_hidden: torch.Tensor,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        tree: TreeMask | None = None,
    ) -> torch.Tensor:
        """Adapter -> exit head: (B, T, d) shallow hidden states -> (B, T, V) draft logits.

        With a restricted head the logits are (B, T, K), over the token ids ``self.draft_vocab``
        (:meth:`draft_token_ids` maps an argmax, :meth:`scatter_draft` widens to V). ``cache`` is the
        adapter's own one-layer cache.
        """
        return self.exit_head(self.adapter_hidden(shallow_hidden, position_ids, padding_mask, cache, tree))

    def adapter_hidden(
        self,
        shallow_hidden: torch.Tensor,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        tree: TreeMask | None = None,
    ) -> torch.Tensor:
        """The adapter alone: (B, T, d) shallow hidden states -> (B, T, d) exit-head inputs.

        Decoding's prefill uses it to fill the adapter's cache without computing prompt-length x
        vocabulary logits nobody reads.
        """
        past_length = cache.get_seq_length() if cache is not None else 0
        mask = self._masks(
            shallow_hidden.shape[1], past_length, padding_mask, shallow_hidden.dtype, shallow_hidden.device, tree
        )[self.adapter.layer_type]
        return self.adapter(shallow_hidden, self.rotary(shallow_hidden, position_ids), mask, cache)

    def exit_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) adapter output -> (B, T, V) logits, by the shared ``lm_head`` or the trainable copy;
        (B, T, K) over ``draft_vocab`` with a restricted head (its frozen ``lm_head`` slice or ``exit_proj``)."""
        if self.exit_proj is not None:
            return self.exit_proj(hidden.to(self.exit_proj.weight.dtype))
        if self.exit_weight is not None:
            return nn.functional.linear(hidden.to(self.exit_weight.dtype), self.exit_weight, self.exit_bias)
        lm_head = self.causal_lm.lm_head
        return lm_head(hidden.to(lm_head.weight.dtype))

    # ----------------------------------------------------------------------------------------------
    # Training / evaluation forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        detach_exit: bool = True,
        compute_exit: bool = True,
        compute_main: bool = True,
    ) -> TwoPathOutput:
        """Both paths over a batch, right-padded if padded at all.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 (or True) for real tokens, 0 for padding; padding must be on the
                right (a ValueError otherwise). It is checked, not passed to the attention: under the
                causal mask a real token never attends to a later position, so right padding cannot
                change the logits at real positions (SDPA keeps its fused causal kernel). The logits at
                padding positions are meaningless; the losses ignore them (label -100).
            detach_exit: SGP. The full path gets a detached shallow state and runs its deep layers
                under ``no_grad``, so ``loss_main`` reaches no trainable weight and keeps no activations.
            compute_exit: False skips adapter and exit head (``exit_logits`` is None): plain LoRA
                fine-tuning of the shallow layers, the baseline of the training benchmark.
            compute_main: False skips the full path (``main_logits`` is None): with ``detach_exit`` and
                a label loss nothing trainable depends on it, and it is most of a step's cost.

        Returns:
            :class:`TwoPathOutput` with (B, T, V) ``main_logits`` and ``exit_logits`` ((B, T, K) with a
            restricted draft head; ``draft_vocab`` names its ids).
        """
        batch, length = input_ids.shape
        if attention_mask is not None:
            check_right_padding(attention_mask, input_ids.shape)
        position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
        hidden = self.embed(input_ids)
        draft_shallow = self.shallow(hidden, position_ids, draft=True)
        exit_logits = self.draft_logits(draft_shallow, position_ids) if compute_exit else None

        if not compute_main:
            return TwoPathOutput(main_logits=None, exit_logits=exit_logits, draft_vocab=self.draft_vocab)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_exit):
            if self.shallow_is_shared:
                main_shallow = draft_shallow.detach() if detach_exit else draft_shallow
            else:
                main_shallow = self.shallow(hidden, position_ids, draft=False)
            main_logits = self.deep_logits(main_shallow, position_ids)
        return TwoPathOutput(main_logits=main_logits, exit_logits=exit_logits, draft_vocab=self.draft_vocab)

    def full_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, V) logits of the model that verifies (no padding handling beyond causal)."""
        batch, length = input_ids.shape
        position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
        shallow = self.shallow(self.embed(input_ids), position_ids, draft=False)
        return self.deep_logits(shallow, position_ids)
