"""Small helpers on the public ``transformers`` Cache API: read lengths and roll caches back.

The decoder keeps one :class:`transformers.DynamicCache` per path segment (draft shallow, verifier
shallow, deep, adapter). A segment's cache only has entries for the layers that write to it (a
``DynamicCache`` built without config grows lazily up to the highest ``layer_idx`` written), so lengths
are always read per layer, never with ``cache.get_seq_length()``'s default layer 0.

Rollback trap: ``DynamicLayer.crop(n)`` takes a *negative* count of tokens to remove in transformers
5.23 (a positive count raises), while in older 5.x releases ``crop(0)`` means "crop to length 0". So
only ``layer.crop(-k)`` with ``k > 0`` is ever called here: it removes ``k`` tokens in every 5.x.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers.cache_utils import Cache


def cache_length(cache: Cache, layer_idx: int) -> int:
    """Number of positions cached at ``layer_idx`` (0 if that layer has never been written).

    Args:
        cache: any ``transformers`` cache.
        layer_idx: the decoder layer index the entry belongs to (the adapter's cache uses 0).
    """
    if layer_idx >= len(cache.layers):
        return 0
    return cache.layers[layer_idx].get_seq_length()


def crop_layers(cache: Cache, layer_indices: Iterable[int], new_length: int) -> None:
    """Drop the newest cached positions of the given layers so each holds exactly ``new_length``.

    Args:
        cache: the cache to roll back in place; its key/value tensors are (B, H_kv, T, head_dim).
        layer_indices: the layers to crop (the layers of one path segment).
        new_length: the length each layer must have afterwards.

    Raises:
        ValueError: if ``new_length`` is negative or a layer holds fewer than ``new_length`` positions
            (a cache can be rolled back, never forward).
    """
    if new_length < 0:
        raise ValueError(f"new_length must be >= 0, got {new_length}")
    for idx in layer_indices:
        length = cache_length(cache, idx)
        if length < new_length:
            raise ValueError(f"cannot crop layer {idx} of length {length} to the longer length {new_length}")
        excess = length - new_length
        if excess > 0:
            # Negative count = tokens to remove, in every transformers 5.x; never crop(0) (see module doc).
            cache.layers[idx].crop(-excess)
