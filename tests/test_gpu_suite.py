"""``scripts/gpu_suite.sh OUT --dry-run``: every stage of the GPU suite, with tiny shapes on the CPU.

The GPU run itself (``bash scripts/gpu_suite.sh OUT`` on an H100/H200) is not part of the default tier;
this checks that the command, its stage functions and its files work end to end: OUT holds a handful of
flat files (what the device tool can bring back), a run cut by a signal keeps its finished rows and a
report marked incomplete, a second run needs no cleanup, a failing, crashing or stuck stage is reported
without stopping the others, and a stage's timeout ends its whole process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from kangaroo_lit.bench import gpu_suite
from kangaroo_lit.checkpointing import ZERO3_REFUSAL
from tests.conftest import REPO_ROOT

SCRIPT = str(REPO_ROOT / "scripts" / "gpu_suite.sh")


def _script(out: Path, *args: str) -> list[str]:
    return ["bash", SCRIPT, str(out), "--dry-run", *args]


def _report(out: Path) -> dict:
    return json.loads((out / gpu_suite.REPORT_JSON).read_text())


def _archive_names(out: Path) -> list[str]:
    with tarfile.open(out / gpu_suite.ARCHIVE) as tar:
        return tar.getnames()


def _assert_flat_handful(out: Path) -> None:
    """What the device tool brings back: at most 8 plain files, here at most the suite's five, no folder."""
    entries = sorted(os.listdir(out))
    assert set(entries) <= set(gpu_suite.OUT_FILES) and len(entries) <= 5, entries
    assert all((out / name).is_file() for name in entries)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-suite")
    out, work = root / "out", root / "work"
    proc = subprocess.run(_script(out, "--work_dir", str(work)), capture_output=True, text=True, timeout=600,
                          cwd=REPO_ROOT)
    return out, work, proc


def test_dry_run_passes_every_stage_into_a_handful_of_flat_files(dry_run):
    out, work, proc = dry_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(os.listdir(out)) == sorted(gpu_suite.OUT_FILES)
    _assert_flat_handful(out)
    report = _report(out)
    assert report["dry_run"] is True and report["all_ok"] is True and report["complete"] is True
    assert report["cut"] is None and report["stages_not_finished"] == []
    assert list(report["stages"]) == list(gpu_suite.STAGES)
    assert all(entry["status"] == "ok" for entry in report["stages"].values())
    # the revision: the script passes git's here (the GPU machine gets it through KANGAROO_REVISION)
    # (a commit of this repository; not compared with HEAD, which may move while the suite runs)
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True).returncode == 0:
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", report["revision"]), report["revision"]
        sha = report["revision"].removesuffix("-dirty")
        assert subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=REPO_ROOT).returncode == 0
        assert report["revision_source"] == "KANGAROO_REVISION"
    else:  # a checkout without .git and no KANGAROO_REVISION: the report says so
        assert report["revision"] is None and report["revision_source"].startswith("unknown")
    for package in gpu_suite.PREFLIGHT_PACKAGES:
        assert f"{package} " in report["preflight_line"]
    md = (out / gpu_suite.REPORT_MD).read_text()
    for name in gpu_suite.STAGES:
        assert f"| {name} | ok |" in md
    assert "## cost_model" in md and "## train_step" in md  # the benchmarks' own tables
    assert f"Revision `{report['revision'] or 'unknown'}`" in md and "**complete**" in md
    assert "not of sharding" in md and report["preflight_line"] in md
    assert "all stages ok" in proc.stdout and f"revision {report['revision'] or 'unknown'}" in proc.stdout
    log = (out / gpu_suite.LOG).read_text()
    assert report["preflight_line"] in log and "== train_step" in log
    # the run itself happened in a fresh run directory under --work_dir, not in OUT
    assert Path(report["run_dir"]).parent == work.resolve() and Path(report["run_dir"]).is_dir()


