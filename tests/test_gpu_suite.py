"""``scripts/gpu_suite.sh OUT --dry-run``: every stage of the GPU suite, with tiny shapes on the CPU.

The GPU run itself (``bash scripts/gpu_suite.sh OUT`` on an H100/H200) is not part of the default tier;
this checks that the command, its stage functions and both report files work end to end, and that a
failing, crashing or stuck stage is reported without stopping the others.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from kangaroo_lit.bench import gpu_suite
from kangaroo_lit.checkpointing import ZERO3_REFUSAL
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_suite.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    return out, proc


def test_dry_run_passes_every_stage_and_writes_both_reports(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "gpu_report.json").read_text())
    assert report["dry_run"] is True and report["all_ok"] is True
    assert list(report["stages"]) == list(gpu_suite.STAGES)
    assert all(entry["status"] == "ok" for entry in report["stages"].values())
    md = (out / "gpu_report.md").read_text()
    for name in gpu_suite.STAGES:
        assert f"| {name} | ok |" in md
    assert "## cost_model" in md and "## train_step" in md  # the benchmarks' own tables
    assert "all stages ok" in proc.stdout


def test_dry_run_stage_results(dry_run):
    out, _ = dry_run
    stages = json.loads((out / "gpu_report.json").read_text())["stages"]
    zero2 = stages["deepspeed_zero2"]["result"]
    assert zero2["checkpoint_layout"] == "file"  # a directory on the GPU (DeepSpeed)
    assert zero2["resume_loss_max_abs_diff"] <= 1e-5 and zero2["resumed_from_step"] == 2
    assert zero2["generate"]["identical"] is True and zero2["generate"]["new_tokens"] > 0
    assert (out / "zero2" / "artifact" / "kangaroo.json").is_file()
    assert stages["deepspeed_zero3"]["result"] == {"refused": True, "exit_code": 2, "message": ZERO3_REFUSAL}
    bf16 = stages["bf16_identical"]["result"]
    assert bf16["float32"]["identical_fraction"] == 1.0 and 0.0 <= bf16["bfloat16"]["identical_fraction"] <= 1.0
    assert stages["cost_model"]["result"]["report"]["layers"][0]["exit_layer"] == 1
    modes = {r["mode"] for r in stages["train_step"]["result"]["report"]["results"]}
    assert modes == {"sgp", "joint", "lora"}
    assert sorted(p.name for p in (out / "bench").glob("*.json")) == ["decode_cost_tiny_cpu.json",
                                                                       "train_step_tiny_cpu.json"]


def test_failing_and_crashing_stages_are_reported_and_the_rest_run(tmp_path, monkeypatch):
    def failing(out, dry):
        gpu_suite.check(False, "a check that did not hold")

    def crashing(out, dry):
        raise RuntimeError("CUDA error: an illegal memory access")

    ran = []
    monkeypatch.setitem(gpu_suite.STAGE_FUNCTIONS, "environment", failing)
    monkeypatch.setitem(gpu_suite.STAGE_FUNCTIONS, "deepspeed_zero2", crashing)
    monkeypatch.setitem(gpu_suite.STAGE_FUNCTIONS, "deepspeed_zero3", lambda out, dry: ran.append(1) or {"x": 1})
    report = gpu_suite.run_suite(tmp_path, dry_run=True, stages=("environment", "deepspeed_zero2", "deepspeed_zero3"))
    stages = report["stages"]
    assert stages["environment"] == {**stages["environment"], "status": "failed", "error": "a check that did not hold"}
    assert stages["deepspeed_zero2"]["status"] == "failed" and "illegal memory access" in stages["deepspeed_zero2"][
        "error"] and "Traceback" in stages["deepspeed_zero2"]["traceback"]
    assert stages["deepspeed_zero3"]["status"] == "ok" and ran == [1]
    assert report["all_ok"] is False and json.loads((tmp_path / "gpu_report.json").read_text())["all_ok"] is False
    assert "| deepspeed_zero2 | failed |" in (tmp_path / "gpu_report.md").read_text()
    # the time budget: stages that no longer fit are skipped, not started
    report = gpu_suite.run_suite(tmp_path, dry_run=True, stages=("deepspeed_zero3",), budget_s=1)
    assert report["stages"]["deepspeed_zero3"]["status"] == "skipped"


def test_a_stage_in_its_own_process_and_a_stuck_one(tmp_path):
    """How stages run on the GPU: each in its own process, its entry handed back in a file, killed at its
    timeout. (bf16_identical without the artifact of deepspeed_zero2 fails at once, before any import.)"""
    entry = gpu_suite.run_stage_in_subprocess("bf16_identical", tmp_path, timeout=120, dry_run=True)
    assert entry["status"] == "failed" and "the deepspeed_zero2 stage did not export one" in entry["error"]
    assert (tmp_path / "stages" / "bf16_identical.json").is_file() and "log_tail" in entry
    stuck = gpu_suite.run_stage_in_subprocess("train_step", tmp_path, timeout=0.5, dry_run=True)
    assert stuck["status"] == "timeout" and "killed after" in stuck["error"]


def test_usage_without_out_dir():
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_suite.sh")], capture_output=True, text=True,
                          cwd=REPO_ROOT)
    assert proc.returncode == 2 and "usage: bash scripts/gpu_suite.sh OUT" in proc.stderr
