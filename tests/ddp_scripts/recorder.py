"""A callback that records what each rank trained on, for tests that compare runs across processes.

Per rank it writes ``<out>/record.rank<R>.json`` (world size, accumulation, the schedule's step count,
and per micro-batch: the loss, the learning rate and the rows as token lists) and
``<out>/weights.rank<R>.pt`` (the trainable tensors at the end of training). Used both inside the
2-process script (``tests/ddp_scripts/fit_ddp.py``) and in-process by the 1-process reference run.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class Crash(RuntimeError):
    """The simulated failure of :class:`Recorder` (``crash_at_step``)."""


class Recorder(L.Callback):
    """Record losses, learning rates and batches per micro-batch; optionally crash at a step.

    Args:
        out: folder for this run's records (one file per rank).
        crash_at_step: raise :class:`Crash` at the end of the training batch that completes this
            optimizer step (every rank raises at the same step), after writing the records.
        sigterm_rank / sigterm_at_step: send SIGTERM to that rank's own process after that step.
    """

    def __init__(self, out: str, crash_at_step: int | None = None, sigterm_rank: int | None = None,
                 sigterm_at_step: int | None = None) -> None:
        self.out = out
        self.crash_at_step = crash_at_step
        self.sigterm_rank, self.sigterm_at_step = sigterm_rank, sigterm_at_step
        self.data: dict = {"batches": {}}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.data.update(world_size=trainer.world_size, rank=trainer.global_rank,
                         accumulate=trainer.accumulate_grad_batches,
                         estimated_stepping_batches=trainer.estimated_stepping_batches,
                         start_step=trainer.global_step)
        self.data["requires_grad"] = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        # Lightning hands over the loss divided by accumulate_grad_batches (what backward saw).
        loss = outputs["loss"].item() * trainer.accumulate_grad_batches
        self.data["batches"][f"{trainer.current_epoch}:{batch_idx}"] = {
            "loss": loss, "lr": self._lr, "rows": rows, "step_after": trainer.global_step}
        if self.crash_at_step is not None and trainer.global_step == self.crash_at_step:
            self._dump(pl_module)
            raise Crash(f"simulated crash at step {trainer.global_step} on rank {trainer.global_rank}")
        if trainer.global_rank == self.sigterm_rank and trainer.global_step == self.sigterm_at_step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler stopping this one process

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.data["val"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(pl_module)  # again: validation after the last step comes after on_train_end

    def _dump(self, pl_module: L.LightningModule) -> None:
        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        rank = pl_module.trainer.global_rank
        (out / f"record.rank{rank}.json").write_text(json.dumps(self.data))
        weights = {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}
        torch.save(weights, out / f"weights.rank{rank}.pt")
