"""Exact resume: N steps straight == N/2 steps, crash, resume to N (losses, batches, weights)."""

import json

import lightning as L
import pytest
import torch

from kangaroo_lit.checkpointing import KangarooCheckpoint
from kangaroo_lit.data import InstructionDataModule
from kangaroo_lit.lit_module import CheckpointMismatchError, KangarooLitModule

TOTAL_STEPS = 14  # 10 batches per epoch: the crash is mid-epoch 0, the resumed run crosses into epoch 1
CRASH_AT = 7  # after warm-up (2 steps)


class Crash(Exception):
    pass


class Recorder(L.Callback):
    """Per global step: the loss and a fingerprint of the batch's rows."""

    def __init__(self, crash_at=None):
        self.losses, self.batches, self.crash_at = {}, {}, crash_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.crash_at is not None and trainer.global_step == self.crash_at:
            raise Crash(f"simulated crash before step {trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # already incremented: the step just taken
        self.losses[step] = outputs["loss"].item()
        rows = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)
        self.batches[step] = sorted(tuple(r[r != 0].tolist()) for r in rows)


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


def run(model_dir, data, root, cache, recorder, ckpt_path=None, **module_kw):
    kw = dict(exit_layer=1, lora_rank=4, lora_dropout=0.2, warmup_steps=2, learning_rate=5e-3,
              exit_loss="mix", exit_head="trainable")
    kw.update(module_kw)
    module = KangarooLitModule(base_model=str(model_dir), **kw)
    dm = InstructionDataModule(tokenizer=str(model_dir), data_path=str(data), batch_size=4, max_length=64,
                               num_workers=0, val_fraction=0.0, test_fraction=0.0, seed=7, cache_dir=str(cache))
    trainer = L.Trainer(max_steps=TOTAL_STEPS, accelerator="cpu", logger=False, default_root_dir=root,
                        callbacks=[KangarooCheckpoint(every_n_train_steps=1), recorder],
                        use_distributed_sampler=False, enable_progress_bar=False, enable_model_summary=False)
    L.seed_everything(123)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def trainable_state(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def test_resume_mid_epoch_is_exact(tiny_llama_dir, varied_rows, tmp_path):
    straight = Recorder()
    reference = run(tiny_llama_dir, varied_rows, tmp_path / "a", tmp_path / "cache", straight)
    assert sorted(straight.losses) == list(range(1, TOTAL_STEPS + 1))

    first = Recorder(crash_at=CRASH_AT)
    with pytest.raises(Crash):
        run(tiny_llama_dir, varied_rows, tmp_path / "b", tmp_path / "cache", first)
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == CRASH_AT

    second = Recorder()
    resumed = run(tiny_llama_dir, varied_rows, tmp_path / "b", tmp_path / "cache", second, ckpt_path=str(last))
    assert sorted(second.losses) == list(range(CRASH_AT + 1, TOTAL_STEPS + 1))

    combined_losses = {**first.losses, **second.losses}
    combined_batches = {**first.batches, **second.batches}
    # Same batches in the same order: nothing seen twice or skipped within the epoch.
    assert combined_batches == straight.batches
    # fp32 on CPU: identical arithmetic, so agreement to 1e-6 relative is required.
    for step, loss in straight.losses.items():
        assert combined_losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), f"step {step}"
    ref_state, res_state = trainable_state(reference), trainable_state(resumed)
    assert ref_state.keys() == res_state.keys()
    for name in ref_state:
        torch.testing.assert_close(res_state[name], ref_state[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def early_checkpoint(tiny_llama_dir, varied_rows, tmp_path_factory):
    """last.ckpt of a run (the defaults of :func:`run`) that crashed after 2 steps."""
    root = tmp_path_factory.mktemp("early")
    with pytest.raises(Crash):
        run(tiny_llama_dir, varied_rows, root / "r", root / "cache", Recorder(crash_at=2))
    return root / "r" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"exit_layer": 2}, r"exit_layer: checkpoint 1, this model 2"),
        ({"lora_rank": 8}, r"(?s)lora_rank: checkpoint 4, this model 8.*shape of model\.base"),
        ({"exit_head": "shared"}, r"(?s)exit_head: checkpoint 'trainable'.*not in this model: model\.exit_proj"),
        ({"lora_target_modules": ["q_proj"]}, r"lora_target_modules"),
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
