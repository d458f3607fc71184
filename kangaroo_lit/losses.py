"""Losses and agreement metrics of the two paths, computed in fp32 over response positions.

Position ``t`` predicts token ``t + 1``. A position counts when its next-token label is not -100
(prompt and padding labels are -100, chosen by the attention mask in the data collator).

A restricted draft head (``draft.vocab_size`` K) scores only the token ids ``draft_vocab`` (set S): its
logits are (..., K) and ``q`` is zero outside S. Then ``kd = -sum_{v in S} p_full(v) log q(v)`` (mass of
``p_full`` outside S cannot be matched), ``ce`` is taken over the labels inside S only,
``expected_accept = sum_{v in S} min(p_full(v), q(v))`` and ``top1_agree`` counts positions whose full
argmax is in S and equals the draft's token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

ExitLoss = Literal["ce", "kd", "mix", "accept"]
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


def _restrict(p_full: torch.Tensor, draft_vocab: torch.Tensor | None) -> torch.Tensor:
    return p_full if draft_vocab is None else p_full.index_select(-1, draft_vocab.to(p_full.device))


def kd_loss(
    exit_logits: torch.Tensor, main_logits: torch.Tensor, draft_vocab: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over rows of ``-sum_v p_full(v) log q_draft(v)`` with ``p_full`` detached; (N, V) inputs
    ((N, K) draft logits over the ids ``draft_vocab``: the sum runs over them)."""
    p_full = _restrict(F.softmax(main_logits.detach(), dim=-1), draft_vocab)
    return -(p_full * F.log_softmax(exit_logits, dim=-1)).sum(-1).mean()


