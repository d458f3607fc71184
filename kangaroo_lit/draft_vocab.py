"""A restricted draft vocabulary (``draft.vocab_size`` K): which K token ids the draft head scores.

The exit head of a large vocabulary is a large share of a draft step's cost; scoring only the K most
frequent target tokens of the training data makes it cheaper. Drafts come from that set; verification
scores the full vocabulary, so decoding stays lossless (:mod:`kangaroo_lit.decoding`).
"""

from __future__ import annotations

import torch


def select_draft_vocab(
    counts: torch.Tensor, k: int, vocab_size: int, always: tuple[int, ...] | list[int] = ()
) -> torch.Tensor:
    """The K token ids a restricted draft head scores: the most frequent ones, ``always`` among them.

    Args:
        counts: (V',) how often each token id is a training target (shorter is padded with zeros; longer
            only when the extra ids never occur).
        k: K, how many ids to keep (1 <= K <= ``vocab_size``).
        vocab_size: V, the model's vocabulary (rows of ``lm_head``).
        always: ids kept whatever their count (EOS: a draft must be able to stop).

    Returns:
        (K,) int64 ids in increasing order. Ties in count go to the smaller id.
    """
    counts = torch.as_tensor(counts).flatten().to(torch.int64).cpu()
    if not 1 <= k <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in 1..{vocab_size} (the model's vocabulary), got {k}")
    if counts.numel() > vocab_size:
        if bool(counts[vocab_size:].any()):
            raise ValueError(f"token counts name ids >= {vocab_size}, outside the model's vocabulary")
        counts = counts[:vocab_size]
    elif counts.numel() < vocab_size:
        counts = torch.cat([counts, counts.new_zeros(vocab_size - counts.numel())])
    keep = sorted({int(a) for a in always if a is not None and 0 <= int(a) < vocab_size})
    if len(keep) > k:
        raise ValueError(f"draft vocabulary size {k} is smaller than the {len(keep)} ids it must hold ({keep})")
    order = torch.sort(counts, descending=True, stable=True).indices  # stable: ties by increasing id
    if keep:
        order = order[~torch.isin(order, torch.tensor(keep))]
    chosen = torch.cat([torch.tensor(keep, dtype=torch.int64), order[: k - len(keep)]])
    return torch.sort(chosen).values


def check_draft_vocab(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(K,) distinct int64 ids in ``0..vocab_size-1``, or a ValueError saying what is wrong."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"draft_vocab must be a non-empty 1-D tensor of token ids, got {ids.dtype} {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"draft_vocab ids must be in 0..{vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}")
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError("draft_vocab holds repeated ids")
    return ids
