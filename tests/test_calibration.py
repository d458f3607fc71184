"""Confidence calibration: the fitted temperature recovers a known one, the artifact records and loads it,
and a bad record is refused."""

import json

import pytest
import torch

from kangaroo_lit.calibration import calibrate, fit_temperature, reliability, temperature_nll
from kangaroo_lit.errors import CheckpointError
from tests.conftest import REPO_ROOT
from tests.helpers import exported_artifact

pytestmark = pytest.mark.usefixtures("one_thread")
DOLLY_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "dolly-tiny.jsonl"


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 3.0])
def test_fit_recovers_the_temperature_the_targets_were_drawn_at(true_temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 12, generator=g, dtype=torch.float64) * 3
    targets = torch.multinomial((logits / true_temperature).softmax(-1), 1, generator=g).squeeze(1)
    fitted = fit_temperature(logits, targets)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    assert temperature_nll(logits, targets, fitted) <= temperature_nll(logits, targets, 1.0) + 1e-12


def test_reliability_of_a_calibrated_and_an_overconfident_predictor():
    g = torch.Generator().manual_seed(1)
    confidence = torch.rand(50000, generator=g, dtype=torch.float64)
    calibrated = torch.rand(50000, generator=g, dtype=torch.float64) < confidence
    overconfident = torch.rand(50000, generator=g, dtype=torch.float64) < confidence * 0.5
    assert reliability(confidence, calibrated)["ece"] < 0.01
    report = reliability(confidence, overconfident)
    assert report["ece"] == pytest.approx(0.25, abs=0.01)
    assert sum(b["positions"] for b in report["bins"]) == 50000


def test_calibrate_records_the_temperature_and_loading_applies_it(tiny_llama_dir, tmp_path):
    from kangaroo_lit.artifact import load_artifact
    from kangaroo_lit.calibration import main

    _, _, artifact = exported_artifact(tiny_llama_dir, tmp_path)
    assert load_artifact(artifact).confidence_temperature == 1.0
    record = calibrate(str(artifact), str(DOLLY_FIXTURE), max_rows=8, format="instruction", threads=1)
    assert record["positions"] > 20 and record["temperature"] > 0
    assert record["nll_after"] <= record["nll_before"]
    manifest = json.loads((artifact / "kangaroo.json").read_text())
    assert manifest["calibration"]["temperature"] == record["temperature"]
    assert (artifact / "calibration.png").is_file()
    assert load_artifact(artifact).confidence_temperature == pytest.approx(record["temperature"])
    manifest["calibration"]["temperature"] = -1
    (artifact / "kangaroo.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="calibration.temperature"):
        load_artifact(artifact)
    assert main(["--artifact", str(artifact), "--data_path", str(tmp_path / "missing.jsonl")]) == 2
