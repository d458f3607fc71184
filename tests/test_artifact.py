"""Export -> load rebuilds the same model: identical logits on both paths."""

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from kangaroo_lit.artifact import load_artifact, read_manifest
from kangaroo_lit.checkpointing import KangarooCheckpoint
from kangaroo_lit.cli import main
from tests.test_training import make_module, toy_batches


def trained_checkpoint(model_dir, root, **kw):
    module = make_module(model_dir, **kw)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, default_root_dir=root,
                        callbacks=[KangarooCheckpoint()], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(toy_batches(3), batch_size=None))
    return module.eval(), root / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "kw",
    [dict(lora_scope="draft", exit_head="trainable"), dict(lora_scope="shared"), dict(lora_rank=0)],
    ids=["draft-trainable-head", "shared", "no-lora"],
)
def test_export_then_load_gives_identical_logits(tiny_llama_dir, tmp_path, kw):
    module, ckpt = trained_checkpoint(tiny_llama_dir, tmp_path, **kw)
    out = tmp_path / "artifact"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"kangaroo.json", "kangaroo_adapter.safetensors", "README.md"} <= files
    assert ("lora" in files) == (kw.get("lora_rank", 4) > 0)
    assert ("exit_head.safetensors" in files) == (kw.get("exit_head") == "trainable")
    assert not any(p.stat().st_size > 2_000_000 for p in out.rglob("*") if p.is_file())  # no base weights

    loaded = load_artifact(out, dtype="float32")
    ids = torch.randint(3, 300, (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module.model(ids)
        got = loaded(ids)
    torch.testing.assert_close(got.main_logits, expected.main_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.exit_logits, expected.exit_logits, rtol=0, atol=1e-6)
    # the trained draft differs from an untrained one, so the test would notice lost weights
    fresh = make_module(tiny_llama_dir, **kw).model.eval()
    with torch.no_grad():
        assert (fresh(ids).exit_logits - got.exit_logits).abs().max() > 1e-4

    manifest = read_manifest(out)
    assert manifest["exit_layer"] == 1 and manifest["training"]["global_step"] == 3
    assert manifest["base_model"] == str(tiny_llama_dir.resolve())
    assert "Kangaroo draft" in (out / "README.md").read_text()


def test_load_rejects_a_directory_that_is_not_an_artifact(tmp_path):
    with pytest.raises(FileNotFoundError, match="kangaroo.json is missing"):
        load_artifact(tmp_path)
    (tmp_path / "kangaroo.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_artifact(tmp_path)


def test_export_cli_reports_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    assert main(["export", "--ckpt", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "no hyper_parameters" in capsys.readouterr().err
