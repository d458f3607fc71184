"""The random state that LoRA dropout draws from, saved with every checkpoint for an exact resume."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class RngStateCallback(L.Callback):
    """Save torch's RNG state in each checkpoint; restore it right before the first resumed training step.

    Restoring it then, not at load time, makes the resumed run draw the same dropout masks as the
    uninterrupted one whatever ran in between (sanity checks, validation, dataloader start-up). That
    holds because nothing between a checkpoint and the next training step draws from the global RNG
    in the uninterrupted run either: validation runs in eval mode (no dropout) and the data module's
    loaders draw their worker seeds from their own generator (``InstructionDataModule``), not from the
    global one. A loader that did (a plain ``DataLoader``) would make a resume at an epoch boundary
    inexact: its new iterator draws once in the uninterrupted run before the next step.

    The LightningModule adds this callback itself (``configure_callbacks``), so every Trainer has it.
    Only torch's generators are kept (they drive LoRA dropout); tensors keep the checkpoint loadable
    with ``torch.load(weights_only=True)``.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        torch.set_rng_state(self._pending["torch"])
        if "cuda" in self._pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda"])
        self._pending = None
