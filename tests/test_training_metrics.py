"""Training figures keep their meaning when the full path is skipped (SGP + ce): ``train/loss`` is the full
objective or absent, ``train/loss_exit`` is always the draft's loss, and a NaN is reported as computed
(issue 18, point 11)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from kangaroo_lit.lit_module import NonFiniteLossError
from kangaroo_lit.settings import LossSettings
from tests.helpers import fit, make_module, toy_batches

SKIPPING = LossSettings(detach_exit=True, exit_loss="ce", beta_exit=0.7)


class RecordLogged(L.Callback):
    """Every step's logged training metrics (what a CSV logger would write)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("train/")})


def logged(module, max_steps=2):
    record = RecordLogged()
    fit(module, toy_batches(max_steps), max_steps=max_steps, callbacks=[record])
    return record.steps


def test_without_the_full_path_train_loss_is_not_logged_and_loss_exit_is(tiny_llama_dir, one_thread):
    module = make_module(tiny_llama_dir, loss=SKIPPING)
    for step in logged(module):
        assert "train/loss" not in step and "train/loss_main" not in step  # beta * loss_exit is not the objective
        assert step["train/loss_exit"] > 0


@pytest.mark.parametrize("loss", [LossSettings(exit_loss="kd"), LossSettings(exit_loss="ce", detach_exit=False)],
                         ids=["sgp-kd", "joint-ce"])
def test_with_the_full_path_train_loss_is_the_full_objective(tiny_llama_dir, one_thread, loss):
    module = make_module(tiny_llama_dir, loss=loss)
    for step in logged(module):
        expected = step["train/loss_main"] + loss.beta_exit * step["train/loss_exit"]
        assert step["train/loss"] == pytest.approx(expected, rel=1e-5)


class Poison(L.Callback):
    """Fill the adapter's output projection with NaN: the draft path's loss turns NaN."""

    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.model.adapter.self_attn.o_proj.weight.fill_(float("nan"))


def test_a_nan_under_the_skip_reports_the_loss_that_was_computed(tiny_llama_dir, one_thread):
    module = make_module(tiny_llama_dir, loss=SKIPPING)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Poison()])
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(module, DataLoader(toy_batches(1), batch_size=None))
    message = str(info.value)
    assert "loss_main" not in message  # never computed: not a "loss_main=nan" to chase
    assert "beta_exit*loss_exit=nan" in message and "loss_exit=nan" in message


def test_a_nan_with_the_full_path_reports_every_term(tiny_llama_dir, one_thread):
    module = make_module(tiny_llama_dir, loss=LossSettings(exit_loss="kd"))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Poison()])
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(module, DataLoader(toy_batches(1), batch_size=None))
    message = str(info.value)
    assert "loss=nan" in message and "loss_exit=nan" in message and "loss_main=" in message


def write_log(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return str(path)


def test_the_experiment_plots_the_same_quantity_for_every_run(tmp_path):
    from scripts.run_sgp_experiment import loss_curves

    # SGP + ce skips the full path: loss_exit only; joint logs the full objective too
    sgp = write_log(tmp_path / "sgp.csv", ["step", "train/loss_exit", "val/loss"], [[0, 4.1, ""], [1, 3.9, 7.0]])
    joint = write_log(tmp_path / "joint.csv", ["step", "train/loss", "train/loss_main", "train/loss_exit", "val/loss"],
                      [[0, 7.0, 4.0, 4.2, ""], [1, 6.8, 3.9, 4.0, 6.9]])
    curves = loss_curves([{"name": "sgp", "train": {"csv": sgp}}, {"name": "joint", "train": {"csv": joint}}])
    labels = [label for label, *_ in curves]
    assert labels == ["sgp train/loss_exit", "joint train/loss_exit", "sgp val/loss", "joint val/loss"]
    assert curves[1][2] == [4.2, 4.0]
