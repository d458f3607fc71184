"""The decode check at validation end (DecodeEvalCallback): figures equal a direct decoder run, modes are put
back, ModelCheckpoint can select on val/mat, and the per-rank shares sum to the one-process figures."""

from pathlib import Path

import lightning as L
import pytest
import torch

from kangaroo_lit.callbacks import (
    DECODE_COUNTERS,
    DecodeEvalCallback,
    decode_check_metrics,
    decode_figures,
    decode_prompts,
    module_modes,
    shard,
)
from kangaroo_lit.data import InstructionDataModule
from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder
from tests.helpers import make_module

DOLLY = Path(__file__).parent / "fixtures" / "dolly-tiny.jsonl"
pytestmark = pytest.mark.usefixtures("one_thread")


def datamodule(model_dir, tmp_path):
    dm = InstructionDataModule(tokenizer=str(model_dir), data_path=str(DOLLY), cache_dir=str(tmp_path / "cache"),
                               num_workers=0, batch_size=2, val_fraction=0.4, test_fraction=0.1, max_length=128)
    return dm


def perturb_adapter(module, scale: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = module.model.adapter.self_attn.o_proj.weight
        w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * scale)


def silence_deep_layers(module) -> None:
    """Zero the deep layers' output projections: they add nothing, so the full path is the untrained early exit
    (adapter ``o_proj`` zero) and a draft can be accepted on a random model."""
    model = module.model
    with torch.no_grad():
        for layer in model.layers[model.exit_layer + 1:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def trainer(tmp_path, callbacks, **kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, **kw)


class ModeProbe(L.Callback):
    """Registered around the decode check: sets a mixed train/eval state before it, compares after."""

    def __init__(self, role: str, shared: dict) -> None:
        self.role, self.shared = role, shared

    @staticmethod
    def state(pl_module):
        return (module_modes(pl_module), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                {n: p.requires_grad for n, p in pl_module.named_parameters()})

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.role == "before":
            pl_module.model.adapter.train()  # a mixed state: the check must put back exactly this
            self.shared["before"] = self.state(pl_module)
        else:
            self.shared["after"] = self.state(pl_module)
            pl_module.eval()


@pytest.mark.parametrize("scope", ["draft", "shared"])
def test_figures_equal_a_direct_decoder_run_and_modes_are_restored(scope, tmp_path, tiny_llama_dir):
    from kangaroo_lit.settings import LoraSettings

    module = make_module(tiny_llama_dir, lora=LoraSettings(rank=4, scope=scope))
    perturb_adapter(module, 0.02)
    dm = datamodule(tiny_llama_dir, tmp_path)
    check = DecodeEvalCallback(num_prompts=3, max_new_tokens=12, threshold=0.0, max_draft=3)
    seen: dict = {}
    t = trainer(tmp_path, [ModeProbe("before", seen), check, ModeProbe("after", seen)])
    t.validate(module, datamodule=dm, verbose=False)
    assert seen["before"] == seen["after"]
    assert seen["before"][0]["model.adapter"] is True and seen["before"][0]["model"] is False  # mixed indeed

    prompts = check._prompts(t)
    assert len(prompts) == 3
    eos = dm.tokenizer.eos_token_id
    module.eval()
    spec, van = SelfSpeculativeDecoder(module.model, threshold=0.0, max_draft=3), VanillaDecoder(module.model)
    with torch.no_grad():
        runs = [(spec.generate(p, 12, eos), van.generate(p, 12, eos)) for p in prompts]
    new = sum(s.new_tokens for s, _ in runs)
    assert check.totals["new_tokens"] == new and check.totals["prompts"] == 3
    assert check.last["mat"] == new / sum(s.full_passes for s, _ in runs)
    assert check.last["accept_rate"] == sum(s.accepted for s, _ in runs) / sum(s.drafted for s, _ in runs)
    assert check.last["identical"] == sum(s.tokens == v.tokens for s, v in runs) / 3 == 1.0
    assert check.last["tokens_per_s"] == new / check.totals["spec_time_s"] > 0
    van_tps = check.totals["vanilla_new_tokens"] / check.totals["vanilla_time_s"]
    assert check.last["speedup"] == pytest.approx(check.last["tokens_per_s"] / van_tps)
    for name, value in check.last.items():  # logged through the module: what monitors read
        assert float(t.callback_metrics[f"val/{name}"]) == pytest.approx(value, rel=1e-6)


class Variants(L.Callback):
    """Before each validation, give the adapter one of several weight sets (so the validations differ)."""

    def __init__(self, scales) -> None:
        self.scales, self.index, self.mats = scales, 0, []

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            perturb_adapter(pl_module, self.scales[self.index % len(self.scales)], seed=self.index)
            self.index += 1

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.mats.append((trainer.global_step, float(trainer.callback_metrics["val/mat"])))


def test_model_checkpoint_selects_the_validation_with_the_highest_mat(tmp_path, tiny_llama_dir):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kangaroo_lit.settings import OptimizerSettings

    # a negligible learning rate: the validations differ by the adapter weights they are given, nothing else
    module = make_module(tiny_llama_dir, optimizer=OptimizerSettings(lr=1e-9, warmup_steps=1))
    silence_deep_layers(module)
    dm = datamodule(tiny_llama_dir, tmp_path)
    variants = Variants([1.0, 0.0, 0.3])
    best = ModelCheckpoint(dirpath=tmp_path / "best", filename="best-mat-{step}", monitor="val/mat", mode="max",
                           save_top_k=1, save_on_train_epoch_end=False)
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=tmp_path, max_steps=3, val_check_interval=1, limit_val_batches=1,
                  num_sanity_val_steps=0, callbacks=[variants, DecodeEvalCallback(num_prompts=3, max_new_tokens=10,
                                                                                 threshold=0.0, max_draft=4), best])
    t.fit(module, datamodule=dm)
    mats = variants.mats
    assert len(mats) == 3 and len({m for _, m in mats}) > 1, mats  # the validations differ
    step, mat = max(mats, key=lambda sm: sm[1])
    assert float(best.best_model_score) == pytest.approx(mat)
    assert Path(best.best_model_path).name == f"best-mat-step={step}.ckpt"
    assert torch.load(best.best_model_path, weights_only=False)["kangaroo_metrics"]["val/mat"] == pytest.approx(mat)


