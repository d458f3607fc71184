"""Checkpoints at a fixed place, written atomically.

``<default_root_dir>/checkpoints/last.ckpt`` is where a requeued or resumed run looks (DESIGN §4b), so
the file must never be half-written: each checkpoint is saved to ``<name>.partial`` and renamed over
the old one only once complete. A crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

PARTIAL_SUFFIX = ".partial"


def replace_atomically(src: str | Path, dst: str | Path) -> None:
    """Move a finished checkpoint ``src`` to ``dst``, replacing what was there.

    A file is swapped with one ``os.replace`` (atomic on POSIX). A directory (DeepSpeed's sharded
    checkpoints) cannot be swapped atomically: the old one is renamed aside first and deleted only
    after the new one is in place, so some complete checkpoint exists at every moment.
    """
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        old = dst.with_name(dst.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if dst.exists():
            os.replace(dst, old)
        os.replace(src, dst)
        if old.exists():
            shutil.rmtree(old)
    else:
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)


class KangarooCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with ``save_last`` on, a fixed directory and atomic writes.

    Args:
        dirpath: where checkpoints go; default ``<trainer.default_root_dir>/checkpoints`` (not the
            logger's versioned folder, so a resumed or requeued run finds ``last.ckpt`` at once).
        every_n_train_steps: also checkpoint every this many optimizer steps (a SLURM job killed
            between epochs loses at most that much work).
        Other arguments are ``ModelCheckpoint``'s. ``enable_version_counter`` is always off: an
            existing ``last.ckpt`` is replaced, never joined by ``last-v1.ckpt``.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_last: bool = True,
        save_top_k: int = 1,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: timedelta | None = None,
        save_on_train_epoch_end: bool | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_last=save_last,
            save_top_k=save_top_k,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            train_time_interval=train_time_interval,
            save_on_train_epoch_end=save_on_train_epoch_end,
            verbose=verbose,
            enable_version_counter=False,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        partial = filepath + PARTIAL_SUFFIX
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero:
            replace_atomically(partial, filepath)
        trainer.strategy.barrier("kangaroo_checkpoint_replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
