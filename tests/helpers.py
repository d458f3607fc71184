"""Helpers shared by test modules (tests import from here or from conftest.py, never from each other)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from kangaroo_lit.lit_module import KangarooLitModule
from kangaroo_lit.settings import DraftSettings, LoraSettings, LossSettings, OptimizerSettings


def toy_batches(n_batches=4, batch=2, length=12, vocab=300, seed=0):
    """Right-padded batches with a masked prompt, as the data module makes them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (batch, length), generator=g)
        attn = torch.ones_like(ids)
        attn[1, -3:] = 0
        labels = ids.clone()
        labels[:, :4] = -100
        labels[attn == 0] = -100
        out.append({"input_ids": ids, "attention_mask": attn, "labels": labels})
    return out


def make_module(model_dir, *, exit_layer=1, lora=None, draft=None, loss=None, optimizer=None, **kwargs):
    """A built KangarooLitModule on ``model_dir``: LoRA rank 4, lr 1e-2, 1 warm-up step unless given."""
    module = KangarooLitModule(
        base_model=str(model_dir),
        exit_layer=exit_layer,
        lora=lora or LoraSettings(rank=4),
        draft=draft or DraftSettings(),
        loss=loss or LossSettings(),
        optimizer=optimizer or OptimizerSettings(lr=1e-2, warmup_steps=1),
        **kwargs,
    )
    module.configure_model()
    return module


def fit(module, batches, max_steps=3, **trainer_kw):
    """Train ``module`` on ``batches`` (dicts, used as they are) on CPU, nothing written."""
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kw)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def trained_checkpoint(model_dir, root, max_steps=3, **make_module_kw):
    """Train ``make_module(model_dir, **make_module_kw)`` for a few toy steps with the project's checkpoint
    callback; returns ``(module in eval mode, root / "checkpoints" / "last.ckpt")``."""
    from kangaroo_lit.checkpointing import KangarooCheckpoint

    module = make_module(model_dir, **make_module_kw)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, default_root_dir=root,
                        callbacks=[KangarooCheckpoint()], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(toy_batches(max_steps), batch_size=None))
    return module.eval(), root / "checkpoints" / "last.ckpt"


class SendSignalAt(L.Callback):
    """Send ``signum`` to this process at the end of training step ``step`` (a scheduler's preemption)."""

    def __init__(self, step: int, signum: int = 15) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os

        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def exported_artifact(model_dir, root, **make_module_kw):
    """``trained_checkpoint(model_dir, root, **make_module_kw)`` exported to ``root / "artifact"``; returns
    ``(module in eval mode, checkpoint path, artifact directory)``."""
    from kangaroo_lit.artifact import export_checkpoint

    module, ckpt = trained_checkpoint(model_dir, root, **make_module_kw)
    return module, ckpt, export_checkpoint(ckpt, root / "artifact")
