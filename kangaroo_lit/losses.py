"""Losses and agreement metrics of the two paths, computed in fp32 over response positions.

Position ``t`` predicts token ``t + 1``. A position counts when its next-token label is not -100
(prompt and padding labels are -100, chosen by the attention mask in the data collator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

ExitLoss = Literal["ce", "kd", "mix"]
IGNORE_INDEX = -100


@dataclass
class LossTerms:
    """Scalar losses and metrics of one batch (all 0-dim tensors; ``loss`` carries the gradient)."""

    loss: torch.Tensor
    loss_main: torch.Tensor
    loss_exit: torch.Tensor
    expected_accept: torch.Tensor
    top1_agree: torch.Tensor
    num_tokens: torch.Tensor


def next_token_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align (B, T, V) logits with (B, T) labels for next-token prediction.

    Returns:
        (N, V) fp32 logits of the counted positions and their (N,) targets.
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    return logits[:, :-1][valid].float(), targets[valid]


def kd_loss(exit_logits: torch.Tensor, main_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_v p_full(v) log q_draft(v)`` with ``p_full`` detached; (N, V) inputs."""
    p_full = F.softmax(main_logits.detach(), dim=-1)
    return -(p_full * F.log_softmax(exit_logits, dim=-1)).sum(-1).mean()


def expected_acceptance(exit_logits: torch.Tensor, main_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``sum_v min(p_full, q_draft)``: the probability a sampled draft is accepted."""
    p = F.softmax(main_logits.detach(), dim=-1)
    q = F.softmax(exit_logits.detach(), dim=-1)
    return torch.minimum(p, q).sum(-1).mean()


def sgp_loss(
    main_logits: torch.Tensor,
    exit_logits: torch.Tensor,
    labels: torch.Tensor,
    beta_exit: float = 0.7,
    exit_loss: ExitLoss = "ce",
    kd_weight: float = 0.5,
) -> LossTerms:
    """``loss = loss_main + beta_exit * loss_exit``.

    Args:
        main_logits: (B, T, V) full-path logits.
        exit_logits: (B, T, V) draft-path logits, or None when no draft path was run (then
            ``loss = loss_main`` and the draft metrics are NaN).
        labels: (B, T) token ids, -100 where no loss is taken (unshifted).
        exit_loss: ``ce`` (cross-entropy on the labels), ``kd`` (distillation to the full path) or
            ``mix`` (``kd_weight * kd + (1 - kd_weight) * ce``).
    """
    main, targets = next_token_targets(main_logits, labels)
    if targets.numel() == 0:
        raise ValueError("batch has no target tokens (every label is -100): check the data's prompt masking")
    loss_main = F.cross_entropy(main, targets)
    if exit_logits is None:  # plain LoRA fine-tuning: no draft path at all
        nan = torch.full((), float("nan"), device=main.device)
        return LossTerms(loss=loss_main, loss_main=loss_main, loss_exit=nan, expected_accept=nan,
                         top1_agree=nan, num_tokens=torch.tensor(targets.numel(), device=targets.device))
    draft, _ = next_token_targets(exit_logits, labels)
    if exit_loss == "ce":
        loss_exit = F.cross_entropy(draft, targets)
    elif exit_loss == "kd":
        loss_exit = kd_loss(draft, main)
    elif exit_loss == "mix":
        loss_exit = kd_weight * kd_loss(draft, main) + (1.0 - kd_weight) * F.cross_entropy(draft, targets)
    else:
        raise ValueError(f"exit_loss must be one of ce, kd, mix; got {exit_loss!r}")
    with torch.no_grad():
        accept = expected_acceptance(draft, main)
        agree = (draft.argmax(-1) == main.argmax(-1)).float().mean()
    return LossTerms(
        loss=loss_main + beta_exit * loss_exit,
        loss_main=loss_main,
        loss_exit=loss_exit,
        expected_accept=accept,
        top1_agree=agree,
        num_tokens=torch.tensor(targets.numel(), device=targets.device),
    )
