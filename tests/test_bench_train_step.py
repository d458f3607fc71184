"""Smoke test of scripts/bench/train_step.py: every mode, both loops, on CPU; the numbers exist, not their size."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "train_step.py"

# Runs the script's workers in one fresh interpreter (so the import check below sees only this run),
# then reports which of the libraries the GPU image lacks got imported.
RUNNER = """
import json, runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
print(json.dumps({"imported": sorted(m for m in ("datasets", "jsonargparse", "deepspeed") if m in sys.modules)}))
"""


def test_train_step_benchmark_runs_every_mode(tmp_path):
    args = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--seq-len", "32", "--batch-size", "2",
            "--device", "cpu", "--threads", "1", "--in-process", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The worker path must run on the GPU image, which has no datasets, jsonargparse or deepspeed.
    assert json.loads(proc.stdout.strip().splitlines()[-1])["imported"] == []

    report = json.loads((tmp_path / "train_step_tiny_cpu.json").read_text())
    assert (tmp_path / "train_step_tiny_cpu.md").read_text().count("| sgp |") == 2
    meta = report["meta"]
    assert meta["shape"] == "tiny" and meta["precision"] == "32-true" and meta["versions"]["torch"]
    results = {(r["mode"], r["impl"]): r for r in report["results"]}
    assert set(results) == {(m, i) for m in ("sgp", "joint", "lora") for i in ("lightning", "raw")}
    for key, r in results.items():
        assert "error" not in r, (key, r.get("error"))
        assert len(r["loop_times_s"]) == 2, key
        for field in ("step_time_s", "cpu_time_s", "tokens_per_s", "peak_memory_bytes", "trainable_params"):
            assert r[field] > 0, (key, field, r[field])
        assert r["tokens_per_step"] == 2 * 32
    for mode in ("sgp", "joint", "lora"):
        # Same weights and batches, LoRA B starts at zero: both loops compute the same first loss.
        lit, raw = results[(mode, "lightning")], results[(mode, "raw")]
        assert abs(lit["first_loss"] - raw["first_loss"]) < 1e-4 * abs(raw["first_loss"]), mode
        assert lit["train_mode_modules"] == raw["train_mode_modules"], mode
    # lora mode trains no draft path: its loss is loss_main alone, sgp/joint add 0.7 * loss_exit.
    assert results[("lora", "raw")]["first_loss"] < results[("sgp", "raw")]["first_loss"]
    ratios = report["ratios"]
    for impl in ("lightning", "raw"):
        assert ratios["sgp_over_joint"][impl]["speedup"] > 0
        assert ratios["sgp_over_joint"][impl]["peak_memory_ratio"] > 0
    assert set(ratios["lightning_over_raw_throughput"]) == {"sgp", "joint", "lora"}
