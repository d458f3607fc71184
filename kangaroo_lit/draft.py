"""The Python API: a trained draft, ready to decode (``from kangaroo_lit import load_draft``).

    from kangaroo_lit import load_draft

    draft = load_draft("drafts/smollm2-135m-instruct")
    ids = draft.tokenizer("Once upon a time", return_tensors="pt").input_ids
    result = draft.generate(ids, max_new_tokens=64)          # a DecodeResult: tokens + statistics
    print(draft.tokenizer.decode(result.tokens), result.mat, result.accept_rate)

``draft.base_model`` is the HF model that verifies: ``draft.base_model.generate(...)`` is plain decoding
of the untouched base, and ``draft.base_model.generate(..., custom_generate=kangaroo_generate(draft))``
(:mod:`kangaroo_lit.hf`) the same output, decoded by the draft.

Why LoRA is *parked*: a draft with draft-scoped LoRA has PEFT's LoRA layers inside the base's shallow
layers, and PEFT runs them in every forward of that model, its own ``generate`` included. A
:class:`Draft` switches them off once loaded and on only while it decodes (the decoder itself switches
them off again for the verifying pass), so outside :meth:`Draft.generate` the HF model is the base,
bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from kangaroo_lit.decoding.result import DecodeResult
from kangaroo_lit.decoding.session import load_for_decoding, recorded_decoding
from kangaroo_lit.decoding.speculative import RoundInfo, SelfSpeculativeDecoder
from kangaroo_lit.model import KangarooModel
from kangaroo_lit.settings import DecodingSettings


def _lora_layers(model: KangarooModel) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.base.modules() if isinstance(m, BaseTunerLayer)]


def set_lora_active(model: KangarooModel, active: bool) -> None:
    """Switch the draft's LoRA layers on or off, leaving every ``requires_grad`` as it was.

    PEFT's ``enable_adapters`` also (un)freezes the LoRA weights; a loaded draft is frozen and stays so.
    """
    if not model.has_lora:
        return
    layers = _lora_layers(model)
    params = [p for layer in layers for p in layer.parameters()]
    flags = [p.requires_grad for p in params]
    for layer in layers:
        layer.enable_adapters(active)
    for param, flag in zip(params, flags):
        if param.requires_grad != flag:
            param.requires_grad_(flag)


@dataclass
class Draft:
    """A draft and the model it drafts for, with decoding defaults.

    Attributes:
        model: the :class:`KangarooModel` (eval mode, frozen; LoRA parked outside :meth:`generate`).
        tokenizer: the base model's tokenizer (None only for a given loaded model without one beside it).
        base_path: where the base model came from.
        decoding: the decoding defaults (drafter, threshold, max_draft, prompt lookup, sampling, kernel):
            the artifact's recorded ones over :class:`DecodingSettings`'s, then the caller's overrides.
        artifact: the artifact directory (None for an untrained adapter on a plain base).
    """

    model: KangarooModel
    tokenizer: Any
    base_path: str
    decoding: DecodingSettings
    artifact: Path | None = None

    def __post_init__(self) -> None:
        set_lora_active(self.model, False)

    @property
    def base_model(self) -> PreTrainedModel:
        """The HF causal LM that verifies drafts (the untouched base outside :meth:`generate`); call its own
        ``generate`` for plain decoding, or with ``custom_generate`` to decode with this draft."""
        return self.model.causal_lm

    @property
    def device(self) -> torch.device:
        return self.model.causal_lm.model.embed_tokens.weight.device

    @contextlib.contextmanager
    def decoding_mode(self) -> Iterator[None]:
        """LoRA on (the draft path needs it) and the kernel of ``decoding.kernel`` while decoding."""
        set_lora_active(self.model, True)
        try:
            with contextlib.ExitStack() as stack:
                if self.decoding.kernel == "streaming":
                    from kangaroo_lit.kernels.streaming_linear import streaming_linears

                    stack.enter_context(streaming_linears(self.model, True))
                yield
        finally:
            set_lora_active(self.model, False)

    def decoder(self, on_round: Callable[[RoundInfo], None] | None = None) -> SelfSpeculativeDecoder:
        """A :class:`SelfSpeculativeDecoder` with this draft's drafter settings (run it in :meth:`decoding_mode`)."""
        return SelfSpeculativeDecoder(self.model, drafter=self.decoding.make_drafter(self.model), on_round=on_round)

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int | None = None,
        *,
        eos_token_id: int | list[int] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        on_round: Callable[[RoundInfo], None] | None = None,
    ) -> DecodeResult:
        """Decode after a prompt with the draft; the output is the verifying model's (lossless).

        Args:
            input_ids: (1, T) prompt ids (T >= 1; batch size 1), on any device.
            max_new_tokens: most new tokens (default ``decoding.max_new_tokens``).
            eos_token_id: stop after this token (or any of these); default the tokenizer's EOS. Pass
                ``[]`` to never stop early.
            temperature / top_p / top_k: sampling (default ``decoding``'s; temperature 0 is greedy).
            generator: random generator on the model's device (sampling; None: torch's global one).
            on_round: called after the prefill and every round with a :class:`RoundInfo` (``emitted``:
                the tokens that pass appended, in order: stream them from here).

        Returns:
            A :class:`DecodeResult` (``tokens``: the new ids, EOS included; MAT, acceptance, timing).
        """
        d = self.decoding
        settings = DecodingSettings.for_options(
            "", **{**d.as_dict(), **{k: v for k, v in dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                                              top_p=top_p, top_k=top_k).items() if v is not None}})
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        with self.decoding_mode():
            return self.decoder(on_round).generate(
                input_ids.to(self.device), settings.max_new_tokens, eos_token_id, temperature=settings.temperature,
                top_p=settings.top_p, top_k=settings.top_k, generator=generator)


def load_draft(
    artifact: str | Path | None = None,
    *,
    base_model: str | PreTrainedModel | None = None,
    exit_layer: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    **decoding: Any,
) -> Draft:
    """Load a draft to decode with: an exported artifact, or a base model + exit layer (untrained adapter).

    Args:
        artifact: directory written by ``kangaroo-lit export`` (e.g. ``drafts/smollm2-135m-instruct``).
        base_model: with ``artifact``, overrides the base it records; without, the model to decode with
            an untrained adapter (needs ``exit_layer``). A loaded HF causal LM is built on, not copied.
        exit_layer: L for a plain ``base_model``.
        dtype: ``"float32"``, ``"bfloat16"``, ... (default: the artifact's; float32 for a plain base).
        device: ``"cpu"``, ``"cuda"``, ... (default CPU).
        **decoding: overrides of the decoding defaults, fields of :class:`DecodingSettings` (``threshold``,
            ``max_draft``, ``prompt_lookup``, ``drafter``, ``temperature``, ``top_p``, ``top_k``, ``kernel``,
            ``max_new_tokens``).

    Raises:
        ConfigError, CheckpointError, ModelSourceError: one line saying what is wrong (all KangarooError).
    """
    loaded = load_for_decoding(artifact, base_model=base_model, exit_layer=exit_layer, dtype=dtype, device=device)
    defaults = recorded_decoding(loaded.manifest)
    known = {f.name for f in dataclasses.fields(DecodingSettings)}
    unknown = sorted(set(decoding) - known)
    if unknown:
        raise TypeError(f"load_draft() got unknown decoding settings {unknown}; known: {sorted(known)}")
    settings = DecodingSettings.for_options("", **{**defaults.as_dict(), **decoding})
    return Draft(loaded.model, loaded.tokenizer, loaded.base_path, settings,
                 None if artifact is None else Path(artifact))
