"""Stop cleanly on SIGTERM (preemption), SIGINT (Ctrl-C) or SIGUSR1 (SLURM's time-limit warning): save, exit non-zero.

Lightning's own handling exits with status 0 on SIGTERM (its ``SIGTERMException`` is a ``SystemExit``
without a code) and saves nothing, and turns Ctrl-C into an exit without a checkpoint: a scheduler
then believes the job succeeded, and up to ``every_n_train_steps - 1`` steps are lost.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

# SIGUSR1: SLURM's warning before the time limit (scripts/slurm/fit.sbatch: --signal=USR1@90). Handled
# like SIGTERM, so Lightning's own SLURM handler (which checkpoints inside the signal handler) never runs
# during training; the job script requeues the job once every task has saved and exited with 138.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, *((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()))


class GracefulStop(L.Callback):
    """On SIGTERM, SIGINT or SIGUSR1 (SLURM's time-limit warning), finish the current step, stop training,
    and let the checkpoint save it.

    The signal handler only records the signal (nothing is saved inside it: a handler can run in the
    middle of any Python code). At the next training-batch end the trainer is told to stop
    (``trainer.should_stop``); training then ends normally, so :class:`~kangaroo_lit.checkpointing.KangarooCheckpoint`
    saves the final step into ``last.ckpt`` once. ``received`` tells the caller which signal arrived; the
    CLI then exits with ``128 + signal number`` (143 SIGTERM, 130 SIGINT, 138 SIGUSR1), so a scheduler sees
    a failed, resumable job. A second signal of the same kind is not caught: it ends the process at once.
    With several processes the decision is reduced across ranks, so all stop at the same step.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning installed its own SIGTERM handler (which would exit 0 without saving);
        # Lightning puts the original handlers back at teardown.
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        log.warning("received %s: stopping after the current step and saving last.ckpt (again to stop now)",
                    signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # any rank's signal stops every rank (at the same step: this is a collective)
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._previous = {}
