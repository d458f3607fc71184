"""Attention masks the model builds itself: 4-D additive causal masks (with padding and sliding
windows) for HF's ``sdpa`` and ``eager`` attention, tree masks for passes over draft trees, and the
right-padding check of training batches."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class TreeMask:
    """Who attends to whom when the new tokens of a pass form a tree rather than a sequence.

    A pass over the nodes of a draft tree (and the draft path's expansion of one) appends them to a KV
    cache whose older entries are committed tokens (every node sees them) or other nodes (a node sees
    only its ancestors). Positions are per node (depth below the root), so siblings share one.

    Attributes:
        allowed: (T_q, T_k) bool, query ``i`` may attend to key ``j``; ``T_k`` = cached + new (the new
            tokens are the last ``T_q`` keys).
        query_positions: (T_q,) absolute position of each new token.
        key_positions: (T_k,) absolute position of each key (its sliding-window distance).
    """

    allowed: torch.Tensor
    query_positions: torch.Tensor
    key_positions: torch.Tensor

    def additive(self, dtype: torch.dtype, sliding_window: int | None = None) -> torch.Tensor:
        """(1, 1, T_q, T_k) additive mask: 0 where attended, the dtype's most negative finite value elsewhere."""
        allowed = self.allowed
        if sliding_window is not None:
            allowed = allowed & (self.key_positions[None, :] > self.query_positions[:, None] - sliding_window)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def tree_ancestry(parents: list[int]) -> torch.Tensor:
    """(k, k) bool: ``[i, j]`` when node ``j`` is node ``i`` or one of its ancestors.

    Args:
        parents: per node, the index of its parent (``-1``: the root, which is not one of the ``k``);
            every parent comes before its children.
    """
    tree_depths(parents)  # validates
    k = len(parents)
    ancestry = torch.eye(k, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            ancestry[i] |= ancestry[parent]
    return ancestry


def tree_depths(parents: list[int]) -> list[int]:
    """Per node, its depth below the root (1 for a child of the root); ``parents`` as in :func:`tree_ancestry`."""
    depths: list[int] = []
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"tree node {i} has parent {parent}; a parent is -1 (the root) or an earlier node")
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


def tree_pass_mask(parents: list[int], root_position: int, first: int = 0,
                   device: torch.device | None = None) -> TreeMask:
    """The :class:`TreeMask` of a pass over ``[root, node_1..node_k][first:]``.

    The cache holds the ``root_position`` tokens before the root (every node sees them) and, when
    ``first`` is 1, the root itself; a node sees the root, its ancestors and itself. Node ``i`` sits at
    position ``root_position + depth_i``.

    Args:
        parents: per node, its parent's index (``-1``: the root); parents come before children.
        root_position: the root's absolute position (= committed tokens before it).
        first: 0 when the root is part of the pass, 1 when it is cached already.
    """
    k = len(parents)
    ancestry = torch.zeros(k + 1, k + 1, dtype=torch.bool, device=device)
    ancestry[:, 0] = True
    ancestry[1:, 1:] = tree_ancestry(parents).to(device)
    depths = torch.tensor([0, *tree_depths(parents)], device=device)
    node_positions = root_position + depths
    allowed = torch.cat([torch.ones(k + 1 - first, root_position, dtype=torch.bool, device=device),
                         ancestry[first:]], dim=1)
    key_positions = torch.cat([torch.arange(root_position, device=device), node_positions])
    return TreeMask(allowed=allowed, query_positions=node_positions[first:], key_positions=key_positions)
