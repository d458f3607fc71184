"""AdamW over exactly the trainable parameters, with a warm-up then decay schedule from torch's schedulers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from kangaroo_lit.settings import OptimizerSettings


def build_optimizer(parameters: Iterable[torch.nn.Parameter], settings: OptimizerSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights and biases get none).

    Args:
        parameters: the parameters to train (those with ``requires_grad``; others are refused).

    Raises:
        ValueError: when there is nothing to train, or a parameter does not require grad.
    """
    decay, no_decay = [], []
    for p in parameters:
        if not p.requires_grad:
            raise ValueError("build_optimizer got a frozen parameter: pass only trainable ones")
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("nothing to train: no parameter requires grad")
    groups = [{"params": decay, "weight_decay": settings.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas))


def build_scheduler(optimizer: torch.optim.Optimizer, settings: OptimizerSettings, total_steps: int) -> LRScheduler:
    """Per-step schedule: the learning-rate factor at step ``s`` (0-based) of ``total_steps`` is

    * ``(s + 1) / warmup`` during warm-up (so the first step already trains);
    * then, with ``t = s - warmup`` of ``T = total_steps - warmup``: ``cosine`` ``m + (1 - m)(1 + cos(pi t / T)) / 2``,
      ``linear`` ``m + (1 - m)(1 - t / T)``, ``constant`` 1, where ``m = min_lr_ratio``.

    Built from torch's ``LinearLR``, ``CosineAnnealingLR``, ``ConstantLR`` and ``SequentialLR`` (equal to
    that formula to 1e-15, tested), so the state resumes with the optimizer like any torch scheduler.
    """
    total = max(1, int(total_steps))
    warmup = min(settings.warmup_steps, total)
    decay_steps = max(1, total - warmup)
    if settings.schedule == "cosine":
        floor = settings.lr * settings.min_lr_ratio
        decay: LRScheduler = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=floor)
    elif settings.schedule == "linear":
        decay = LinearLR(optimizer, start_factor=1.0, end_factor=settings.min_lr_ratio, total_iters=decay_steps)
    else:
        decay = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return decay
    ramp = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return SequentialLR(optimizer, [ramp, decay], milestones=[warmup])
