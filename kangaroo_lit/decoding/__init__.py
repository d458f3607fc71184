"""Decoding with a :class:`~kangaroo_lit.model.KangarooModel`: plain PyTorch, independent of Lightning.

* :class:`SelfSpeculativeDecoder`: Kangaroo's lossless self-speculative decoding (double early exit).
* :class:`VanillaDecoder`: one token per pass of the verifying model, the speed baseline.
* :func:`reference_model`: the HF model that verifies, to compare against its ``generate``.
"""

from kangaroo_lit.decoding.kv_cache import cache_length, crop_layers
from kangaroo_lit.decoding.result import DecodeResult
from kangaroo_lit.decoding.sampling import SamplingConfig, probabilities, rejection_sample, warp_logits
from kangaroo_lit.decoding.speculative import RoundInfo, SelfSpeculativeDecoder
from kangaroo_lit.decoding.vanilla import VanillaDecoder, reference_model

__all__ = [
    "DecodeResult",
    "RoundInfo",
    "SamplingConfig",
    "SelfSpeculativeDecoder",
    "VanillaDecoder",
    "cache_length",
    "crop_layers",
    "probabilities",
    "reference_model",
    "rejection_sample",
    "warp_logits",
]
