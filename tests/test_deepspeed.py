"""DeepSpeed on a CPU machine: what can be checked without CUDA.

DeepSpeed runs only on CUDA (DESIGN §5), so here: the ZeRO-2 overlay builds its strategy and the
DeepSpeed config Lightning derives from it (stage, bf16, frozen parameters out of checkpoints); ZeRO-3
is refused up front, with the reason; the optimizer holds exactly the trainable parameters (what
DeepSpeed's ``model_parameters`` filter passes on); the LoRA switch of the draft path never changes
``requires_grad`` (ZeRO records it once, when it builds its optimizer); and ``export`` reads a
checkpoint directory laid out as deepspeed 0.19.8 writes it (``DeepSpeedEngine._save_checkpoint``).
Fit, save, resume and export on a GPU are in ``scripts/gpu_suite.sh``.
"""

from __future__ import annotations

from collections import OrderedDict

import lightning as L
import pytest
import torch
import yaml

from kangaroo_lit.checkpointing import (
    ZERO3_REFUSAL,
    KangarooDeepSpeedStrategy,
    load_checkpoint,
    load_checkpoint_file,
)
from kangaroo_lit.cli import main, run_lightning
from kangaroo_lit.errors import CheckpointError, ConfigError
from kangaroo_lit.settings import DecodingSettings, DraftSettings, LoraSettings, LossSettings
from tests.conftest import REPO_ROOT
from tests.helpers import fit, make_module, toy_batches, trained_checkpoint

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = REPO_ROOT / "configs"
DOLLY_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "dolly-tiny.jsonl"


def cpu_args(tmp_path, model_dir):
    """sgp.yaml with the tiny model, local data and the CPU substituted (the strategy stays DeepSpeed)."""
    return ["--model.base_model", str(model_dir), "--model.exit_layer", "1", "--model.dtype", "float32",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.default_root_dir", str(tmp_path),
            "--data.data_path", str(DOLLY_FIXTURE), "--data.num_workers", "0", "--data.batch_size", "2",
            "--data.cache_dir", str(tmp_path / "cache"), "--data.max_length", "64"]


def lightning_deepspeed_config(strategy: KangarooDeepSpeedStrategy) -> dict:
    """The config dict Lightning hands to ``deepspeed.initialize``: it completes it (precision, ...) in
    ``setup``, which needs CUDA; here the same private step is called directly (it fails loudly if
    Lightning renames it)."""
    strategy._format_config()
    return strategy.config


# --------------------------------------------------------------------------------------------------
# ZeRO-2 overlay and ZeRO-3 refusal


def test_zero2_overlay_builds_strategy_and_deepspeed_config(tmp_path, tiny_llama_dir):
    overlay = CONFIGS / "deepspeed-zero2.yaml"  # run=False: no subcommand, the Trainer is only built
    cli = run_lightning(["--config", str(CONFIGS / "sgp.yaml"), "--config", str(overlay),
                         *cpu_args(tmp_path, tiny_llama_dir)], run=False)
    strategy = cli.trainer.strategy
    assert type(strategy) is KangarooDeepSpeedStrategy
    assert strategy.exclude_frozen_parameters is True  # frozen base weights stay out of checkpoints
    assert cli.trainer.precision == "bf16-mixed"
    config = lightning_deepspeed_config(strategy)
    assert config["zero_optimization"]["stage"] == 2
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["zero_allow_untested_optimizer"] is True  # the module's own AdamW is used
    assert not strategy.zero_stage_3
    # the YAML says exactly this (the CLI did not add or drop anything)
    init_args = yaml.safe_load((CONFIGS / "deepspeed-zero2.yaml").read_text())["trainer"]["strategy"]["init_args"]
    assert init_args == {"stage": 2, "exclude_frozen_parameters": True}


@pytest.mark.parametrize("kwargs", [{"stage": 3}, {"config": {"zero_optimization": {"stage": 3}}}],
                         ids=["stage", "config"])
def test_zero3_is_refused_before_anything_is_set_up(tiny_llama_dir, kwargs):
    strategy = KangarooDeepSpeedStrategy(**kwargs)
    module = make_module(tiny_llama_dir)
    with pytest.raises(ConfigError) as err:
        # on CPU: refused before Lightning's own "DeepSpeed needs CUDA" check and before any data or model
        fit(module, toy_batches(1), max_steps=1, strategy=strategy, devices=1)
    message = str(err.value)
    assert message == ZERO3_REFUSAL
    assert "from_pretrained inside configure_model" in message and "deepspeed.zero.Init" in message
    assert "Use ZeRO-2 instead (--config configs/deepspeed-zero2.yaml)" in message
    assert module.global_step == 0


def test_zero3_overlay_stops_the_cli_with_the_reason(tmp_path, tiny_llama_dir, capsys):
    code = main(["fit", "--config", str(CONFIGS / "sgp.yaml"), "--config", str(CONFIGS / "deepspeed-zero3.yaml"),
                 *cpu_args(tmp_path, tiny_llama_dir)])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert f"error: {ZERO3_REFUSAL}" in err and "Traceback" not in err
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------
# The optimizer's parameters and the requires_grad set


