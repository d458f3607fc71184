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

import torch
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


def keep_positions(cache: Cache, layer_indices: Iterable[int], start: int, offsets: list[int]) -> None:
    """Keep the first ``start`` cached positions and, after them, only the entries at ``start + offsets``.

    After a pass over a draft tree the cache holds every node; the accepted path is a subset of them,
    in order: this packs it right after the committed positions and drops the rest (rejected branches).

    Args:
        cache: the cache to rewrite in place; its key/value tensors are (B, H_kv, T, head_dim).
        layer_indices: the layers to rewrite (the layers of one path segment).
        start: positions before it are kept as they are.
        offsets: increasing offsets (from ``start``) of the entries kept, in their new order.

    Raises:
        ValueError: an offset beyond a layer's length.
    """
    for idx in layer_indices:
        length = cache_length(cache, idx)
        if offsets and start + offsets[-1] >= length:
            raise ValueError(f"layer {idx} holds {length} positions; cannot keep offset {offsets[-1]} after {start}")
        if offsets == list(range(len(offsets))):  # already packed: a crop does it
            crop_layers(cache, [idx], start + len(offsets))
            continue
        # The one place that reads a layer's tensors (``DynamicLayer.keys`` / ``.values``): the public
        # Cache API can crop and append but not select positions. tests/test_tree.py checks the result
        # against a cache built from the accepted tokens directly, so a change in the layout fails there.
        layer = cache.layers[idx]
        index = torch.tensor([start + o for o in offsets], device=layer.keys.device)
        keys, values = layer.keys.index_select(-2, index), layer.values.index_select(-2, index)
        crop_layers(cache, [idx], start)
        if offsets:
            layer.update(keys, values)
