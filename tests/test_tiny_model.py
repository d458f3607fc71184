"""The embedded default model (kangaroo_lit/assets/tiny-llama) and the script that builds it."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kangaroo_lit.data.prompts import format_prompt

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "kangaroo_lit" / "assets"
MODEL_DIR = ASSETS / "tiny-llama"
HELDOUT = ASSETS / "tiny-instruct-heldout.jsonl"
TRAIN = ASSETS / "tiny-instruct.jsonl"
SCRIPT = REPO_ROOT / "scripts" / "build_tiny_model.py"
DOLLY_FIELDS = {"instruction", "context", "response", "category"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model.eval()
    return model, tokenizer


def _greedy(model, tokenizer, row: dict) -> str:
    enc = tokenizer(format_prompt(row["instruction"], row["context"]), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=48, pad_token_id=tokenizer.eos_token_id)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_assets_are_small_and_complete():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 5_000_000, f"assets are {total / 1e6:.2f} MB"
    for name in ["model.safetensors", "config.json", "tokenizer.json", "metrics.json", "README.md"]:
        assert (MODEL_DIR / name).is_file(), name


def test_data_files_are_dolly_rows_and_heldout_is_unseen():
    train, heldout = _rows(TRAIN), _rows(HELDOUT)
    assert 2000 <= len(train) <= 4000 and 150 <= len(heldout) <= 300
    for row in train + heldout:
        assert set(row) == DOLLY_FIELDS and all(isinstance(v, str) for v in row.values())
    seen = {(r["instruction"], r["context"]) for r in train}
    assert not any((r["instruction"], r["context"]) in seen for r in heldout)


def test_tokenizer_has_no_pad_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    ids = tokenizer("hello")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == model.config.bos_token_id
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)


def test_greedy_heldout_accuracy_is_well_above_chance(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = _rows(HELDOUT)[:20]  # the file interleaves families, so this prefix covers all of them
    correct = sum(_greedy(model, tokenizer, row) == row["response"].strip() for row in rows)
    # Chance (a random response of the same family) is about 1% (metrics.json): 50% is far above it.
    assert correct / len(rows) >= 0.5, f"{correct}/{len(rows)} held-out rows right"


def test_build_script_quick_runs_end_to_end(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("build_tiny_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    try:
        metrics = module.main(["--quick", "--out_dir", str(tmp_path)])
    finally:
        # The script turns deterministic algorithms on for its own run; don't leak that into other tests.
        torch.use_deterministic_algorithms(False)
    assert metrics["quick"] and metrics["train"]["final_loss"] < metrics["train"]["first_loss"]
    assert _rows(tmp_path / "tiny-instruct.jsonl") == _rows(TRAIN)  # same seed, same data
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny-llama")
    assert tokenizer.pad_token is None and model.config.vocab_size == len(tokenizer)
    assert json.loads((tmp_path / "tiny-llama" / "metrics.json").read_text())["quick"] is True
