"""Export -> load rebuilds the same model: identical logits on both paths."""

import json

import pytest
import torch

from kangaroo_lit.artifact import load_artifact, read_manifest
from kangaroo_lit.cli import main
from kangaroo_lit.errors import CheckpointError
from kangaroo_lit.settings import DraftSettings, LoraSettings
from tests.helpers import make_module, trained_checkpoint


@pytest.mark.parametrize(
    "kw",
    [
        dict(lora=LoraSettings(rank=4, scope="draft"), draft=DraftSettings(exit_head="trainable")),
        dict(lora=LoraSettings(rank=4, scope="shared")),
        dict(lora=LoraSettings(rank=0)),
    ],
    ids=["draft-trainable-head", "shared", "no-lora"],
)
def test_export_then_load_gives_identical_logits(tiny_llama_dir, tmp_path, kw):
    module, ckpt = trained_checkpoint(tiny_llama_dir, tmp_path, **kw)
    out = tmp_path / "artifact"
    assert main(["export", "--ckpt_path", str(ckpt), "--out_dir", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"kangaroo.json", "kangaroo_adapter.safetensors", "README.md"} <= files
    assert ("lora" in files) == (kw["lora"].rank > 0)
    assert ("exit_head.safetensors" in files) == ("draft" in kw and kw["draft"].exit_head == "trainable")
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
    with pytest.raises(CheckpointError, match="kangaroo.json is missing"):
        load_artifact(tmp_path)
    with pytest.raises(CheckpointError, match="no such artifact directory"):
        load_artifact(tmp_path / "absent")
    (tmp_path / "kangaroo.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_artifact(tmp_path)


def test_export_cli_reports_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    assert main(["export", "--ckpt_path", str(bad), "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}")  # a one-line reason naming the file, no traceback
    assert main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out_dir", str(tmp_path / "o")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory):
    """A trained checkpoint with draft-scoped LoRA (shared by the export tests of this module)."""
    return trained_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("ckpt"), lora=LoraSettings(rank=4))[1]


def leftovers(parent, name):
    """Temporary or moved-aside directories that an export left beside ``parent / name``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_export_refuses_a_non_empty_out_dir_unless_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "kangaroo.json").write_text("{}")
    (out / "stale.txt").write_text("from an older export")
    assert main(["export", "--ckpt_path", str(checkpoint), "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out_dir {out} exists and is not empty") and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "kangaroo.json").read_text() == "{}" and (out / "stale.txt").exists()  # untouched

    assert main(["export", "--ckpt_path", str(checkpoint), "--out_dir", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()  # the old directory is gone, not merged into
    assert {p.name for p in out.iterdir()} == {"kangaroo.json", "kangaroo_adapter.safetensors", "lora", "README.md",
                                             "custom_generate"}
    assert read_manifest(out)["exit_layer"] == 1
    assert leftovers(tmp_path, "artifact") == []

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--ckpt_path", str(checkpoint), "--out_dir", str(empty)]) == 0  # empty is fine
    assert (empty / "kangaroo.json").is_file()


def test_export_writes_all_or_nothing(checkpoint, tmp_path, monkeypatch):
    """A failure halfway leaves no partial artifact and an existing one as it was."""
    import kangaroo_lit.artifact as artifact

    def broken_card(manifest):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "model_card", broken_card)
    out = tmp_path / "new"
    with pytest.raises(OSError, match="disk full"):
        artifact.export_checkpoint(checkpoint, out)
    assert not out.exists() and leftovers(tmp_path, "new") == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "kangaroo.json").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        artifact.export_checkpoint(checkpoint, old, overwrite=True)
    assert [p.name for p in old.iterdir()] == ["kangaroo.json"] and (old / "kangaroo.json").read_text() == "old"
    assert leftovers(tmp_path, "old") == []


def test_export_overwrite_never_deletes_the_checkpoint(checkpoint, tmp_path, capsys):
    root = checkpoint.parent.parent  # <root>/checkpoints/last.ckpt
    assert main(["export", "--ckpt_path", str(checkpoint), "--out_dir", str(root), "--overwrite"]) == 2
    assert "which --overwrite would delete" in capsys.readouterr().err
    assert checkpoint.is_file()