def test_skips_sanity_check_and_honours_every_n_validations(tmp_path, tiny_llama_dir):
    module = make_module(tiny_llama_dir)
    dm = datamodule(tiny_llama_dir, tmp_path)
    check = DecodeEvalCallback(num_prompts=1, max_new_tokens=4, every_n_validations=2)
    calls = []
    original = decode_figures

    import kangaroo_lit.callbacks as cb

    cb.decode_figures = lambda totals: calls.append(1) or original(totals)
    try:
        t = trainer(tmp_path, [check], max_steps=3, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=1)
        t.fit(module, datamodule=dm)
    finally:
        cb.decode_figures = original
    assert len(calls) == 2  # validations 1 and 3 of 3; not the sanity check


def test_sharded_counters_sum_to_the_one_process_figures(tiny_llama_dir):
    """The reduction with a fake world size in one process: each rank's share decoded into its own metrics,
    the states summed as ``compute()`` would under ddp (the real 2-process run: test_decode_check_ddp.py)."""
    module = make_module(tiny_llama_dir)
    perturb_adapter(module, 0.02)
    model = module.model.eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (1, 5 + i), generator=gen) for i in range(5)]
    assert [i for i, _ in shard(prompts, 1, 2)] == [1, 3] and [i for i, _ in shard(prompts, 0, 3)] == [0, 3]
    kw = dict(max_new_tokens=8, eos_token_id=None, threshold=0.0, max_draft=3)
    one = decode_check_metrics()
    with torch.no_grad():
        decode_prompts(model, prompts, one, **kw)
        ranks = [decode_check_metrics() for _ in range(2)]
        for rank, metrics in enumerate(ranks):
            decode_prompts(model, prompts, metrics, rank=rank, world_size=2, **kw)
    summed = {n: sum(float(m[n].compute()) for m in ranks) for n in DECODE_COUNTERS}
    single = {n: float(one[n].compute()) for n in DECODE_COUNTERS}
    for name in DECODE_COUNTERS:
        if not name.endswith("time_s"):
            assert summed[name] == single[name], name
    figures, reference = decode_figures(summed), decode_figures(single)
    for name in ("mat", "accept_rate", "identical"):
        assert figures[name] == reference[name]
