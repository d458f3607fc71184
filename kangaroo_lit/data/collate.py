"""Batching: right-padding to the longest example, the attention mask and padded labels.

Llama-style tokenizers have no pad token, so the pad id falls back to EOS (then UNK, then 0). Since
the pad id may then equal the real final EOS, padding is identified by the attention mask built from
the example lengths, never by token id: the final EOS stays a target.
"""

from __future__ import annotations

import torch

from kangaroo_lit.data.tokenize import IGNORE_INDEX


def resolve_pad_id(tokenizer) -> int:
    """The id to pad with: the pad token, else EOS, else UNK, else 0.

    Padded positions are masked out of attention and labels, so which id fills them only matters
    for being a valid embedding index.
    """
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


class Collator:
    """Collates ``{"input_ids": (T_i,), "labels": (T_i,)}`` items into a right-padded batch.

    A class rather than a closure so that dataloader workers can pickle it.

    Args:
        pad_id: id written into padded positions of ``input_ids``.
        pad_to_multiple_of: round the padded length T up to a multiple of this (e.g. 8 for tensor
            cores); None pads to the longest item only.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad a list of B items.

        Returns:
            ``input_ids`` (B, T) int64, padded with ``pad_id``; ``attention_mask`` (B, T) int64, 1 on
            real tokens and 0 on padding; ``labels`` (B, T) int64, unshifted, -100 on prompt and
            padding positions.
        """
        lengths = torch.tensor([len(item["input_ids"]) for item in items], dtype=torch.int64)
        width = int(lengths.max()) if len(items) else 0
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(items)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.int64)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.int64)
        for i, item in enumerate(items):
            n = int(lengths[i])
            input_ids[i, :n] = item["input_ids"]
            labels[i, :n] = item["labels"]
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        # Labels of padded positions were never written, but enforce the contract by the mask anyway.
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def padding_fraction(batch: dict[str, torch.Tensor]) -> float:
    """Fraction of positions in ``batch["attention_mask"]`` (B, T) that are padding, in [0, 1)."""
    mask = batch["attention_mask"]
    return 1.0 - float(mask.sum()) / max(mask.numel(), 1)
