"""Typed settings: resume policies by type, checkpoint reconciliation, the optimizer and its schedule."""

import dataclasses
import inspect
import math

import pytest
import torch

from kangaroo_lit.checkpointing import reconcile_settings
from kangaroo_lit.lit_module import KangarooLitModule
from kangaroo_lit.optim import build_optimizer, build_scheduler
from kangaroo_lit.settings import (
    DecodingSettings,
    KangarooSettings,
    LoraSettings,
    OptimizerSettings,
    ResumePolicy,
    resume_policy,
    structure_of,
)


def test_module_arguments_are_exactly_the_settings_fields():
    params = [p for p in inspect.signature(KangarooLitModule.__init__).parameters if p != "self"]
    assert params == [f.name for f in dataclasses.fields(KangarooSettings)]


def test_resume_policy_follows_the_types():
    policies = resume_policy()
    structural = {k for k, p in policies.items() if p == ResumePolicy.STRUCTURAL}
    assert structural == {"base_model", "exit_layer", "lora.rank", "lora.alpha", "lora.target_modules",
                          "lora.scope", "draft.exit_head", "draft.vocab_size",
                          "draft.adapter_mlp"}
    assert {k for k, p in policies.items() if p == ResumePolicy.FREE} == {
        f"decoding.{f.name}" for f in dataclasses.fields(DecodingSettings)}
    assert policies["lora.dropout"] == policies["optimizer.lr"] == policies["loss.beta_exit"] == ResumePolicy.FIT


def test_settings_round_trip_through_plain_dicts():
    settings = KangarooSettings(base_model="m", exit_layer=2, lora=LoraSettings(rank=4, scope="shared"),
                                optimizer=OptimizerSettings(betas=(0.8, 0.9)))
    plain = settings.to_dict()
    assert plain["optimizer"]["betas"] == [0.8, 0.9]  # lists: loadable with torch.load(weights_only=True)
    assert KangarooSettings.from_dict(plain) == settings
    with pytest.raises(ValueError, match="unknown setting.*lora.rnak"):
        KangarooSettings.from_dict({**plain, "lora": {**plain["lora"], "rnak": 3}})


def test_structure_ignores_lora_details_without_lora():
    a = KangarooSettings(base_model="m", exit_layer=1, lora=LoraSettings(rank=0, scope="shared"))
    b = KangarooSettings(base_model="m", exit_layer=1, lora=LoraSettings(rank=0, target_modules=["q_proj"]))
    assert structure_of(a) == structure_of(b)
    assert structure_of(a) != structure_of(dataclasses.replace(a, lora=LoraSettings(rank=2)))


@pytest.mark.parametrize("bad, match", [
    (lambda: DecodingSettings(threshold=2), r"decoding.threshold must be in \[0, 1\], got 2"),
    (lambda: LoraSettings(rank=-1), "lora.rank must be >= 0"),
    (lambda: OptimizerSettings(schedule="step"), "optimizer.schedule must be one of"),
    (lambda: KangarooSettings(base_model="m", exit_layer=1, loss=dataclasses.replace(
        KangarooSettings.__dataclass_fields__["loss"].default_factory(), beta_exit=0.0)), "beta_exit=0 trains only"),
])
def test_bad_settings_are_refused_with_their_name(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_reconcile_adopts_defaults_notes_free_changes_and_refuses_the_rest():
    defaults = KangarooLitModule.default_settings().to_dict()
    saved = KangarooSettings(base_model="m", exit_layer=3, lora=LoraSettings(rank=4, dropout=0.2),
                             decoding=DecodingSettings(threshold=0.4)).to_dict()
    given = KangarooSettings(base_model="m", exit_layer=2, lora=LoraSettings(rank=16, dropout=0.3),
                             decoding=DecodingSettings(threshold=0.9)).to_dict()
    fit = reconcile_settings(given, saved, defaults, fitting=True)
    assert fit.adopt == {}  # every differing setting was given a non-default value
    assert sorted(c.split(":")[0] for c in fit.conflicts) == ["model.exit_layer", "model.lora.dropout",
                                                               "model.lora.rank"]
    assert fit.notes == ["model.decoding.threshold=0.9 (checkpoint has 0.4)"]
    validate = reconcile_settings(given, saved, defaults, fitting=False)
    assert sorted(c.split(":")[0] for c in validate.conflicts) == ["model.exit_layer", "model.lora.rank"]
    assert "model.lora.dropout=0.3 (checkpoint has 0.2)" in validate.notes
    # left at the defaults: everything is taken from the checkpoint
    adopted = reconcile_settings(defaults, saved, defaults, fitting=True)
    assert adopted.conflicts == [] and adopted.adopt["lora.rank"] == 4 and adopted.adopt["exit_layer"] == 3


def _closed_form(step, warmup, total, ratio, schedule):
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return ratio + (1 - ratio) * shape


@pytest.mark.parametrize("warmup, total, schedule", [(3, 40, "cosine"), (1, 10, "linear"), (0, 12, "cosine"),
                                                     (5, 5, "cosine"), (4, 9, "constant"), (20, 300, "linear")])
def test_schedule_is_warmup_then_the_closed_form_decay(warmup, total, schedule):
    settings = OptimizerSettings(lr=0.1, warmup_steps=warmup, schedule=schedule, min_lr_ratio=0.2)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], settings)
    scheduler = build_scheduler(optimizer, settings, total)
    for step in range(total):
        expected = 0.1 * _closed_form(step, warmup, total, 0.2, schedule)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), step
        optimizer.step()
        scheduler.step()


def test_weight_decay_only_on_matrices_and_frozen_parameters_refused():
    matrix, bias = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([matrix, bias], OptimizerSettings(weight_decay=0.1))
    assert [(g["weight_decay"], len(g["params"])) for g in optimizer.param_groups] == [(0.1, 1), (0.0, 1)]
    with pytest.raises(ValueError, match="frozen parameter"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2), requires_grad=False)], OptimizerSettings())
