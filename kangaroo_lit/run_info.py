"""Record what produced a run: package versions, git revision, seed, host and date."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

PACKAGES = ("kangaroo_lit", "torch", "lightning", "transformers", "peft", "tokenizers", "datasets",
            "torchmetrics", "deepspeed", "jsonargparse")


def package_versions() -> dict[str, str | None]:
    """Installed version of each relevant package (None when absent)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision(path: str | Path | None = None) -> str | None:
    """``git describe``-like revision of the source tree (``<sha>[-dirty]``), or None outside git."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_info() -> dict:
    """Everything :class:`RunInfoCallback` records."""
    return {
        "versions": package_versions(),
        "git_revision": git_revision(),
        "seed": os.environ.get("PL_GLOBAL_SEED"),
        "python": platform.python_version(),
        "host": platform.node(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


class RunInfoCallback(L.Callback):
    """Write ``run_info.json`` (versions, git revision, seed) into the run's log directory at start.

    LightningCLI's SaveConfigCallback writes the resolved ``config.yaml`` beside it.

    The hooks run on every process, and only global rank 0 writes: the log directory comes from
    ``Trainer.log_dir``, which is a collective (a broadcast from rank 0). Asked on rank 0 alone (a
    ``rank_zero_only`` hook) it waits forever for the other ranks, which are in a barrier elsewhere:
    a multi-process run then hangs before its first step, with no error (DESIGN §5).
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        log_dir = trainer.log_dir  # a collective: every rank asks
        if not trainer.is_global_zero:
            return
        log_dir = Path(log_dir or trainer.default_root_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "run_info.json").write_text(json.dumps(run_info(), indent=2) + "\n")


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` whose ``save_dir`` may be left out: the CLI then sets it to
    ``trainer.default_root_dir``, so a run's logs follow its root directory (``--trainer.default_root_dir``
    moves both) unless a user sets them apart. Other arguments are ``CSVLogger``'s."""

    def __init__(self, save_dir: str | None = None, name: str | None = "lightning_logs",
                 version: int | str | None = None, prefix: str = "", flush_logs_every_n_steps: int = 100) -> None:
        super().__init__(save_dir if save_dir is not None else ".", name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
