"""A restricted draft head (``draft.vocab_size`` K): choice of the ids, checkpoints, export, refusals.

Decoding exactness with a restricted head is tested with the other decoding tests (``k64`` / ``k6`` runs
of tests/test_decoding_greedy.py and tests/test_decoding_sampling.py), its loss terms in tests/test_losses.py.
"""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from kangaroo_lit.artifact import DRAFT_VOCAB_FILE, MANIFEST, export_checkpoint, load_artifact, read_manifest
from kangaroo_lit.checkpointing import KangarooCheckpoint
from kangaroo_lit.draft_vocab import select_draft_vocab
from kangaroo_lit.errors import CheckpointError, ConfigError
from kangaroo_lit.losses import IGNORE_INDEX
from kangaroo_lit.settings import DraftSettings, LoraSettings
from tests.helpers import fit, make_module, toy_batches

K = 64
FIXTURES = Path(__file__).parent / "fixtures"


class CountingData(L.LightningDataModule):
    """Toy batches plus the token counts a data module provides after setup()."""

    def __init__(self, batches, vocab=320):
        super().__init__()
        self.batches = batches
        labels = torch.cat([b["labels"].flatten() for b in batches])
        self.target_token_counts = torch.bincount(labels[labels != IGNORE_INDEX], minlength=vocab)

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


def test_select_draft_vocab_most_frequent_ties_by_id_eos_always():
    counts = torch.tensor([5, 0, 7, 7, 1, 0, 5, 2])
    assert select_draft_vocab(counts, 3, 8).tolist() == [0, 2, 3]  # 7, 7, then 5 (id 0 before id 6)
    assert select_draft_vocab(counts, 3, 8, always=[5]).tolist() == [2, 3, 5]  # EOS replaces the last pick
    assert select_draft_vocab(counts, 4, 10).tolist() == [0, 2, 3, 6]  # counts shorter than V: zeros
    assert select_draft_vocab(counts[:3], 5, 8).tolist() == [0, 1, 2, 3, 4]  # ties at 0 by id
    with pytest.raises(ValueError, match="1..8"):
        select_draft_vocab(counts, 9, 8)


def test_data_module_counts_train_split_targets(tmp_path, tiny_tokenizer):
    from kangaroo_lit.data import InstructionDataModule

    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok)
    dm = InstructionDataModule(tokenizer=str(tok), data_path=str(FIXTURES / "dolly-tiny.jsonl"),
                               cache_dir=str(tmp_path / "cache"), num_workers=0)
    dm.setup("fit")
    counts = dm.target_token_counts
    assert counts.dtype == torch.int64 and counts.numel() >= len(tiny_tokenizer)
    expected = torch.zeros_like(counts)
    for item in dm.train_dataset:
        labels = item["labels"]
        expected += torch.bincount(labels[labels != IGNORE_INDEX], minlength=counts.numel())
    assert torch.equal(counts, expected) and int(counts.sum()) == dm.train_dataset.num_target_tokens


@pytest.mark.parametrize("exit_head", ["shared", "trainable"])
def test_fit_export_load_round_trip(tiny_llama_dir, tmp_path, exit_head):
    draft = DraftSettings(exit_head=exit_head, vocab_size=K)
    module = make_module(tiny_llama_dir, lora=LoraSettings(rank=4), draft=draft)
    data = CountingData(toy_batches(3))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                        callbacks=[KangarooCheckpoint()], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    module.eval()
    ids = module.model.draft_vocab
    eos = module.model.config.eos_token_id
    expected_ids = select_draft_vocab(data.target_token_counts, K, 320, always=[eos] if eos is not None else [])
    assert torch.equal(ids, expected_ids) and ids.shape == (K,)

    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert torch.equal(ckpt["state_dict"]["model.draft_vocab"], ids)
    assert not any("exit_weight" in k or "lm_head" in k for k in ckpt["state_dict"])  # no frozen base weights
    if exit_head == "trainable":
        assert ckpt["state_dict"]["model.exit_proj.weight"].shape == (K, 64)

    out = export_checkpoint(ckpt_path, tmp_path / "artifact")
    assert (out / DRAFT_VOCAB_FILE).is_file() and read_manifest(out)["draft_vocab_size"] == K
    loaded = load_artifact(out, dtype="float32")
    assert torch.equal(loaded.draft_vocab, ids)
    x = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = module.model(x), loaded(x)
    assert got.exit_logits.shape == (2, 11, K)
    torch.testing.assert_close(got.exit_logits, want.exit_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.main_logits, want.main_logits, rtol=0, atol=1e-6)
    if exit_head == "shared":  # the frozen slice follows the loaded ids
        torch.testing.assert_close(loaded.exit_weight, loaded.causal_lm.lm_head.weight[ids], rtol=0, atol=0)

    # A module built without data (placeholder ids) takes the ids and re-slices its head on a state load.
    fresh = make_module(tiny_llama_dir, lora=LoraSettings(rank=4), draft=draft)
    assert not torch.equal(fresh.model.draft_vocab, ids)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=False)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(x).exit_logits, want.exit_logits, rtol=0, atol=1e-6)

    # Strict artifact checks: the ids file must match the manifest.
    manifest = json.loads((out / MANIFEST).read_text())
    save_file({"draft_vocab": ids[:-1].clone()}, str(out / DRAFT_VOCAB_FILE))
    with pytest.raises(CheckpointError, match=r"draft_vocab.*shape \[63\].*\[64\]"):
        load_artifact(out)
    save_file({"draft_vocab": torch.cat([ids[:-1], ids[:1]])}, str(out / DRAFT_VOCAB_FILE))
    with pytest.raises(CheckpointError, match="repeated ids"):
        load_artifact(out)
    (out / DRAFT_VOCAB_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{DRAFT_VOCAB_FILE} is missing"):
        load_artifact(out)
    save_file({"draft_vocab": ids.clone()}, str(out / DRAFT_VOCAB_FILE))
    manifest["draft_vocab_size"] = None
    manifest["training"] = {}
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="'draft_vocab_size' is null"):
        load_artifact(out)