def attach_trainer(module, max_steps=10):
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    return trainer


@pytest.mark.parametrize("variant", ["draft-lora", "shared-lora", "trainable-head", "no-lora", "lora-only"])
def test_optimizer_groups_are_exactly_the_trainable_parameters(tiny_llama_dir, variant):
    kw = {
        "draft-lora": {},
        "shared-lora": {"lora": LoraSettings(rank=4, scope="shared")},
        "trainable-head": {"draft": DraftSettings(exit_head="trainable")},
        "no-lora": {"lora": LoraSettings(rank=0)},
        "lora-only": {"loss": LossSettings(beta_exit=0.0, detach_exit=False),  # adapter frozen
                      "lora": LoraSettings(rank=4, scope="shared")},
    }[variant]
    module = make_module(tiny_llama_dir, **kw)
    attach_trainer(module)
    optimizer = module.configure_optimizers()["optimizer"]
    in_groups = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups})  # no parameter twice
    # what Lightning's DeepSpeedStrategy hands to deepspeed.initialize as model_parameters
    deepspeed_filter = [p for p in module.parameters() if p.requires_grad]
    assert {id(p) for p in in_groups} == {id(p) for p in deepspeed_filter}
    names = {id(p): n for n, p in module.named_parameters()}
    chosen = sorted(names[id(p)] for p in in_groups)
    assert all("lora_" in n or ".adapter." in n or "exit_proj" in n for n in chosen), chosen
    assert any("exit_proj" in n for n in chosen) == (variant == "trainable-head")
    assert any("lora_" in n for n in chosen) == (variant != "no-lora")
    assert any(".adapter." in n for n in chosen) == (variant != "lora-only")
    assert not any(p.requires_grad for n, p in module.named_parameters() if "base_layer" in n or "embed" in n)


