"""What one HF ``generate`` call asks for, translated into the self-speculative decoder's terms, or refused.

The decoder is exact for: one sequence, greedy or sampling warped by temperature, then top-k, then
top-p (``generate``'s order), stopping at EOS or a length. Everything else ``generate`` can do changes
the distribution (repetition penalty, minimum length, bad words, ...) or the search (beams, assisted
or contrastive decoding) in ways rejection sampling against the plain model cannot reproduce exactly,
so it is refused with the option's name rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kangaroo_lit.errors import ConfigError
from kangaroo_lit.hf.internals import warper_settings

ALLOWED = ("max_new_tokens / max_length, eos_token_id, do_sample with temperature, top_k and top_p, streamer, "
           "generation_config, return_dict_in_generate, attention_mask (no padding)")

# Processor class -> the generate option that adds it (for the message).
PROCESSOR_OPTIONS = {
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "EncoderRepetitionPenaltyLogitsProcessor": "encoder_repetition_penalty",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "MinLengthLogitsProcessor": "min_length / min_new_tokens",
    "MinNewTokensLengthLogitsProcessor": "min_new_tokens",
    "NoBadWordsLogitsProcessor": "bad_words_ids",
    "SequenceBiasLogitsProcessor": "sequence_bias",
    "PrefixConstrainedLogitsProcessor": "prefix_allowed_tokens_fn",
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id",
    "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
    "InfNanRemoveLogitsProcessor": "remove_invalid_values",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty",
    "SuppressTokensLogitsProcessor": "suppress_tokens",
    "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
    "ClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "MinPLogitsWarper": "min_p",
    "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff",
    "TopHLogitsWarper": "top_h",
    "WatermarkLogitsProcessor": "watermarking_config",
    "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
}
CRITERIA_OPTIONS = {"MaxTimeCriteria": "max_time", "StopStringCriteria": "stop_strings"}
# Model inputs generate prepares on its own that change nothing for one unpadded sequence.
HARMLESS_INPUTS = ("logits_to_keep", "use_cache", "cache_position")


@dataclass(frozen=True)
class DecodeRequest:
    """One ``generate`` call in the decoder's terms.

    Attributes:
        prompt: (1, T) prompt ids.
        max_new_tokens: most new tokens (``max_length - T``).
        eos_token_id: stop tokens (empty: none).
        temperature: 0 for greedy, else the sampling temperature; ``top_k`` (0 = off), ``top_p`` (1 = off).
        return_dict: return a ``GenerateDecoderOnlyOutput`` rather than the tensor.
    """

    prompt: torch.Tensor
    max_new_tokens: int
    eos_token_id: list[int]
    temperature: float
    top_k: int
    top_p: float
    return_dict: bool


def refuse(option: str, why: str) -> ConfigError:
    return ConfigError(f"kangaroo custom_generate cannot honour {option}: {why}; it supports {ALLOWED}")


def _check_mode(config: Any, assistant_model: Any) -> None:
    mode = str(getattr(config.get_generation_mode(assistant_model), "value", ""))
    if mode in ("greedy_search", "sample"):
        return
    options = {"beam_search": "num_beams > 1", "beam_sample": "num_beams > 1", "group_beam_search": "num_beam_groups",
               "constrained_beam_search": "constraints / force_words_ids", "contrastive_search": "penalty_alpha",
               "assisted_generation": "assistant_model / prompt_lookup_num_tokens / assistant_early_exit",
               "dola_generation": "dola_layers"}
    raise refuse(options.get(mode, mode), f"it selects {mode.replace('_', ' ')}, and the draft replaces the decoding "
                 "loop with self-speculative greedy decoding or sampling")


def _sampling(processors: Any, do_sample: bool) -> dict[str, Any]:
    """temperature / top_k / top_p from the warpers generate prepared (its defaults included: top_k 50)."""
    out: dict[str, Any] = {"temperature": 1.0 if do_sample else 0.0, "top_k": 0, "top_p": 1.0}
    for processor in processors or []:
        name = type(processor).__name__
        if name == "LogitNormalization":
            continue  # log-softmax: the same distribution and argmax
        if name not in ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper") or not do_sample:
            option = PROCESSOR_OPTIONS.get(name, f"the logits processor {name}")
            raise refuse(option, f"{name} changes the model's distribution, which speculative decoding verifies "
                         "against unchanged")
        settings = warper_settings(processor)
        if settings.get("min_tokens_to_keep", 1) != 1:
            raise refuse(f"{name}(min_tokens_to_keep={settings['min_tokens_to_keep']})", "only 1 is supported")
        for key in ("temperature", "top_k", "top_p"):
            if key in settings:
                out[key] = settings[key]
    return out


def _check_inputs(prompt: torch.Tensor, model_kwargs: dict[str, Any]) -> None:
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise refuse("attention_mask with padding", "one unpadded sequence is decoded (strip the padding)")
    cache = model_kwargs.get("past_key_values")
    if cache is not None and cache.get_seq_length() > 0:
        raise refuse("past_key_values holding a prefix", "the draft keeps caches of its own (pass the whole prompt)")
    positions = model_kwargs.get("position_ids")
    if positions is not None and not torch.equal(positions.cpu().flatten(), torch.arange(prompt.shape[1])):
        raise refuse("position_ids other than 0..T-1", "the prompt starts at position 0")
    for name, value in model_kwargs.items():
        if name not in ("attention_mask", "past_key_values", "position_ids", *HARMLESS_INPUTS) and value is not None:
            raise refuse(name, "the draft decodes from input_ids alone")


def decode_request(input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any, generation_config: Any,
                   model_kwargs: dict[str, Any], caller: dict[str, Any]) -> DecodeRequest:
    """Translate a ``custom_generate`` call (what ``generate`` passes a decoding loop) or refuse it.

    Args:
        input_ids: (B, T) prompt ids, as ``generate`` prepared them.
        logits_processor / stopping_criteria / generation_config / model_kwargs: as ``generate`` passes them.
        caller: :func:`~kangaroo_lit.hf.internals.generate_call_arguments` (``assistant_model``).

    Raises:
        ConfigError: naming the option that cannot be honoured exactly and what is supported.
    """
    config = generation_config
    if caller.get("assistant_model") is not None:
        raise refuse("assistant_model", "the draft is the assistant")
    _check_mode(config, None)
    if (config.num_return_sequences or 1) > 1:
        raise refuse(f"num_return_sequences={config.num_return_sequences}", "one sequence per call")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise refuse(f"a batch of {input_ids.shape[0]} prompts", "one prompt per call (batch size 1)")
    outputs = [o for o in ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
               if getattr(config, o, False)]
    if config.return_dict_in_generate and outputs:
        raise refuse(", ".join(outputs), "the verifier scores several tokens per pass; only sequences are returned")
    for criterion in stopping_criteria or []:
        name = type(criterion).__name__
        if name not in ("MaxLengthCriteria", "EosTokenCriteria"):
            raise refuse(CRITERIA_OPTIONS.get(name, f"the stopping criterion {name}"),
                         "only EOS tokens and a length stop the draft")
    _check_inputs(input_ids, model_kwargs)
    max_new_tokens = int(config.max_length) - input_ids.shape[1]
    if max_new_tokens < 1:
        raise refuse(f"max_length={config.max_length}", f"the prompt already holds {input_ids.shape[1]} tokens")
    eos = config.eos_token_id
    eos_list = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]
    sampling = _sampling(logits_processor, bool(config.do_sample))
    return DecodeRequest(prompt=input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_list,
                         temperature=float(sampling["temperature"]), top_k=int(sampling["top_k"]),
                         top_p=float(sampling["top_p"]), return_dict=bool(config.return_dict_in_generate))
