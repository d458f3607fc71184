"""The speed baseline: plain one-token-per-step decoding of the verifying model.

It calls the HF model's own forward with a :class:`transformers.DynamicCache`, exactly what
``generate`` runs per step but without its logits processors and stopping criteria, so it is at least
as fast as ``generate``: speedups measured against it are not inflated by a slow baseline.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from transformers import DynamicCache, PreTrainedModel

from kangaroo_lit.decoding.common import check_inputs, eos_set, synchronize
from kangaroo_lit.decoding.result import DecodeResult
from kangaroo_lit.decoding.sampling import SamplingConfig, choose
from kangaroo_lit.model import KangarooModel


@contextlib.contextmanager
def reference_model(model: KangarooModel) -> Iterator[PreTrainedModel]:
    """The HF causal LM that verifies drafts, for ``generate`` comparisons and the vanilla baseline.

    Yields ``model.causal_lm`` with LoRA disabled for ``lora_scope="draft"`` (the untouched base), as is
    without LoRA, and with LoRA active for ``"shared"`` (equivalent to the LoRA-merged model).

    Example::

        with reference_model(model) as lm:
            expected = lm.generate(input_ids, max_new_tokens=32, do_sample=False)
    """
    with model.lora_enabled(model.shallow_is_shared):
        yield model.causal_lm


class VanillaDecoder:
    """One token per forward pass of the verifying model (``accept_lengths`` all ones).

    Args:
        model: the model, in eval mode.
    """

    def __init__(self, model: KangarooModel) -> None:
        self.model = model

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | list[int] | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ) -> DecodeResult:
        """Same contract as :meth:`SelfSpeculativeDecoder.generate`, without drafting."""
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        input_ids = check_inputs(self.model, input_ids, max_new_tokens)
        eos = eos_set(eos_token_id)
        device = input_ids.device
        result = DecodeResult()
        with torch.inference_mode(), reference_model(self.model) as lm:
            synchronize(device)
            start = time.perf_counter()
            cache = DynamicCache()
            step_ids = input_ids
            while True:
                # logits_to_keep=1: only the last position's logits are needed (the prompt's are not).
                out = lm(input_ids=step_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                token, _ = choose(out.logits[:, -1], sampling, generator)
                tok = int(token[0])
                result.tokens.append(tok)
                result.accept_lengths.append(1)
                result.full_passes += 1
                if tok in eos or len(result.tokens) >= max_new_tokens:
                    break
                step_ids = token[:, None]
            synchronize(device)
            result.wall_time_s = time.perf_counter() - start
        return result
