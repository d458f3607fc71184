"""Decoding with a :class:`~kangaroo_lit.model.KangarooModel`: plain PyTorch, independent of Lightning.

* :class:`SelfSpeculativeDecoder`: Kangaroo's lossless self-speculative decoding (double early exit).
* :mod:`~kangaroo_lit.decoding.drafters`: where its drafts come from (the adapter, prompt lookup, both).
* :class:`VanillaDecoder`: one token per pass of the verifying model, the speed baseline.
* :func:`reference_model`: the HF model that verifies, to compare against its ``generate``.
"""

from kangaroo_lit.decoding.drafters import AdapterDrafter, Drafter, LookupDrafter, LookupThenAdapter, make_drafter
from kangaroo_lit.decoding.kv_cache import cache_length, crop_layers
from kangaroo_lit.decoding.result import DecodeResult
from kangaroo_lit.decoding.sampling import SamplingConfig, probabilities, rejection_sample, warp_logits
from kangaroo_lit.decoding.speculative import RoundInfo, SelfSpeculativeDecoder
from kangaroo_lit.decoding.vanilla import VanillaDecoder, reference_model

__all__ = [
    "AdapterDrafter",
    "DecodeResult",
    "Drafter",
    "LookupDrafter",
    "LookupThenAdapter",
    "RoundInfo",
    "SamplingConfig",
    "SelfSpeculativeDecoder",
    "VanillaDecoder",
    "cache_length",
    "crop_layers",
    "make_drafter",
    "probabilities",
    "reference_model",
    "rejection_sample",
    "warp_logits",
]