def test_dry_run_stage_results_rows_and_archive(dry_run):
    out, _, _ = dry_run
    report = _report(out)
    stages, run = report["stages"], Path(report["run_dir"])
    zero2 = stages["deepspeed_zero2"]["result"]
    assert zero2["checkpoint_layout"] == "file"  # a directory on the GPU (DeepSpeed)
    assert zero2["resume_loss_max_abs_diff"] <= 1e-5 and zero2["resumed_from_step"] == 2
    assert zero2["generate"]["identical"] is True and zero2["generate"]["new_tokens"] > 0
    assert zero2["devices"] == 1 and "not of sharding" in zero2["note"]
    assert (run / "zero2" / "artifact" / "kangaroo.json").is_file()
    assert stages["deepspeed_zero3"]["result"] == {"refused": True, "exit_code": 2, "message": ZERO3_REFUSAL}
    bf16 = stages["bf16_identical"]["result"]
    assert bf16["float32"]["identical_fraction"] == 1.0 and 0.0 <= bf16["bfloat16"]["identical_fraction"] <= 1.0
    cost = stages["cost_model"]["result"]["report"]
    assert cost["layers"][0]["exit_layer"] == 1
    # the static-cache baseline: eager in the dry run (no compile on the CPU), same tokens as HF's default
    static = cost["hf_static_cache"]
    assert static["compile_requested"] is False and static["compiled"] is False
    assert static["tokens_per_s"] > 0 and static["eager_tokens_per_s"] > 0 and static["identical_to_eager"] is True
    assert static["compile_and_warmup_s"] > 0 and static["speculative_over_static"] > 0
    assert "HF generate baselines" in stages["cost_model"]["result"]["markdown"]
    modes = {r["mode"] for r in stages["train_step"]["result"]["report"]["results"]}
    assert modes == {"sgp", "joint", "lora"}
    # every finished measurement is a row of OUT/gpu_rows.jsonl
    rows = gpu_suite.read_rows(out / gpu_suite.ROWS)
    workers = [(r["mode"], r["impl"]) for r in rows if r["bench"] == "train_step"]
    assert sorted(workers) == sorted((m, i) for m in ("sgp", "joint", "lora") for i in ("lightning", "raw"))
    assert [r["kind"] for r in rows if r["bench"] == "cost_model"] == ["costs", "forced", "hf_static_cache"]
    assert report["rows"] == {"cost_model": 3, "tree_vs_chain": 1, "train_step": 6}
    # chain vs tree, the tree sized by the cost_model stage's own report; outputs identical in float32
    tree = stages["tree_vs_chain"]["result"]["report"]
    assert tree["cost"]["source"].endswith("decode_cost_tiny_cpu.json")
    assert all(row["identical"] for row in tree["rows"].values())
    assert {"vanilla", "tree", "chain@0"} <= set(tree["rows"])
    # the archive: the run directory's figures and logs, no checkpoint, cache or weights
    names = _archive_names(out)
    top = Path(report["run_dir"]).name
    for name in ("bench/decode_cost_tiny_cpu.json", "bench/train_step_tiny_cpu.json",
                 "zero2/straight/lightning_logs/version_0/metrics.csv", "zero2/artifact/kangaroo.json"):
        assert f"{top}/{name}" in names
    assert not any(n.endswith((".ckpt", ".safetensors")) or "/checkpoints/" in n or "/cache/" in n for n in names)
    assert report["archive"]["files"] == len(names) and report["archive"]["left_out_count"] >= 3