def expected_acceptance(
    exit_logits: torch.Tensor, main_logits: torch.Tensor, draft_vocab: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over rows of ``sum_v min(p_full, q_draft)``: the probability a sampled draft is accepted."""
    p = _restrict(F.softmax(main_logits.detach(), dim=-1), draft_vocab)
    q = F.softmax(exit_logits.detach(), dim=-1)
    return torch.minimum(p, q).sum(-1).mean()


def acceptance_loss(
    exit_logits: torch.Tensor, main_logits: torch.Tensor, draft_vocab: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 - mean_rows sum_v min(p_full, q_draft)`` with ``p_full`` detached: one minus the probability that
    a sampled draft is accepted (the total variation distance between the two); (N, V) inputs ((N, K)
    draft logits over ``draft_vocab``: ``p_full``'s mass outside it cannot be matched)."""
    p = _restrict(F.softmax(main_logits.detach(), dim=-1), draft_vocab)
    return 1.0 - torch.minimum(p, F.softmax(exit_logits, dim=-1)).sum(-1).mean()


def draft_targets(targets: torch.Tensor, draft_vocab: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Token-id targets -> indices into the draft head's outputs; -100 where a target is outside the set."""
    if draft_vocab is None:
        return targets
    index_of = torch.full((vocab_size,), IGNORE_INDEX, dtype=torch.long, device=targets.device)
    index_of[draft_vocab.to(targets.device)] = torch.arange(draft_vocab.numel(), device=targets.device)
    out = targets.clone()
    valid = targets != IGNORE_INDEX
    out[valid] = index_of[targets[valid]]
    return out


def draft_cross_entropy(draft: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not -100; 0 (with a graph) when there are none
    (a batch whose every label lies outside a restricted draft vocabulary)."""
    if bool((targets != IGNORE_INDEX).any()):
        return F.cross_entropy(draft, targets, ignore_index=IGNORE_INDEX)
    return draft.sum() * 0.0


def sgp_loss(
    main_logits: torch.Tensor | None,
    exit_logits: torch.Tensor | None,
    labels: torch.Tensor,
    beta_exit: float = 0.7,
    exit_loss: ExitLoss = "ce",
    kd_weight: float = 0.5,
    draft_vocab: torch.Tensor | None = None,
) -> LossTerms:
    """``loss = loss_main + beta_exit * loss_exit``.

    Args:
        main_logits: (B, T, V) full-path logits, or None when the full path was skipped (SGP with
            ``exit_loss="ce"``: then ``loss = beta_exit * loss_exit`` and ``loss_main`` and the agreement
            metrics are NaN).
        exit_logits: (B, T, V) draft-path logits ((B, T, K) with a restricted head), or None when no
            draft path was run (then ``loss = loss_main`` and the draft metrics are NaN).
        labels: (B, T) token ids, -100 where no loss is taken (unshifted).
        exit_loss: ``ce`` (cross-entropy on the labels), ``kd`` (distillation to the full path),
            ``mix`` (``kd_weight * kd + (1 - kd_weight) * ce``) or ``accept`` (:func:`acceptance_loss`).
        draft_vocab: (K,) token ids of a restricted draft head (module docstring), or None.
    """
    if main_logits is None:
        if exit_logits is None or exit_loss != "ce":
            raise ValueError("without main_logits the exit loss must be 'ce' (kd distils the full path)")
        draft, targets = next_token_targets(exit_logits, labels)
        if targets.numel() == 0:
            raise ValueError("batch has no target tokens (every label is -100): check the data's prompt masking")
        if draft_vocab is None:
            ce_exit = F.cross_entropy(draft, targets)
        else:
            ids = int(max(int(targets.max()), int(draft_vocab.max()))) + 1  # V is unknown without main_logits
            ce_exit = draft_cross_entropy(draft, draft_targets(targets, draft_vocab, ids))
        nan = torch.full((), float("nan"), device=draft.device)
        return LossTerms(loss=beta_exit * ce_exit, loss_main=nan, loss_exit=ce_exit, expected_accept=nan,
                         top1_agree=nan, num_tokens=torch.tensor(targets.numel(), device=targets.device))
    main, targets = next_token_targets(main_logits, labels)
    if targets.numel() == 0:
        raise ValueError("batch has no target tokens (every label is -100): check the data's prompt masking")
    loss_main = F.cross_entropy(main, targets)
    if exit_logits is None:  # plain LoRA fine-tuning: no draft path at all
        nan = torch.full((), float("nan"), device=main.device)
        return LossTerms(loss=loss_main, loss_main=loss_main, loss_exit=nan, expected_accept=nan,
                         top1_agree=nan, num_tokens=torch.tensor(targets.numel(), device=targets.device))
    draft, _ = next_token_targets(exit_logits, labels)
    if exit_loss not in ("ce", "kd", "mix", "accept"):
        raise ValueError(f"exit_loss must be one of ce, kd, mix, accept; got {exit_loss!r}")
    if exit_loss in ("ce", "mix"):
        if draft_vocab is None:
            ce_exit = F.cross_entropy(draft, targets)
        else:
            ce_exit = draft_cross_entropy(draft, draft_targets(targets, draft_vocab, main.shape[-1]))
    if exit_loss == "ce":
        loss_exit = ce_exit
    elif exit_loss == "kd":
        loss_exit = kd_loss(draft, main, draft_vocab)
    elif exit_loss == "accept":
        loss_exit = acceptance_loss(draft, main, draft_vocab)
    else:
        loss_exit = kd_weight * kd_loss(draft, main, draft_vocab) + (1.0 - kd_weight) * ce_exit
    with torch.no_grad():
        accept = expected_acceptance(draft, main, draft_vocab)
        drafted = draft.argmax(-1)
        if draft_vocab is not None:
            drafted = draft_vocab.to(drafted.device)[drafted]
        agree = (drafted == main.argmax(-1)).float().mean()
    return LossTerms(
        loss=loss_main + beta_exit * loss_exit,
        loss_main=loss_main,
        loss_exit=loss_exit,
        expected_accept=accept,
        top1_agree=agree,
        num_tokens=torch.tensor(targets.numel(), device=targets.device),
    )
