"""The LightningModule: what trains, what stays frozen, SGP's missing graph, NaN handling."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from kangaroo_lit.checkpointing import SETTINGS_KEY, CheckpointMismatchError, KangarooCheckpoint
from kangaroo_lit.lit_module import NonFiniteLossError
from kangaroo_lit.settings import DraftSettings, LoraSettings, LossSettings
from tests.helpers import fit, make_module, toy_batches


@pytest.mark.parametrize("detach_exit", [True, False])
@pytest.mark.parametrize("lora_scope", ["draft", "shared"])
def test_only_trainable_parameters_move(tiny_llama_dir, detach_exit, lora_scope):
    module = make_module(tiny_llama_dir, loss=LossSettings(detach_exit=detach_exit),
                         lora=LoraSettings(rank=4, scope=lora_scope), draft=DraftSettings(exit_head="trainable"))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable, "something must train"
    fit(module, toy_batches())
    for name, p in module.model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        assert moved == (name in trainable), f"{name}: moved={moved}, trainable={name in trainable}"
    # the optimizer got exactly the trainable parameters
    opt_params = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for n, p in module.model.named_parameters() if n in trainable}


@pytest.mark.parametrize("lora_scope", ["draft", "shared"])
def test_sgp_keeps_no_graph_through_deep_layers(tiny_llama_dir, lora_scope):
    module = make_module(tiny_llama_dir, lora=LoraSettings(rank=4, scope=lora_scope))
    grad_modes = {}

    def record(idx):
        def hook(mod, args, out):
            hidden = out[0] if isinstance(out, tuple) else out
            grad_modes.setdefault(idx, []).append(hidden.requires_grad)
        return hook

    layers = module.model.layers
    for i, layer in enumerate(layers):
        layer.register_forward_hook(record(i))
    batch = toy_batches(1)[0]
    module.train()
    out = module.model(batch["input_ids"], batch["attention_mask"], detach_exit=True)
    deep = range(module.settings.exit_layer + 1, len(layers))
    assert all(not any(grad_modes[i]) for i in deep), grad_modes
    assert not out.main_logits.requires_grad and out.exit_logits.requires_grad

    # joint mode in shared scope: the main path does carry a graph into the shallow LoRA
    if lora_scope == "shared":
        out = module.model(batch["input_ids"], batch["attention_mask"], detach_exit=False)
        assert out.main_logits.requires_grad


def test_draft_scope_verifier_stays_the_base_after_training(tiny_llama_dir):
    module = make_module(tiny_llama_dir, lora=LoraSettings(rank=4, scope="draft"), loss=LossSettings(exit_loss="kd"))
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(3))
    from kangaroo_lit.architectures import load_base_model

    reference = load_base_model(str(tiny_llama_dir), "float32")(ids).logits
    fit(module, toy_batches(), max_steps=4)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.model.full_logits(ids), reference, rtol=0, atol=1e-5)


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tiny_llama_dir, tmp_path):
    module = make_module(tiny_llama_dir)
    ckpt = KangarooCheckpoint(every_n_train_steps=1)
    batches = toy_batches(6)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[ckpt], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    last = tmp_path / "checkpoints" / "last.ckpt"
    good = torch.load(last, weights_only=False)
    assert good["global_step"] == 2

    # resume, poison the trainable weights once restored: step 3 must fail and leave last.ckpt alone
    class Poison(L.Callback):
        def on_train_start(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.model.adapter.self_attn.o_proj.weight.fill_(float("nan"))

    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                        callbacks=[KangarooCheckpoint(every_n_train_steps=1), Poison()],
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss .* at global step 2"):
        trainer.fit(module, DataLoader(batches, batch_size=None), ckpt_path=last)
    after = torch.load(last, weights_only=False)
    assert after["global_step"] == 2
    for k, v in good["state_dict"].items():
        assert torch.equal(v, after["state_dict"][k])


def test_checkpoint_holds_only_trainable_tensors(tiny_llama_dir, tmp_path):
    module = make_module(tiny_llama_dir, draft=DraftSettings(exit_head="trainable"))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                        callbacks=[KangarooCheckpoint()], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(toy_batches(2), batch_size=None))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys == set(module.trainable_state_keys())
    base_tensors = {p.data_ptr() for p in module.model.causal_lm.parameters() if not p.requires_grad}
    assert not any(t.data_ptr() in base_tensors for t in ckpt["state_dict"].values())
    assert not any("embed_tokens" in k or "mlp" in k and "lora" not in k for k in keys)
    assert ckpt[SETTINGS_KEY]["exit_layer"] == 1 and ckpt[SETTINGS_KEY]["draft"]["exit_head"] == "trainable"


class WriteFailure(Exception):
    pass


def test_failed_checkpoint_write_keeps_previous_last(tiny_llama_dir, tmp_path, monkeypatch):
    """A write that dies half-way (disk full, killed job) leaves the previous last.ckpt intact."""
    module = make_module(tiny_llama_dir)
    ckpt_dir = tmp_path / "checkpoints"

    class FailAtStep3(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                # torch.save dies after writing part of the file
                def broken_save(obj, f, *args, **kwargs):
                    f.write(b"PK\x03\x04 half a checkpoint")
                    raise WriteFailure("disk full")

                monkeypatch.setattr(torch, "save", broken_save)

    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                        callbacks=[FailAtStep3(), KangarooCheckpoint(every_n_train_steps=1)],
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(WriteFailure):
        trainer.fit(module, DataLoader(toy_batches(6), batch_size=None))
    monkeypatch.undo()
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 2  # intact and loadable
    assert list(ckpt_dir.glob("*.ckpt.partial"))  # the torn write went elsewhere
    for path in ckpt_dir.glob("*.ckpt"):  # and every checkpoint file there is complete
        torch.load(path, weights_only=True)


def test_structure_check_without_state_dict_as_deepspeed_restores(tiny_llama_dir):
    """DeepSpeed loads the weights itself: the hook then sees no "state_dict", only the settings."""
    module = make_module(tiny_llama_dir)
    module.on_load_checkpoint({SETTINGS_KEY: module.settings.to_dict()})  # same structure: accepted
    other = dict(module.settings.to_dict(), exit_layer=2)
    with pytest.raises(CheckpointMismatchError, match="exit_layer: checkpoint 2, this model 1"):
        module.on_load_checkpoint({SETTINGS_KEY: other})
    with pytest.raises(CheckpointMismatchError, match="holds no 'kangaroo_settings'"):
        module.on_load_checkpoint({"state_dict": {}})


@pytest.mark.parametrize("lora_scope", ["draft", "shared"])
def test_skipping_the_full_path_under_sgp_with_ce_changes_no_update(tiny_llama_dir, lora_scope, monkeypatch):
    """SGP + exit_loss "ce": training skips the full path (it reaches no trainable weight), same weights after."""
    from kangaroo_lit.lit_module import KangarooLitModule

    def trained(skip: bool):
        torch.manual_seed(0)
        module = make_module(tiny_llama_dir, lora=LoraSettings(rank=4, scope=lora_scope),
                             loss=LossSettings(detach_exit=True, exit_loss="ce", beta_exit=0.7))
        calls = []
        module.model.causal_lm.model.norm.register_forward_hook(lambda *a: calls.append(1))
        with monkeypatch.context() as m:
            if not skip:
                m.setattr(KangarooLitModule, "_skips_full_path", lambda self: False)
            fit(module, toy_batches())
        return module, calls

    skipped, skipped_calls = trained(skip=True)
    full, full_calls = trained(skip=False)
    assert skipped_calls == [] and len(full_calls) == 3  # the final norm (full path) ran only without the skip
    assert skipped.train()._skips_full_path() and not skipped.eval()._skips_full_path()  # validation: full path
    for (name, a), b in zip(skipped.model.named_parameters(), full.model.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
    # kd needs the teacher: never skipped
    kd = make_module(tiny_llama_dir, loss=LossSettings(exit_loss="kd"))
    kd.train()
    assert not kd._skips_full_path()