def test_second_dry_run_into_a_new_folder_needs_no_cleanup(dry_run, tmp_path):
    """The stage that met its own last.ckpt on a second run, into a new OUT with the same work folder."""
    first_out, work, _ = dry_run
    out = tmp_path / "second"
    proc = subprocess.run(_script(out, "--work_dir", str(work), "--only", "deepspeed_zero2", "--revision", "abc123"),
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = _report(out)
    assert report["all_ok"] is True and report["stages"]["deepspeed_zero2"]["status"] == "ok"
    assert report["revision"] == "abc123" and report["revision_source"] == "--revision"
    assert "Revision `abc123`" in (out / gpu_suite.REPORT_MD).read_text()
    first_run, second_run = Path(_report(first_out)["run_dir"]), Path(report["run_dir"])
    assert second_run != first_run and first_run.is_dir() and second_run.parent == first_run.parent
    _assert_flat_handful(out)


def _start_and_signal_after_first_worker(out: Path, *args: str) -> tuple[subprocess.Popen, str, str]:
    """Start the dry run, wait for its first training-step row, send SIGTERM; (process, stdout, stderr)."""
    # The test hook pauses after each row, so SIGTERM lands between two training-step workers.
    env = {**os.environ, gpu_suite.ROW_PAUSE_ENV: "1.5"}
    proc = subprocess.Popen(_script(out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, env=env)
    rows_file = out / gpu_suite.ROWS
    deadline = time.monotonic() + 300
    while not any(r["bench"] == "train_step" for r in gpu_suite.read_rows(rows_file)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the script exec'd the suite: this is the suite's own process
    stdout, stderr = proc.communicate(timeout=120)
    return proc, stdout, stderr


def test_a_dry_run_killed_mid_train_step_keeps_its_rows_and_says_incomplete(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc, stdout, stderr = _start_and_signal_after_first_worker(out, "--work_dir", str(work), "--only", "cost_model",
                                                                "train_step")
    rows_file = out / gpu_suite.ROWS
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-4000:]
    _assert_flat_handful(out)
    assert sorted(os.listdir(out)) == sorted(gpu_suite.OUT_FILES)
    report = _report(out)
    assert report["complete"] is False and report["all_ok"] is False and report["cut"] == "SIGTERM"
    assert report["stages"]["cost_model"]["status"] == "ok"
    assert report["stages"]["train_step"]["status"] == "interrupted"
    assert report["stages_finished"] == ["cost_model"] and report["stages_not_finished"] == ["train_step"]
    workers = [r for r in gpu_suite.read_rows(rows_file) if r["bench"] == "train_step"]
    assert 1 <= len(workers) < 6 and all(r["tokens_per_s"] > 0 for r in workers)
    assert report["rows"]["train_step"] == len(workers)
    md = (out / gpu_suite.REPORT_MD).read_text()
    assert "INCOMPLETE (cut: SIGTERM)" in md and "| train_step | interrupted |" in md
    assert f"* train_step worker: {workers[0]['mode']}/{workers[0]['impl']}:" in md  # the rows, for people
    assert any(n.endswith("bench/decode_cost_tiny_cpu.json") for n in _archive_names(out))
    assert "INCOMPLETE (SIGTERM)" in stdout


def test_killed_with_stages_in_process_groups_as_on_the_gpu(tmp_path):
    """The GPU's way (``--isolate``): the stage's whole process group is ended, the rows it wrote kept."""
    out = tmp_path / "out"
    proc, stdout, stderr = _start_and_signal_after_first_worker(out, "--work_dir", str(tmp_path / "work"),
                                                                "--only", "train_step", "--isolate")
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-4000:]
    _assert_flat_handful(out)
    report = _report(out)
    assert report["complete"] is False and report["cut"] == "SIGTERM"
    assert report["stages"]["train_step"]["status"] == "interrupted"
    workers = [r for r in gpu_suite.read_rows(out / gpu_suite.ROWS) if r["bench"] == "train_step"]
    assert 1 <= len(workers) < 6 and report["rows"]["train_step"] == len(workers)
    assert "[sgp/lightning] running" in (out / gpu_suite.LOG).read_text()  # the stage's output is in the log


def test_failing_and_crashing_stages_are_reported_and_the_rest_run(tmp_path, monkeypatch):
    def failing(paths, dry):
        gpu_suite.check(False, "a check that did not hold")

    def crashing(paths, dry):
        raise RuntimeError("CUDA error: an illegal memory access")

    ran = []
    monkeypatch.setitem(gpu_suite.STAGE_FUNCTIONS, "environment", failing)
    monkeypatch.setitem(gpu_suite.STAGE_FUNCTIONS, "deepspeed_zero2", crashing)
    monkeypatch.setitem(gpu_suite.STAGE_FUNCTIONS, "deepspeed_zero3", lambda paths, dry: ran.append(1) or {"x": 1})
    out, work = tmp_path / "out", tmp_path / "work"
    report = gpu_suite.run_suite(out, dry_run=True, stages=("environment", "deepspeed_zero2", "deepspeed_zero3"),
                                 work_dir=work, revision="r1")
    stages = report["stages"]
    assert stages["environment"]["status"] == "failed" and stages["environment"]["error"] == "a check that did not hold"
    assert stages["deepspeed_zero2"]["status"] == "failed" and "illegal memory access" in stages["deepspeed_zero2"][
        "error"] and "Traceback" in stages["deepspeed_zero2"]["traceback"]
    assert stages["deepspeed_zero3"]["status"] == "ok" and ran == [1]
    # every stage ran to its end: complete, but not all ok
    assert report["complete"] is True and report["all_ok"] is False and gpu_suite.exit_code(report) == 1
    assert _report(out)["all_ok"] is False
    assert "| deepspeed_zero2 | failed |" in (out / gpu_suite.REPORT_MD).read_text()
    # the time budget: stages that no longer fit are skipped, not started, and the run is incomplete
    report = gpu_suite.run_suite(out, dry_run=True, stages=("deepspeed_zero3",), budget_s=1, work_dir=work)
    assert report["stages"]["deepspeed_zero3"]["status"] == "skipped"
    assert report["complete"] is False and "budget" in report["cut"] and ran == [1]


def test_an_in_process_stage_past_its_time_is_stopped(tmp_path, monkeypatch):
    def stuck(paths, dry):
        time.sleep(30)

    monkeypatch.setitem(gpu_suite.STAGE_FUNCTIONS, "deepspeed_zero3", stuck)
    monkeypatch.setitem(gpu_suite.TIMEOUTS, "deepspeed_zero3", 0.5)
    start = time.monotonic()
    report = gpu_suite.run_suite(tmp_path / "out", dry_run=True, stages=("deepspeed_zero3",), work_dir=tmp_path)
    assert time.monotonic() - start < 20
    assert report["stages"]["deepspeed_zero3"]["status"] == "timeout" and report["complete"] is False


def _gone(pid: int) -> bool:
    """The process has exited (absent, or a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_stage_in_its_own_process_and_a_stuck_one(tmp_path):
    """How stages run on the GPU: each in its own process group, its entry handed back in a file, killed at
    its timeout. (bf16_identical without the artifact of deepspeed_zero2 fails at once, before any import.)"""
    paths = gpu_suite.new_run(tmp_path / "out", tmp_path / "work")
    entry = gpu_suite.run_stage_in_subprocess("bf16_identical", paths, timeout=120, dry_run=True)
    assert entry["status"] == "failed" and "the deepspeed_zero2 stage did not export one" in entry["error"]
    assert (paths.run / "stages" / "bf16_identical.json").is_file() and "log_tail" in entry
    stuck = gpu_suite.run_stage_in_subprocess("train_step", paths, timeout=0.5, dry_run=True)
    assert stuck["status"] == "timeout" and "killed (its whole process group)" in stuck["error"]
    assert _gone(stuck["process_group"])


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_a_timeout_ends_the_whole_process_group(tmp_path):
    """A worker that the stage started (here a grandchild ``sleep``) must not outlive the stage's timeout."""
    log = tmp_path / "log"
    code, pgid = gpu_suite.run_in_group(["bash", "-c", "sleep 300 & echo $!; wait"], log, timeout=2)
    assert code is None
    grandchild = int(log.read_text().split()[0])
    deadline = time.monotonic() + 10
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(grandchild) and _gone(pgid)


def test_pack_run_leaves_checkpoints_caches_and_weights_out(tmp_path):
    paths = gpu_suite.new_run(tmp_path / "out", tmp_path / "work")
    for name, size in (("bench/a.json", 10), ("logs/version_0/metrics.csv", 10), ("x/checkpoints/e.ckpt", 10),
                       ("x/last.ckpt/checkpoint/mp_rank_00_model_states.pt", 10), ("cache/data.arrow", 10),
                       ("artifact/model.safetensors", 10), ("big.log", gpu_suite.MAX_ARCHIVED_FILE_BYTES + 1)):
        (paths.run / name).parent.mkdir(parents=True, exist_ok=True)
        (paths.run / name).write_bytes(b"x" * size)
    packed = gpu_suite.pack_run(paths)
    top = paths.run.name
    assert sorted(_archive_names(paths.out)) == [f"{top}/bench/a.json", f"{top}/logs/version_0/metrics.csv"]
    assert packed["files"] == 2 and packed["left_out_count"] == 5
    assert any("big.log" in why and "MiB" in why for why in packed["left_out"])
    assert os.listdir(paths.out) == [gpu_suite.ARCHIVE]  # no .part left behind


def test_revision_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.setenv("KANGAROO_REVISION", "from-env")
    assert gpu_suite.resolve_revision("given") == ("given", "--revision")
    assert gpu_suite.resolve_revision(None) == ("from-env", "KANGAROO_REVISION")


def test_usage_without_out_dir():
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2 and "usage: bash scripts/gpu_suite.sh OUT" in proc.stderr
