"""``model.generate(**inputs, custom_generate=kangaroo_generate(draft), ...)``: the draft decodes, HF's
``generate`` does the rest (its generation config, defaults, streamer, return type).

``generate`` prepares everything as for its own loop (the generation config with the model's defaults,
logits processors, stopping criteria, the prompt put into the streamer) and then calls the callable
instead of ``_sample``; the callable decodes with :class:`~kangaroo_lit.decoding.SelfSpeculativeDecoder`
and returns what ``_sample`` returns: (1, T + n) prompt + new ids, or a ``GenerateDecoderOnlyOutput``
with ``sequences`` when ``return_dict_in_generate``. Greedy output is identical to plain ``generate``;
sampling follows the same distribution (rejection sampling), drawn from torch's global generator as
``generate`` draws (``torch.manual_seed`` makes it repeatable, not equal to plain sampling's draws).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from kangaroo_lit.decoding.result import DecodeResult
from kangaroo_lit.draft import Draft
from kangaroo_lit.errors import ConfigError
from kangaroo_lit.hf.internals import generate_call_arguments
from kangaroo_lit.hf.request import DecodeRequest, decode_request


class KangarooGenerate:
    """The decoding loop ``generate`` calls (see :func:`kangaroo_generate`).

    Attributes:
        draft: the draft that decodes.
        last_result: the :class:`DecodeResult` of the latest call (MAT, acceptance, timing), or None.
    """

    def __init__(self, draft: Draft) -> None:
        if draft.model.lora_scope == "shared":
            raise ConfigError("kangaroo_generate: this draft's LoRA is shared with the verifying path (lora.scope "
                              "shared), so it decodes the LoRA-merged model, not the model generate is called on; "
                              "use draft.generate(...) for it")
        self.draft = draft
        self.last_result: DecodeResult | None = None

    def _check_model(self, model: Any) -> None:
        draft = self.draft
        if model is draft.base_model or model is draft.model.base:
            return
        name = getattr(model, "name_or_path", type(model).__name__)
        raise ConfigError(
            f"kangaroo_generate(draft) verifies with the draft's own base model, but generate was called on another "
            f"model object ({name}); call draft.base_model.generate(...), or build the draft on your model: "
            "load_draft(artifact, base_model=model)")

    def __call__(self, model: PreTrainedModel, input_ids: torch.Tensor, logits_processor: Any = None,
                 stopping_criteria: Any = None, generation_config: Any = None, **model_kwargs: Any):
        """What ``generate`` calls in place of ``_sample``.

        Args:
            model: the model ``generate`` was called on (must be the draft's base).
            input_ids: (1, T) prompt ids.

        Returns:
            (1, T + n) ids on the model's device, or ``GenerateDecoderOnlyOutput(sequences=...)``.
        """
        caller = generate_call_arguments()
        self._check_model(model)
        request = decode_request(input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs,
                                 caller)
        result = self._decode(request, caller.get("streamer"))
        self.last_result = result
        new = torch.tensor([result.tokens], dtype=input_ids.dtype, device=input_ids.device)
        sequences = torch.cat([input_ids, new], dim=1).to(self.draft.device)
        if request.return_dict:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences

    def _decode(self, request: DecodeRequest, streamer: Any) -> DecodeResult:
        """Decode; the streamer (which ``generate`` already gave the prompt) gets each new token, then end()."""

        def stream(info) -> None:
            for token in info.emitted:  # one (1,) tensor per token, as generate's own loop puts them
                streamer.put(torch.tensor([token]))

        draft = self.draft
        with draft.decoding_mode():
            result = draft.decoder(stream if streamer is not None else None).generate(
                request.prompt.to(draft.device), request.max_new_tokens, request.eos_token_id,
                temperature=request.temperature, top_p=request.top_p, top_k=request.top_k)
        if streamer is not None:
            streamer.end()
        return result


def kangaroo_generate(draft: Draft) -> KangarooGenerate:
    """A ``custom_generate`` callable that decodes with ``draft``:
    ``draft.base_model.generate(**inputs, custom_generate=kangaroo_generate(draft), max_new_tokens=64)``.

    Accepts what ``generate`` takes for one sequence: ``max_new_tokens`` / ``max_length``, ``eos_token_id``,
    ``do_sample`` with ``temperature`` / ``top_k`` / ``top_p``, a ``streamer``, a ``generation_config``,
    ``return_dict_in_generate``. Refuses with a :class:`ConfigError` naming the option what it cannot
    honour exactly: a batch > 1, beams and other search modes, ``num_return_sequences`` > 1, logits
    processors (``repetition_penalty``, ``min_length``, ...), ``stop_strings`` / ``max_time``, padding.
    The draft's drafter settings (threshold, max_draft, prompt lookup, kernel) are ``draft.decoding``'s.
    """
    return KangarooGenerate(draft)