class RequiresGradWatcher(L.Callback):
    """Records the set of parameter names with requires_grad at every batch start/end and inside every
    forward of the shallow layers (both paths), the adapter and the exit head."""

    def __init__(self):
        self.seen: list[tuple[str, frozenset]] = []
        self.handles = []

    def snapshot(self, module, where):
        self.seen.append((where, frozenset(n for n, p in module.named_parameters() if p.requires_grad)))

    def on_fit_start(self, trainer, pl_module):
        model = pl_module.model
        watched = [*model.layers[: model.exit_layer + 1], model.adapter]
        for index, layer in enumerate(watched):
            self.handles.append(layer.register_forward_pre_hook(
                lambda mod, args, i=index: self.snapshot(pl_module, f"forward {i}")))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snapshot(pl_module, "batch start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.snapshot(pl_module, "batch end")

    def on_fit_end(self, trainer, pl_module):
        for handle in self.handles:
            handle.remove()


def test_lora_switch_never_changes_requires_grad_during_a_fit(tiny_llama_dir):
    """Draft-scoped LoRA switches LoRA off for the full path in every forward: the trainable set stays put."""
    # kd: the full path runs in training (with a label loss SGP skips it, and the switch with it)
    module = make_module(tiny_llama_dir, lora=LoraSettings(rank=4, scope="draft"), loss=LossSettings(exit_loss="kd"))
    initial = frozenset(n for n, p in module.named_parameters() if p.requires_grad)
    watcher = RequiresGradWatcher()
    fit(module, toy_batches(3), max_steps=3, callbacks=[watcher])
    forwards = [where for where, _ in watcher.seen if where.startswith("forward")]
    # each step runs the shallow layers twice (LoRA on for the draft, off for the full path) + the adapter
    assert len(forwards) == 3 * (2 * (module.model.exit_layer + 1) + 1)
    changed = [(where, sorted(initial ^ names)) for where, names in watcher.seen if names != initial]
    assert not changed, changed[:3]
    assert any("lora_A" in n for n in initial)


def test_lora_switch_keeps_a_frozen_model_frozen_and_still_switches(tiny_llama_dir):
    """Decoding a model loaded frozen (requires_grad off everywhere) must not unfreeze LoRA, and the switch
    must still take LoRA out of the computation. Also pins PEFT's own behaviour that makes the restore
    necessary: its ``enable_adapters`` sets requires_grad (if PEFT stops doing that, the restore is
    harmless and this assertion says so)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from kangaroo_lit.decoding import SelfSpeculativeDecoder

    module = make_module(tiny_llama_dir, lora=LoraSettings(rank=4, dropout=0.0, scope="draft"),
                         decoding=DecodingSettings())
    model = module.model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # LoRA that changes the output
    model.requires_grad_(False)
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(10).unsqueeze(0)
    hidden = model.embed(ids)
    with torch.no_grad():
        with_lora = model.shallow(hidden, positions, draft=True)
        without = model.shallow(hidden, positions, draft=False)
        SelfSpeculativeDecoder(model, threshold=0.0, max_draft=3).generate(ids, 8)
    assert not torch.allclose(with_lora, without)  # the switch still switches
    assert not any(p.requires_grad for p in model.parameters())  # and froze nothing back to trainable
    # PEFT's switch on its own sets requires_grad (why lora_enabled puts the flags back)
    layer = next(m for m in model.base.modules() if isinstance(m, BaseTunerLayer))
    layer.enable_adapters(False)
    layer.enable_adapters(True)
    assert any(p.requires_grad for n, p in layer.named_parameters() if "lora_" in n), (
        "PEFT's enable_adapters no longer sets requires_grad: KangarooModel.lora_enabled's restore can go")


# --------------------------------------------------------------------------------------------------
# export of a DeepSpeed checkpoint directory


def deepspeed_checkpoint_dir(lightning_ckpt: dict, module, root, exclude_frozen_parameters=True):
    """A ZeRO-2 checkpoint directory laid out as deepspeed 0.19.8 writes it for Lightning's DeepSpeedStrategy.

    Lightning calls ``engine.save_checkpoint(path, client_state=<its checkpoint without state_dict and
    optimizer_states>, tag="checkpoint")``; the engine writes ``<path>/checkpoint/mp_rank_00_model_states.pt``
    = ``_common_checkpoint_state`` (module state dict, in bf16 under bf16-mixed, without frozen
    parameters when asked; shapes of the parameters its optimizer owns; ...) updated with the client
    state, the per-rank ``*_optim_states.pt`` and ``<path>/latest`` holding the tag.
    """
    trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    full = module.state_dict()
    state_dict = {k: v.to(torch.bfloat16) for k, v in full.items()
                  if k in trainable or not exclude_frozen_parameters}
    state = dict(
        module=state_dict, buffer_names=[], optimizer=None,
        param_shapes=[OrderedDict((k, full[k].shape) for k in sorted(trainable))],
        frozen_param_shapes=None, shared_params={}, frozen_param_fragments=None, lr_scheduler=None,
        data_sampler=None, random_ltd=None, skipped_steps=0, global_steps=lightning_ckpt["global_step"],
        global_samples=4 * lightning_ckpt["global_step"], dp_world_size=2, mp_world_size=1,
        checkpoint_parallel_dimensions={"pp": 1, "tp": 1},
        ds_config={"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, ds_version="0.19.8",
    )
    state.update({k: v for k, v in lightning_ckpt.items() if k not in ("state_dict", "optimizer_states")})
    path = root / "last.ckpt"
    (path / "checkpoint").mkdir(parents=True)
    torch.save(state, path / "checkpoint" / "mp_rank_00_model_states.pt")
    for rank in (0, 1):  # flat fp32 partitions; export does not read them
        optim = path / "checkpoint" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        torch.save({"optimizer_state_dict": {}}, optim)
    (path / "latest").write_text("checkpoint")
    return path


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds-export")
    module, ckpt = trained_checkpoint(tiny_llama_dir, root, draft=DraftSettings(exit_head="trainable"))
    return module, load_checkpoint_file(ckpt), root


@pytest.mark.parametrize("exclude_frozen", [True, False], ids=["trainable-only", "with-frozen"])
def test_export_reads_a_deepspeed_checkpoint_directory(trained, tmp_path, exclude_frozen, capsys):
    from kangaroo_lit.artifact import load_artifact

    module, lightning_ckpt, _ = trained
    ds_dir = deepspeed_checkpoint_dir(lightning_ckpt, module, tmp_path / "ds", exclude_frozen)
    read = load_checkpoint(ds_dir)
    assert set(read["state_dict"]) == set(lightning_ckpt["state_dict"])  # only the trainable tensors
    assert read["kangaroo_settings"] == lightning_ckpt["kangaroo_settings"]
    assert read["global_step"] == lightning_ckpt["global_step"] and "module" not in read and "ds_config" not in read
    assert main(["export", "--ckpt_path", str(ds_dir), "--out_dir", str(tmp_path / "art")]) == 0
    assert "exported" in capsys.readouterr().out
    exported = load_artifact(tmp_path / "art", dtype="float32")
    expected = {n: p.detach() for n, p in module.model.named_parameters() if p.requires_grad}
    got = dict(exported.named_parameters())
    for name, value in expected.items():
        # the engine's module copy is bf16 under bf16-mixed; that is what the directory holds
        assert torch.equal(got[name], value.to(torch.bfloat16).float()), name


def test_deepspeed_directories_that_cannot_be_exported_are_named(trained, tmp_path):
    module, lightning_ckpt, _ = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"not a DeepSpeed checkpoint of this project \(no checkpoint/mp_rank_00"):
        load_checkpoint(empty)
    zero3 = tmp_path / "zero3" / "checkpoint"
    zero3.mkdir(parents=True)
    torch.save({}, zero3 / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="ZeRO-3 checkpoint"):
        load_checkpoint(zero3.parent)
    foreign = deepspeed_checkpoint_dir({"global_step": 1}, module, tmp_path / "foreign")
    with pytest.raises(CheckpointError, match="holds no 'kangaroo_settings'"):
        from kangaroo_lit.artifact import export_checkpoint

        export_checkpoint(foreign, tmp_path / "out")