def test_resume_refuses_another_vocab_size(tiny_llama_dir, tmp_path):
    module = make_module(tiny_llama_dir, lora=LoraSettings(rank=0), draft=DraftSettings(vocab_size=K))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                        callbacks=[KangarooCheckpoint()], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=CountingData(toy_batches(1)))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    from kangaroo_lit.checkpointing import CheckpointMismatchError

    for other in (32, None):
        again = make_module(tiny_llama_dir, lora=LoraSettings(rank=0), draft=DraftSettings(vocab_size=other))
        with pytest.raises(CheckpointMismatchError, match=f"draft.vocab_size: checkpoint {K}, this model {other}"):
            again.on_load_checkpoint(ckpt)


def test_fit_without_token_counts_is_a_config_error(tiny_llama_dir):
    module = make_module(tiny_llama_dir, lora=LoraSettings(rank=0), draft=DraftSettings(vocab_size=K))
    with pytest.raises(ConfigError, match="draft.vocab_size=64 needs the training data's token counts"):
        fit(module, toy_batches(1), max_steps=1)


def test_settings_refuse_a_bad_vocab_size(tiny_llama_dir):
    with pytest.raises(ConfigError, match="draft.vocab_size must be >= 1"):
        DraftSettings(vocab_size=0)
    module = make_module(tiny_llama_dir, lora=LoraSettings(rank=0), draft=DraftSettings(vocab_size=K))
    assert module.model.draft_vocab_size == K  # built without data: placeholder ids of the right shape
    too_big = DraftSettings(vocab_size=10_000)
    with pytest.raises(ConfigError, match="exceeds the vocabulary"):
        make_module(tiny_llama_dir, lora=LoraSettings(rank=0), draft=too_big)


def test_cli_fit_chooses_ids_from_the_data_and_resume_refuses_another_size(tmp_path, tiny_llama_dir, capsys):
    """``--model.draft.vocab_size`` through LightningCLI: the data module's counts pick the ids (validation
    runs on the restricted head too); a resume with another size is refused."""
    from kangaroo_lit.cli import main, run_lightning
    from tests.conftest import REPO_ROOT

    args = [
        "fit", "--config", str(REPO_ROOT / "configs/tiny.yaml"),
        "--model.base_model", str(tiny_llama_dir), "--model.exit_layer", "1", "--model.dtype", "float32",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path),
        "--data.data_path", str(FIXTURES / "dolly-tiny.jsonl"), "--data.num_workers", "0",
        "--data.batch_size", "2", "--data.cache_dir", str(tmp_path / "cache"), "--data.max_length", "128",
    ]
    cli = run_lightning([*args, "--model.draft.vocab_size", str(K)])
    model, data = cli.model.model, cli.datamodule
    eos = data.tokenizer.eos_token_id
    assert torch.equal(model.draft_vocab, select_draft_vocab(data.target_token_counts, K, 320, always=[eos]))
    assert eos in model.draft_vocab.tolist()
    metrics = cli.trainer.validate(cli.model, datamodule=data, verbose=False)[0]
    assert 0 < metrics["val/expected_accept"] < 1 and metrics["val/ppl_draft"] > 1
    last = tmp_path / "checkpoints" / "last.ckpt"
    code = main([*args, "--trainer.max_steps", "2", "--model.draft.vocab_size", "32", "--ckpt_path", str(last)])
    assert code == 2
    assert "vocab_size" in capsys.readouterr().err
