"""Prompt lookup: draft tokens copied from the context where its last n-gram occurred before.

Prompt lookup decoding (Saxena 2023; HF ``prompt_lookup_num_tokens``) is strong exactly where a
self-draft is weak: summarisation, retrieval-augmented answers, code edits, any answer that quotes its
prompt. :class:`~kangaroo_lit.decoding.SelfSpeculativeDecoder` (``prompt_lookup > 0``) drafts from a
match when there is one and from its adapter otherwise.
"""

from __future__ import annotations

import torch


def lookup_continuation(ids: torch.Tensor, max_tokens: int, min_ngram: int = 2, max_ngram: int = 3) -> torch.Tensor:
    """The tokens that followed the latest earlier occurrence of the context's last n-gram.

    The longest n-gram (from ``max_ngram`` down to ``min_ngram``) that ends ``ids`` and also occurs
    earlier wins; of its occurrences, the latest one followed by ``max_tokens`` tokens (the most recent
    context is the likeliest to repeat), else the earliest (the longest continuation: in a repeating
    cycle the latest occurrence is followed by less than one period).

    Args:
        ids: (n,) the committed tokens (prompt + generated).
        max_tokens: most tokens returned.
        min_ngram: shortest n-gram matched (>= 1).
        max_ngram: longest n-gram matched (>= ``min_ngram``).

    Returns:
        (m,) with ``0 <= m <= max_tokens`` tokens (empty: no match).
    """
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
    n = ids.shape[0]
    for size in range(min(max_ngram, n - 1), min_ngram - 1, -1):
        # windows starting at 0..n-size-1: every occurrence but the suffix itself (it has nothing after it)
        windows = ids[: n - 1].unfold(0, size, 1)
        hits = (windows == ids[n - size :]).all(dim=1).nonzero().flatten()
        if hits.numel():
            full = hits[hits + size + max_tokens <= n]
            start = int(full[-1] if full.numel() else hits[0]) + size
            return ids[start : start + max_tokens]
    return ids[:0]
