"""``kangaroo-lit bench train_step`` on CPU, every mode through both loops (in one process to stay quick).

The raw loop is only a baseline if it computes what the Lightning loop computes: same seed, same
batches, same module, same optimizer and schedule, so both must record the same losses at every step.
"""

import json
import statistics
import time

import pytest

from kangaroo_lit.bench.train_step import train_step

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ("sgp", "joint", "lora")
IMPLS = ("lightning", "raw")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_step")
    start = time.perf_counter()
    train_step(shape="tiny", steps=2, warmup=1, seq_len=32, batch_size=2, threads=1, in_process=True, out_dir=str(out))
    elapsed = time.perf_counter() - start
    report = json.loads((out / "train_step_tiny_cpu.json").read_text())
    return report, out, elapsed


def _results(report) -> dict:
    return {(r["mode"], r["impl"]): r for r in report["results"]}


def test_report_files_and_keys(run):
    report, out, _ = run
    assert (out / "train_step_tiny_cpu.md").read_text().count("| sgp |") == 2
    assert (out / "train_step_tiny_cpu.png").read_bytes()[:4] == b"\x89PNG"
    meta = report["meta"]
    assert meta["shape"] == "tiny" and meta["precision"] == "32-true" and meta["dtype"] == "float32"
    assert meta["versions"]["torch"] and meta["versions"]["lightning"] and meta["torch_threads"] == 1
    assert meta["optimizer"]["schedule"] == "constant" and meta["optimizer"]["weight_decay"] == 0.0
    assert meta["modes"]["lora"]["beta_exit"] == 0.0 and not meta["modes"]["lora"]["detach_exit"]
    assert set(meta["load_average_1_5_15"]) == {"start", "end"}
    results = _results(report)
    assert set(results) == {(m, i) for m in MODES for i in IMPLS}
    assert all("error" not in r for r in results.values()), [r.get("error") for r in results.values()]
    assert {r["lora_scope"] for r in results.values()} == {"shared"}


def test_times_and_throughput_recomputed(run):
    report, _, elapsed = run
    results = _results(report)
    # Seconds: all measured steps of all six workers happened within the call.
    assert 0 < sum(sum(r["loop_times_s"]) for r in results.values()) < elapsed
    for key, r in results.items():
        assert len(r["loop_times_s"]) == len(r["cpu_times_s"]) == 2, key
        assert r["step_time_s"] == statistics.median(r["loop_times_s"]), key
        assert r["cpu_time_s"] == statistics.median(r["cpu_times_s"]), key
        assert r["tokens_per_step"] == 2 * 32
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"]), key
        # Bytes, both (ru_maxrss is KiB on Linux): the peak is at least the RSS seen earlier, up to the
        # kernel's lazily updated high-water mark.
        assert r["peak_memory_bytes"] >= 0.99 * r["rss_after_imports_bytes"] > 0, key
    ratios = report["ratios"]
    for impl in IMPLS:
        sgp, joint = results[("sgp", impl)], results[("joint", impl)]
        entry = ratios["sgp_over_joint"][impl]
        assert entry["speedup"] == pytest.approx(joint["step_time_s"] / sgp["step_time_s"])
        assert entry["speedup_cpu_time"] == pytest.approx(joint["cpu_time_s"] / sgp["cpu_time_s"])
        assert entry["peak_memory_ratio"] == pytest.approx(sgp["peak_memory_bytes"] / joint["peak_memory_bytes"])
    for mode in MODES:
        lit, raw = results[(mode, "lightning")], results[(mode, "raw")]
        fraction = ratios["lightning_over_raw_throughput"][mode]
        assert fraction["wall_time"] == pytest.approx(raw["step_time_s"] / lit["step_time_s"])
        assert fraction["cpu_time"] == pytest.approx(raw["cpu_time_s"] / lit["cpu_time_s"])


def test_both_loops_compute_the_same_training(run):
    report, _, _ = run
    results = _results(report)
    for mode in MODES:
        lit, raw = results[(mode, "lightning")], results[(mode, "raw")]
        # Warm-up + measured steps: same weights, batches, dropout masks, updates and schedule.
        assert len(lit["losses"]) == 3 and lit["first_loss"] == lit["losses"][0]
        assert raw["losses"] == pytest.approx(lit["losses"], rel=1e-6, abs=0), mode
        assert lit["trainable_params"] == raw["trainable_params"], mode
        assert lit["train_mode_modules"] == raw["train_mode_modules"], mode
    sgp, joint, lora = (results[(m, "raw")] for m in MODES)
    # SGP with a label loss skips the full path (loss = 0.7 * loss_exit); joint adds loss_main, which plain
    # LoRA trains alone: the first losses (same weights, same batch) add up.
    assert joint["losses"][0] == pytest.approx(sgp["losses"][0] + lora["losses"][0], rel=1e-6)
    assert sgp["losses"][1] != joint["losses"][1] - lora["losses"][1]  # different updates
    assert lora["trainable_params"] < sgp["trainable_params"]  # no adapter parameters


def test_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="nothing to run"):
        train_step(lora_rank=0, modes=("lora",), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="exit_layer"):
        train_step(exit_layer=3, out_dir=str(tmp_path))
    assert not list(tmp_path.iterdir())
