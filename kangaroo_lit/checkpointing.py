"""Checkpoints: written atomically at a fixed place, and checked against the run that loads them.

``<default_root_dir>/checkpoints/last.ckpt`` is where a requeued or resumed run looks (DESIGN §4b), so
the file must never be half-written. Every checkpoint file goes through :class:`AtomicCheckpointIO`
(Lightning's ``CheckpointIO`` plugin interface): it is written to ``<name>.partial``, flushed to disk and
renamed over the old one only once complete. DeepSpeed writes a directory through its own engine, not
through ``CheckpointIO``; :class:`KangarooDeepSpeedStrategy` gives those directories the same guarantee.

A checkpoint records the run's settings (:data:`SETTINGS_KEY`); :func:`check_checkpoint_fits` refuses one
made with another structure, and :func:`reconcile_settings` decides, setting by setting, what the
command line of a resumed run may change (policies in :mod:`kangaroo_lit.settings`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy

from kangaroo_lit.errors import CheckpointError, ConfigError
from kangaroo_lit.settings import KangarooSettings, ResumePolicy, flatten, resume_policy, structure_of

PARTIAL_SUFFIX = ".partial"
# Where a checkpoint keeps the run's settings (a plain nested dict: loadable with weights_only=True).
SETTINGS_KEY = "kangaroo_settings"


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not belong to this model configuration (other base, exit layer, LoRA, ...)."""


class ExistingRunError(CheckpointError):
    """A new run would overwrite a trained run's ``last.ckpt``."""


class CheckpointConfigMismatch(CheckpointError):
    """Settings given for a resumed run disagree with the checkpoint's."""


# --------------------------------------------------------------------------------------------------
# Atomic writes


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<path>.partial``, ``fsync``, then rename over ``path``: never a torn checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        replace_atomically(partial, path)


ZERO3_REFUSAL = (
    "DeepSpeed ZeRO stage 3 is not supported: the frozen base is loaded with from_pretrained inside "
    "configure_model, which Lightning runs under deepspeed.zero.Init at stage 3, so the parameters are "
    "partitioned before the weights arrive (an open Lightning issue) and the base may train from "
    "uninitialised weights; the Kangaroo adapter and a trainable exit head are also initialised by copying "
    "base weights, which are then empty placeholders; and decoding checks would need every rank in every "
    "forward. Use ZeRO-2 instead (--config configs/deepspeed-zero2.yaml): the base is frozen, so it has no "
    "gradients or optimizer state for stage 3 to shard, and ZeRO-2 already shards those of the trainable "
    "parts; for a base too large for one GPU in bfloat16, ZeRO-3 is not available in this project yet"
)


class KangarooDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` whose checkpoint directories are replaced atomically.

    Every rank writes its shards into ``<path>.partial``; once all are done, rank 0 swaps the
    directory into place (:func:`replace_atomically`).

    ZeRO stage 3 is refused (:data:`ZERO3_REFUSAL` says why and what to use instead), whether asked for
    with ``stage: 3`` or in a DeepSpeed ``config``, in the first step of ``fit``/``validate``/``test``/
    ``predict`` (``setup_environment``): before the CUDA check, the process group, the data and the
    model. Not in the constructor: LightningCLI builds the strategy inside jsonargparse, which turns any
    error there into a page about type unions instead of this one-line message.
    """

    def setup_environment(self) -> None:
        if self.zero_stage_3:
            raise ConfigError(ZERO3_REFUSAL)
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None) -> None:
        partial = str(filepath) + PARTIAL_SUFFIX
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("kangaroo_checkpoint_written")
        if self.is_global_zero:
            replace_atomically(partial, filepath)
        self.barrier("kangaroo_checkpoint_replaced")


class KangarooCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with ``save_last`` on, a fixed directory and atomic writes.

    Args:
        dirpath: where checkpoints go; default ``<trainer.default_root_dir>/checkpoints`` (not the
            logger's versioned folder, so a resumed or requeued run finds ``last.ckpt`` at once).
        every_n_train_steps: also checkpoint every this many optimizer steps (a SLURM job killed
            between epochs loses at most that much work).
        save_top_k: best checkpoints kept by ``monitor``; default 1 with a monitor, else 0 (``last.ckpt``
            alone: an unranked "best" file would only duplicate it).
        Other arguments are ``ModelCheckpoint``'s. ``enable_version_counter`` is always off: an
            existing ``last.ckpt`` is replaced, never joined by ``last-v1.ckpt``.

    Two guarantees on top of ``ModelCheckpoint``:

    * a new ``fit`` (no ``ckpt_path``) into a directory that already holds ``last.ckpt`` is refused
      before anything is written (:class:`ExistingRunError`): resume it or pick a new directory;
    * the end of training is always saved, once, whatever ``every_n_train_steps`` is (Lightning skips
      the end-of-epoch save when a step interval is set, so ``last.ckpt`` could lag the final step).

    When the strategy writes files through Lightning's default ``TorchCheckpointIO``, it is swapped
    for :class:`AtomicCheckpointIO` at setup (a user's own ``CheckpointIO`` plugin is left alone).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_last: bool = True,
        save_top_k: int | None = None,
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
            # Without a metric to rank by, a "top-k" file would only duplicate last.ckpt.
            save_top_k=(1 if monitor else 0) if save_top_k is None else save_top_k,
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
        self._saved_step: int | None = None
        strategy = trainer.strategy
        if not isinstance(strategy, DeepSpeedStrategy) and type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not in setup: the checkpoint being resumed (trainer.ckpt_path) is known only once it
        # is restored (after on_fit_start under DeepSpeed), and nothing has been written yet.
        last = self.last_path
        if trainer.ckpt_path is None and os.path.exists(last):
            raise ExistingRunError(
                f"{last} already holds a trained run; a new fit would replace it. Resume it with "
                f"--ckpt_path {last}, or start the new run elsewhere with --trainer.default_root_dir <new dir>"
            )

    @property
    def last_path(self) -> str:
        """``<dirpath>/last.ckpt``."""
        return os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._saved_step = trainer.global_step
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the final state into ``last.ckpt`` unless the last save already holds this step."""
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._saved_step != trainer.global_step and not trainer.sanity_checking:
            trainer.save_checkpoint(self.last_path)


# --------------------------------------------------------------------------------------------------
# Does a checkpoint fit this run?


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file of this project safely (``weights_only=True``), on the CPU.

    Raises:
        CheckpointError: for a remote URL (download it first: a remote file would otherwise be
            unpickled without ``weights_only``), a missing path, or a file that is not a complete
            checkpoint of this project (truncated, random bytes, text), naming the file.
    """
    text = str(path)
    if "://" in text:
        raise CheckpointError(f"{text}: remote checkpoints are not loaded; download it and pass the local path")
    path = Path(text)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, KeyError, ... for broken files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: not a (complete) checkpoint of this project: torch could not read it ({reason[:160]})"
        ) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this project (holds a {type(checkpoint).__name__})")
    return checkpoint


# What DeepSpeed's engine adds to a checkpoint besides Lightning's own ``client_state`` (deepspeed 0.19
# ``DeepSpeedEngine._common_checkpoint_state``); the rest of the file is what Lightning saved.
DEEPSPEED_ENGINE_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps", "global_steps",
    "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "universal_checkpoint_info",
    "ds_config", "ds_version",
})


def load_deepspeed_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint directory written by :class:`KangarooDeepSpeedStrategy` (ZeRO-2), as a Lightning checkpoint dict.

    Lightning saves through ``DeepSpeedEngine.save_checkpoint(path, client_state=..., tag="checkpoint")``:
    ``<path>/checkpoint/mp_rank_00_model_states.pt`` holds the module's state dict under ``module``
    (with ``exclude_frozen_parameters`` only the trainable tensors, in the engine's dtype: bfloat16 under
    ``bf16-mixed``; the fp32 master copies stay sharded in the ``*_optim_states.pt`` files) and Lightning's
    own entries (``kangaroo_settings``, ``global_step``, loops, callbacks, ...) beside DeepSpeed's. It is
    read with ``weights_only=True``. The result has Lightning's layout: the client state plus
    ``state_dict`` = the trainable tensors (the names DeepSpeed's optimizer owns, ``param_shapes``,
    when recorded; else every non-buffer tensor of ``module``).

    Raises:
        CheckpointError: a directory that is not such a checkpoint (naming what is missing), or a ZeRO-3
            one (its weights are sharded across per-rank files).
    """
    path = Path(path)
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else "checkpoint"
    states = path / tag / "mp_rank_00_model_states.pt"
    if not states.is_file():
        if list((path / tag).glob("zero_pp_rank_*_model_states.pt")):
            raise CheckpointError(f"{path}: a DeepSpeed ZeRO-3 checkpoint (weights sharded across ranks); "
                                  "this project trains and reads ZeRO-2 checkpoints only")
        raise CheckpointError(f"{path}: a directory, but not a DeepSpeed checkpoint of this project "
                              f"(no {tag}/mp_rank_00_model_states.pt)")
    state = load_checkpoint_file(states)
    module = state.get("module")
    if not isinstance(module, dict):
        raise CheckpointError(f"{states}: no module state dict in this DeepSpeed checkpoint")
    owned = [name for group in state.get("param_shapes") or () for name in group]
    buffers = set(state.get("buffer_names") or ())
    keep = set(owned) if owned else {k for k in module if k not in buffers}
    keep |= {k for k in module if k.endswith(".draft_vocab")}  # a restricted draft head's token ids (a buffer)
    checkpoint = {k: v for k, v in state.items() if k not in DEEPSPEED_ENGINE_KEYS}
    checkpoint["state_dict"] = {k: v for k, v in module.items() if k in keep and torch.is_tensor(v)}
    return checkpoint


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint of this project from a file (:func:`load_checkpoint_file`) or a DeepSpeed directory
    (:func:`load_deepspeed_checkpoint`)."""
    if "://" not in str(path) and Path(path).is_dir():
        return load_deepspeed_checkpoint(path)
    return load_checkpoint_file(path)


def saved_settings(checkpoint: dict[str, Any], source: str = "the checkpoint") -> KangarooSettings:
    """The settings a checkpoint of this project was made with.

    Raises:
        CheckpointMismatchError: when the checkpoint records none (not made by this project's module).
    """
    values = checkpoint.get(SETTINGS_KEY)
    if not isinstance(values, dict):
        raise CheckpointMismatchError(
            f"{source} holds no '{SETTINGS_KEY}': it was not written by this version of kangaroo_lit's "
            "KangarooLitModule"
        )
    return KangarooSettings.from_dict(values)


def check_checkpoint_fits(
    checkpoint: dict[str, Any], settings: KangarooSettings, expected_keys: dict[str, torch.Size]
) -> None:
    """Refuse a checkpoint whose structure or tensors differ from this model's.

    Args:
        checkpoint: the loaded checkpoint dict.
        settings: the settings of the model loading it.
        expected_keys: ``{state_dict key: shape}`` of this model's trainable tensors.

    Raises:
        CheckpointMismatchError: listing every structural setting and tensor key that differs.
    """
    problems = []
    saved = structure_of(saved_settings(checkpoint))
    current = structure_of(settings)
    for key, value in current.items():
        if saved.get(key) != value:
            problems.append(f"{key}: checkpoint {saved.get(key)!r}, this model {value!r}")
    # DeepSpeed restores the weights itself and hands over a checkpoint without "state_dict":
    # then only the recorded structure can be compared.
    if "state_dict" in checkpoint:
        got = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
        missing = sorted(set(expected_keys) - set(got))
        unexpected = sorted(set(got) - set(expected_keys))
        reshaped = sorted(k for k in set(expected_keys) & set(got) if tuple(expected_keys[k]) != got[k])
        for label, keys in (("missing from checkpoint", missing), ("not in this model", unexpected)):
            if keys:
                more = " ..." if len(keys) > 8 else ""
                problems.append(f"{len(keys)} tensor(s) {label}: {', '.join(keys[:8])}{more}")
        for k in reshaped[:8]:
            problems.append(f"shape of {k}: checkpoint {got[k]}, this model {tuple(expected_keys[k])}")
    if problems:
        raise CheckpointMismatchError("checkpoint does not match this model configuration:\n  " + "\n  ".join(problems))


@dataclass
class Reconciliation:
    """What a resumed run's command line does with each setting the checkpoint recorded.

    ``adopt``: left at its default, so the checkpoint's value is taken (``--ckpt_path`` alone resumes
    the same run). ``notes``: changed where changing is allowed (said out loud). ``conflicts``: changed
    where it is not.
    """

    adopt: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


def reconcile_settings(given: dict[str, Any], saved: dict[str, Any], defaults: dict[str, Any],
                       fitting: bool) -> Reconciliation:
    """Compare a run's settings with a checkpoint's, by each setting's :class:`~kangaroo_lit.settings.ResumePolicy`.

    Args:
        given / saved / defaults: nested or flat (dotted) settings of the run, the checkpoint and the
            module's defaults.
        fitting: the run resumes ``fit`` (then only decoding settings may change).
    """
    given, saved, defaults = flatten(given), flatten(saved), flatten(defaults)
    policies = resume_policy()
    result = Reconciliation()
    for key, saved_value in saved.items():
        if key not in given or _same(given[key], saved_value):
            continue
        value = given[key]
        if key in defaults and _same(value, defaults[key]):
            result.adopt[key] = saved_value
            continue
        policy = policies.get(key, ResumePolicy.FIT)
        if policy == ResumePolicy.FREE or (policy == ResumePolicy.FIT and not fitting):
            result.notes.append(f"model.{key}={value!r} (checkpoint has {saved_value!r})")
        else:
            result.conflicts.append(f"model.{key}: checkpoint has {saved_value!r}, this run asks for {value!r}")
    return result


def _same(a: Any, b: Any) -> bool:
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return plain(a) == plain(b)
