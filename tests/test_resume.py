"""Exact resume: N steps straight == N/2 steps, crash, resume to N (losses, batches, weights)."""

import json

import lightning as L
import pytest
import torch

from kangaroo_lit.checkpointing import CheckpointMismatchError, KangarooCheckpoint
from kangaroo_lit.data import InstructionDataModule
from kangaroo_lit.lit_module import KangarooLitModule
from kangaroo_lit.settings import DraftSettings, LoraSettings, LossSettings, OptimizerSettings

TOTAL_STEPS = 14  # 40 rows in batches of 4: 10 batches per epoch, so every run crosses into epoch 1
# Where the first run crashes, in micro-batches taken: mid-epoch after warm-up; right after the last
# step of epoch 0 (the next epoch's loader has started); and inside a gradient-accumulation cycle.
SCENARIOS = {
    "mid_epoch": dict(crash_after=7, accumulate=1),
    "epoch_boundary": dict(crash_after=10, accumulate=1),
    "mid_accumulation": dict(crash_after=9, accumulate=2),
}


class Crash(Exception):
    pass


class Recorder(L.Callback):
    """Per micro-batch (epoch, batch index): the loss and a fingerprint of the batch's rows."""

    def __init__(self, crash_after=None):
        self.losses, self.batches, self.crash_after, self.taken = {}, {}, crash_after, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.crash_after is not None and self.taken == self.crash_after:
            raise Crash(f"simulated crash before micro-batch {self.taken} (global step {trainer.global_step})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.taken += 1
        key = (trainer.current_epoch, batch_idx)
        self.losses[key] = outputs["loss"].item()
        rows = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)
        self.batches[key] = sorted(tuple(r[r != 0].tolist()) for r in rows)


@pytest.fixture(scope="module")
def varied_rows(tmp_path_factory):
    """40 Dolly rows of clearly different lengths, so length grouping matters."""
    path = tmp_path_factory.mktemp("resume-data") / "rows.jsonl"
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    with path.open("w") as f:
        for i in range(40):
            n = 2 + (i * 7) % 23
            response = " ".join(words[(i + j) % len(words)] for j in range(n))
            f.write(json.dumps({"instruction": f"Write {n} words, number {i}.", "context": "",
                                "response": response, "category": "creative_writing"}) + "\n")
    return path


def run(model_dir, data, root, cache, recorder, ckpt_path=None, accumulate=1, **module_kw):
    kw = dict(exit_layer=1, lora=LoraSettings(rank=4, dropout=0.2), loss=LossSettings(exit_loss="mix"),
              optimizer=OptimizerSettings(lr=5e-3, warmup_steps=2), draft=DraftSettings(exit_head="trainable"))
    kw.update(module_kw)
    module = KangarooLitModule(base_model=str(model_dir), **kw)
    dm = InstructionDataModule(tokenizer=str(model_dir), data_path=str(data), batch_size=4, max_length=64,
                               num_workers=0, val_fraction=0.0, test_fraction=0.0, seed=7, cache_dir=str(cache))
    trainer = L.Trainer(max_steps=TOTAL_STEPS // accumulate, accumulate_grad_batches=accumulate,
                        accelerator="cpu", logger=False, default_root_dir=root,
                        callbacks=[KangarooCheckpoint(every_n_train_steps=1), recorder],
                        use_distributed_sampler=False, enable_progress_bar=False, enable_model_summary=False)
    L.seed_everything(123)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def trainable_state(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_resume_is_exact(tiny_llama_dir, varied_rows, tmp_path, scenario):
    """N micro-batches straight == crash, resume from last.ckpt, go on to N: batches, losses, weights.

    LoRA dropout 0.2 makes the losses depend on the RNG state, so a resume that restores it at the
    wrong moment (e.g. after the new epoch's loader drew from it) shows up as different losses.
    """
    crash_after, accumulate = SCENARIOS[scenario]["crash_after"], SCENARIOS[scenario]["accumulate"]
    straight = Recorder()
    reference = run(tiny_llama_dir, varied_rows, tmp_path / "a", tmp_path / "cache", straight, accumulate=accumulate)
    assert len(straight.losses) == TOTAL_STEPS

    first = Recorder(crash_after=crash_after)
    with pytest.raises(Crash):
        run(tiny_llama_dir, varied_rows, tmp_path / "b", tmp_path / "cache", first, accumulate=accumulate)
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    saved_step = torch.load(last, weights_only=True)["global_step"]
    assert saved_step == crash_after // accumulate  # a mid-cycle crash loses the partial cycle

    second = Recorder()
    resumed = run(tiny_llama_dir, varied_rows, tmp_path / "b", tmp_path / "cache", second, ckpt_path=str(last),
                  accumulate=accumulate)
    # The resumed run redoes the micro-batches of an unfinished accumulation cycle, then goes on.
    redone = crash_after - saved_step * accumulate
    assert len(second.losses) == TOTAL_STEPS - crash_after + redone

    combined_losses = {**first.losses, **second.losses}
    combined_batches = {**first.batches, **second.batches}
    # Same batches in the same order: nothing seen twice or skipped within the epoch.
    assert combined_batches == straight.batches
    # fp32 on CPU: identical arithmetic, so agreement to 1e-6 relative is required.
    for key, loss in straight.losses.items():
        assert combined_losses[key] == pytest.approx(loss, rel=1e-6, abs=1e-7), f"(epoch, batch) {key}"
    ref_state, res_state = trainable_state(reference), trainable_state(resumed)
    assert ref_state.keys() == res_state.keys()
    for name in ref_state:
        torch.testing.assert_close(res_state[name], ref_state[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def early_checkpoint(tiny_llama_dir, varied_rows, tmp_path_factory):
    """last.ckpt of a run (the defaults of :func:`run`) that crashed after 2 steps."""
    root = tmp_path_factory.mktemp("early")
    with pytest.raises(Crash):
        run(tiny_llama_dir, varied_rows, root / "r", root / "cache", Recorder(crash_after=2))
    return root / "r" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"exit_layer": 2}, r"exit_layer: checkpoint 1, this model 2"),
        ({"lora": LoraSettings(rank=8, dropout=0.2)},
         r"(?s)lora.rank: checkpoint 4, this model 8.*shape of model\.base"),
        ({"draft": DraftSettings()},
         r"(?s)draft.exit_head: checkpoint 'trainable'.*not in this model: model\.exit_proj"),
        ({"lora": LoraSettings(rank=4, dropout=0.2, target_modules=["q_proj"])}, r"lora.target_modules"),
    ],
)
def test_resume_with_another_configuration_is_refused(tiny_llama_dir, varied_rows, tmp_path, early_checkpoint,
                                                     change, expected):
    with pytest.raises(CheckpointMismatchError, match=expected):
        run(tiny_llama_dir, varied_rows, tmp_path / "r2", tmp_path / "cache", Recorder(),
            ckpt_path=str(early_checkpoint), **change)


def test_resume_from_another_base_model_is_refused(tiny_model_dirs, varied_rows, tmp_path, early_checkpoint):
    with pytest.raises(CheckpointMismatchError, match=r"base_model: checkpoint .*llama.*this model .*mistral"):
        run(tiny_model_dirs["mistral"], varied_rows, tmp_path / "r2", tmp_path / "cache", Recorder(),
            ckpt_path=str(early_checkpoint))
