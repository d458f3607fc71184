"""Attention masks the model builds itself: 4-D additive causal masks (with padding and sliding
windows) for HF's ``sdpa`` and ``eager`` attention, and the right-padding check of training batches."""

from __future__ import annotations

import torch


def causal_attention_mask(
    query_length: int,
    past_length: int,
    dtype: torch.dtype,
    device: torch.device,
    padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Additive causal mask for queries at positions ``past_length..past_length+query_length-1``.

    Args:
        padding_mask: (B, past_length + query_length) with 1 for real tokens, 0 for padding, or None.
        sliding_window: if set, a query attends to at most this many most recent keys (itself included).

    Returns:
        (B or 1, 1, query_length, past_length + query_length) tensor of 0 (attend) and the dtype's
        most negative finite value (masked). Finite, so a fully masked padding row cannot make NaNs.
    """
    kv_length = past_length + query_length
    q_pos = torch.arange(past_length, kv_length, device=device)[:, None]
    k_pos = torch.arange(kv_length, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    allowed = allowed[None, None]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :kv_length].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def check_right_padding(attention_mask: torch.Tensor, shape: torch.Size) -> None:
    """Raise a ValueError unless ``attention_mask`` has ``shape`` and no real token follows a pad in a row."""
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(shape)}")
    real = attention_mask.bool()
    if bool((real[:, 1:] & ~real[:, :-1]).any()):
        raise ValueError("attention_mask: padding must be on the right (a real token follows a pad)")
