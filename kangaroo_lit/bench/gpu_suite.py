"""The project's GPU checks in one command: ``bash scripts/gpu_suite.sh OUT`` (``--dry-run``: tiny, on CPU).

A GPU is lent rarely and for minutes, so the suite is built to bring back every figure it measured even
when it is cut short (its own ``--budget_s``, a stage's timeout, SIGTERM or SIGINT):

* Every invocation works in a fresh run directory (``--work_dir``, default a folder under the system's
  temporary directory, one new ``run-<UTC time>-<random>`` per run), so a second run never meets the first one's
  checkpoints, and ``OUT`` only ever receives the few flat files below.
* The benchmarks append one JSON line per finished measurement (a training-step worker, a cost-model
  exit layer, ...) to ``OUT/gpu_rows.jsonl`` the moment it exists; ``OUT/gpu_report.json`` and ``.md``
  are rewritten after every stage; ``OUT/gpu_suite.log`` holds the suite's lines and, on the GPU, every
  stage's own output.
* At the end, or when cut, the run directory minus its bulky files (checkpoints, caches, ``*.ckpt``,
  ``*.safetensors``, ...) is packed into ``OUT/gpu_suite.tar.gz`` and the report says which stages
  finished and whether the run was ``complete``.

So ``OUT`` holds at most five files, none in a folder (the device tool returns at most 8 files, 2 folders
deep, 16 MiB each). The stages, in order of value (each within its own timeout and the time left of
``--budget_s``):

* ``environment``: versions, the GPU, whether DeepSpeed imports.
* ``cost_model``: ``kangaroo-lit bench cost_model`` on the Llama-2-7B shape (random bf16 weights, exit
  layers 1 and 2, 20 repeats, 2 forced-acceptance runs), with HF ``generate`` on a static cache compiled by
  ``torch.compile`` beside the eager one (compile time reported apart).
* ``tree_vs_chain``: ``kangaroo-lit bench tree_vs_chain`` on the same shape: chain vs tree drafts sized by
  the ``cost_model`` stage's own ``c`` and ``v_k``, with a synthetic calibrated draft of the shipped SmolLM2
  draft's top-k agreement (no trained draft exists for random weights).
* ``train_step``: ``kangaroo-lit bench train_step`` on the Llama-2-7B shape (SGP vs joint vs LoRA,
  Lightning vs raw loop; 2 warm-up + 6 measured steps per worker).
* ``deepspeed_zero2``: the embedded tiny Llama trained through the real CLI with
  ``configs/deepspeed-zero2.yaml`` (bf16-mixed): a straight run checkpointing every ``half`` steps, a
  second run resumed from its step-``half`` checkpoint (losses compared step by step), the checkpoint's
  layout and size, ``kangaroo-lit export`` of it and ``kangaroo-lit generate --compare_vanilla``. With the
  one GPU lent this is a smoke test of fit / checkpoint / resume / export, not of sharding.
* ``bf16_identical``: the fraction of held-out prompts whose greedy self-speculative output equals the
  vanilla loop's, in bfloat16 and (control) float32, with the artifact of ``deepspeed_zero2``.
* ``deepspeed_zero3``: ``configs/deepspeed-zero3.yaml`` must be refused with its reason (exit 2).

On the GPU every stage runs in its own process group (a CUDA error or a DeepSpeed crash fails that stage,
not the suite; a timeout kills the stage with every worker it started, so none keeps the GPU busy).
``--dry-run`` runs the same stage functions in this process with tiny shapes on the CPU (DeepSpeed is then
replaced by the plain CPU strategy: it needs CUDA), which is what the default test tier checks
(``tests/test_gpu_suite.py``).

    KANGAROO_REVISION=<sha> bash scripts/gpu_suite.sh $OUT   # on the GPU machine (no .git there)
    bash scripts/gpu_suite.sh /tmp/gpu --dry-run               # here, CPU only, well under a minute
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import importlib.metadata
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
# In order of value: the 7B measurements first, the cheap smoke tests after (a cut run loses the latter).
STAGES = ("environment", "cost_model", "tree_vs_chain", "train_step", "deepspeed_zero2", "bf16_identical",
          "deepspeed_zero3")
# Seconds each stage may take (on the GPU its process group is killed after that).
TIMEOUTS = {"environment": 60, "cost_model": 270, "tree_vs_chain": 90, "train_step": 240, "deepspeed_zero2": 150,
            "bf16_identical": 90, "deepspeed_zero3": 45}
BUDGET_S = 480  # the whole suite: 8 minutes, inside the device tool's 10-minute command limit
PACK_RESERVE_S = 15  # kept back from the budget for the report and the archive
MIN_STAGE_S = 5  # a stage is not started with less time than this left
KILL_GRACE_S = 10  # between SIGTERM and SIGKILL of a stage's process group (the CLI saves on SIGTERM)

# The files OUT receives, all flat (the device tool returns at most 8 files, 16 MiB each).
REPORT_JSON, REPORT_MD, ROWS, LOG, ARCHIVE = (
    "gpu_report.json", "gpu_report.md", "gpu_rows.jsonl", "gpu_suite.log", "gpu_suite.tar.gz")
OUT_FILES = (REPORT_JSON, REPORT_MD, ROWS, LOG, ARCHIVE)
# Left out of the archive: model weights, checkpoints and caches (megabytes to gigabytes, and no figure).
EXCLUDED_DIRS = frozenset({"checkpoints", "cache", ".cache", "__pycache__"})
EXCLUDED_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin", ".arrow", ".part")
MAX_ARCHIVED_FILE_BYTES = 4 * 1024**2
MAX_ARCHIVED_TOTAL_BYTES = 48 * 1024**2  # uncompressed; the logs and JSON compress several times over
PREFLIGHT_PACKAGES = ("torch", "transformers", "lightning", "peft", "deepspeed")
# Stage statuses that mean the stage ran to its end (passed or not).
FINISHED = ("ok", "failed")
NOTES = {
    "deepspeed_zero2": "deepspeed_zero2 runs at --trainer.devices 1 (one GPU is lent): a smoke test of "
                       "fit / checkpoint / resume / export through DeepSpeed ZeRO-2, not of sharding (with one "
                       "rank nothing is partitioned).",
    "dry_run": "dry run: tiny shapes on the CPU, DeepSpeed replaced by the plain CPU strategy, and the HF "
               "static-cache baseline run without torch.compile (compiling on a shared CPU would take longer "
               "than the whole dry run); the figures check the plumbing, not the speed.",
}
# Test hook: seconds to sleep after each appended row, so a test can signal the suite between two rows.
ROW_PAUSE_ENV = "KANGAROO_GPU_SUITE_ROW_PAUSE_S"


class StageFailed(AssertionError):
    """A stage ran but what it checks did not hold (the message says what)."""


class SuiteInterrupted(BaseException):
    """SIGTERM or SIGINT reached the suite: stop the stage, keep what was measured, pack, exit.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that a stage's ``except Exception`` does not
    swallow it.
    """

    def __init__(self, reason: str, signum: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.signum = signum


class StageTimeout(BaseException):
    """An in-process stage ran past its time (SIGALRM); a ``BaseException`` for the same reason."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise StageFailed(message)


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where one invocation writes: ``out`` (the few files that come back) and ``run`` (everything else)."""

    out: Path
    run: Path

    @property
    def rows(self) -> Path:
        return self.out / ROWS

    @property
    def log(self) -> Path:
        return self.out / LOG

    @property
    def bench(self) -> Path:
        return self.run / "bench"


def append_row(path: str | Path | None, row: dict[str, Any]) -> None:
    """Append one finished measurement to the results file as a JSON line (no-op when ``path`` is None).

    Opened, written and closed per row, so a row is on disk before the next measurement starts and
    survives the process being killed.
    """
    if path is None:
        return
    line = json.dumps({"time_utc": _now(), **row}, default=str)
    with open(path, "a") as f:
        f.write(line + "\n")
    pause = float(os.environ.get(ROW_PAUSE_ENV) or 0)
    if pause > 0:
        time.sleep(pause)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file; a last line cut by a kill is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# Stages: each takes (paths, dry_run) and returns a JSON-able result, or raises


def stage_environment(paths: RunPaths, dry_run: bool) -> dict[str, Any]:
    import torch

    from kangaroo_lit.bench.common import machine_info

    cuda = torch.cuda.is_available()
    check(cuda or dry_run, "CUDA is not available: run with --dry-run on a CPU machine")
    info = machine_info("cuda" if cuda and not dry_run else "cpu")
    if dry_run:  # DeepSpeed is not used on the CPU (and its import alone takes seconds)
        info["deepspeed_import"] = f"not imported (dry run; installed: {info['versions'].get('deepspeed')})"
    else:
        try:
            import deepspeed

            info["deepspeed_import"] = deepspeed.__version__
        except Exception as err:  # noqa: BLE001 - reported; the DeepSpeed stage then fails with it
            info["deepspeed_import"] = f"failed: {type(err).__name__}: {err}"
    if cuda:
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 1)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    return info


def _fit_args(root: Path, cache: Path, dry_run: bool, steps: int, half: int) -> list[str]:
    """``fit`` of the embedded tiny Llama, through DeepSpeed ZeRO-2 on the GPU (plain CPU in a dry run)."""
    strategy = (["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"] if dry_run else
                ["--config", str(CONFIGS / "deepspeed-zero2.yaml"), "--model.dtype", "bfloat16"])
    return ["fit", "--config", str(CONFIGS / "tiny.yaml"), *strategy, "--trainer.devices", "1",
            "--trainer.max_epochs", "-1", "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
            "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
            "--checkpoint.every_n_train_steps", str(half), "--checkpoint.save_top_k", "-1",
            "--data.max_rows", "400" if dry_run else "1600", "--data.batch_size", "8" if dry_run else "16",
            "--data.cache_dir", str(cache), "--model.optimizer.warmup_steps", "2"]


def _losses(root: Path) -> dict[int, float]:
    """``train/loss`` by step from the run's CSV logs (every version: a resumed run adds one)."""
    losses = {}
    for path in sorted(root.rglob("metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _cli(argv: list[str]) -> tuple[int, str]:
    """``kangaroo-lit ARGV`` in this process: (exit code, what it printed on stdout).

    The CLI's ``fit`` catches SIGTERM and SIGINT itself (it saves and exits 143 / 130): in a dry run,
    where the stage runs in the suite's own process, that exit is turned back into the suite's stop.
    """
    from kangaroo_lit.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    for signum in (signal.SIGTERM, signal.SIGINT):
        if code == 128 + signum:
            raise SuiteInterrupted(signal.Signals(signum).name, signum)
    return code, buffer.getvalue()


def stage_deepspeed_zero2(paths: RunPaths, dry_run: bool) -> dict[str, Any]:
    import torch

    from kangaroo_lit.checkpointing import load_checkpoint

    steps, half = (4, 2) if dry_run else (40, 20)
    root, cache = paths.run / "zero2", paths.run / "cache"
    code, _ = _cli(_fit_args(root / "straight", cache, dry_run, steps, half))
    check(code == 0, f"fit exited with {code}")
    ckpts = root / "straight" / "checkpoints"
    last, middle = ckpts / "last.ckpt", ckpts / f"epoch=0-step={half}.ckpt"
    check(last.exists() and middle.exists(), f"expected {last} and {middle}; found {sorted(os.listdir(ckpts))}")
    layout = "directory" if last.is_dir() else "file"
    if not dry_run:
        check(layout == "directory" and (last / "checkpoint" / "mp_rank_00_model_states.pt").is_file(),
              f"{last} is not a DeepSpeed checkpoint directory")
    code, _ = _cli([*_fit_args(root / "resumed", cache, dry_run, steps, half), "--ckpt_path", str(middle)])
    check(code == 0, f"resumed fit exited with {code}")
    straight, resumed = _losses(root / "straight"), _losses(root / "resumed")
    after = sorted(s for s in resumed if s >= half)
    check(bool(after) and all(s in straight for s in after), f"resumed run logged steps {sorted(resumed)}")
    differences = [abs(resumed[s] - straight[s]) for s in after]
    checkpoint = load_checkpoint(last)
    trainable = sum(v.numel() for v in checkpoint["state_dict"].values())
    check(checkpoint["global_step"] == steps, f"last.ckpt holds step {checkpoint['global_step']}, not {steps}")

    artifact = root / "artifact"
    code, printed = _cli(["export", "--ckpt_path", str(last), "--out_dir", str(artifact)])
    check(code == 0, f"export exited with {code}")
    device, dtype = ("cpu", "float32") if dry_run else ("cuda", "bfloat16")
    code, printed = _cli(["generate", "--artifact", str(artifact), "--format", "instruction", "--prompt",
                          "What is 12 plus 7?", "--max_new_tokens", "24", "--compare_vanilla", "--json",
                          "--device", device, "--dtype", dtype])
    check(code == 0, f"generate exited with {code}")
    generated = json.loads(printed.strip().splitlines()[-1])
    result = {
        "strategy": "cpu (dry run)" if dry_run else "KangarooDeepSpeedStrategy stage 2, bf16-mixed",
        "devices": 1, "note": NOTES["deepspeed_zero2"],
        "steps": steps, "resumed_from_step": half, "checkpoint_layout": layout,
        "checkpoint_bytes": _size(last), "trainable_tensors_in_checkpoint": len(checkpoint["state_dict"]),
        "trainable_numel_in_checkpoint": trainable, "losses_straight": straight, "losses_resumed": resumed,
        "resume_loss_max_abs_diff": max(differences), "artifact": str(artifact),
        "generate": {k: generated.get(k) for k in ("text", "new_tokens", "mat", "accept_rate", "speedup",
                                                     "identical")},
        "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 3) if torch.cuda.is_available() else None,
    }
    # fp32 on one CPU thread is bitwise repeatable; bf16 kernels on a GPU may differ in the last bits
    check(max(differences) <= (1e-5 if dry_run else 5e-2), f"resumed losses differ by {max(differences):.3g}")
    check(generated.get("identical") is True or not dry_run, f"generate output differs from vanilla: {generated}")
    return result


def stage_deepspeed_zero3(paths: RunPaths, dry_run: bool) -> dict[str, Any]:
    from kangaroo_lit.checkpointing import ZERO3_REFUSAL

    argv = ["fit", "--config", str(CONFIGS / "tiny.yaml"), "--config", str(CONFIGS / "deepspeed-zero3.yaml"),
            "--trainer.devices", "1", "--trainer.max_steps", "2", "--trainer.default_root_dir",
            str(paths.run / "zero3"), "--data.max_rows", "100", "--data.cache_dir", str(paths.run / "cache")]
    if dry_run:
        argv += ["--trainer.accelerator", "cpu"]  # the refusal comes before Lightning's CUDA check
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code, _ = _cli(argv)
    message = stderr.getvalue()
    check(code == 2 and ZERO3_REFUSAL in message, f"expected the ZeRO-3 refusal (exit 2), got exit {code}: "
                                                  f"{message[-500:]}")
    return {"refused": True, "exit_code": code, "message": ZERO3_REFUSAL}


def stage_bf16_identical(paths: RunPaths, dry_run: bool) -> dict[str, Any]:
    artifact = paths.run / "zero2" / "artifact"
    check(artifact.is_dir(), f"{artifact} missing: the deepspeed_zero2 stage did not export one")
    import torch

    from kangaroo_lit.artifact import load_artifact
    from kangaroo_lit.data.prompts import format_prompt
    from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder
    from kangaroo_lit.embedded import ASSETS_DIR

    device = "cpu" if dry_run else "cuda"
    n_prompts, new_tokens = (3, 8) if dry_run else (64, 64)
    rows = [json.loads(line) for line in (ASSETS_DIR / "tiny-instruct.jsonl").read_text().splitlines()[-n_prompts:]]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
    prompts = [tokenizer(format_prompt(r["instruction"], r.get("context", "")), return_tensors="pt").input_ids
               for r in rows]
    result = {"prompts": n_prompts, "max_new_tokens": new_tokens, "device": device}
    for dtype in ("bfloat16", "float32"):
        model = load_artifact(artifact, dtype=dtype, device=device)
        model.merge_lora_for_decoding()  # as every decoding front-end does (load_for_decoding)
        spec, vanilla = SelfSpeculativeDecoder(model, threshold=0.3, max_draft=6), VanillaDecoder(model)
        same, mats = 0, []
        with torch.no_grad():
            for ids in prompts:
                ids = ids.to(device)
                s = spec.generate(ids, new_tokens, tokenizer.eos_token_id)
                v = vanilla.generate(ids, new_tokens, tokenizer.eos_token_id)
                same += int(s.tokens == v.tokens)
                mats.append(s.mat)
        result[dtype] = {"identical_fraction": same / n_prompts, "mean_mat": sum(mats) / len(mats)}
    check(result["float32"]["identical_fraction"] == 1.0, "float32 outputs differ from vanilla decoding")
    return result


def stage_cost_model(paths: RunPaths, dry_run: bool) -> dict[str, Any]:
    from kangaroo_lit.bench.cost_model import cost_model

    if dry_run:  # the static-cache baseline runs eager here: see NOTES["dry_run"]
        report = cost_model(shape="tiny", device="cpu", dtype="float32", exit_layer=1, ks=(2, 3, 4), repeats=2,
                            max_draft=2, runs=1, forced_new_tokens=10, threads=1, out_dir=str(paths.bench),
                            hf_static_cache="eager", rows_file=str(paths.rows))
    else:
        report = cost_model(shape="llama2-7b", device="cuda", dtype="bfloat16", exit_layer=(1, 2), repeats=20,
                            runs=2, out_dir=str(paths.bench), hf_static_cache="compiled", rows_file=str(paths.rows))
    return {"report": report, "markdown": _read_md(paths.bench, "decode_cost_")}


def stage_tree_vs_chain(paths: RunPaths, dry_run: bool) -> dict[str, Any]:
    """Chain vs tree drafts at this device's own cost model (the ``cost_model`` stage's report, exit layer 1),
    with a synthetic draft of the shipped SmolLM2 draft's top-k agreement (a lent GPU has no trained one)."""
    from kangaroo_lit.bench.tree_vs_chain import tree_vs_chain

    reports = sorted(paths.bench.glob("decode_cost_*.json"))
    cost = str(reports[-1]) if reports else None  # else the built-in table of the device
    if dry_run:
        report = tree_vs_chain(shape="tiny", device="cpu", dtype="float32", exit_layer=1, cost_model=cost,
                               prompt_tokens=16, new_tokens=24, runs=1, threads=1, out_dir=str(paths.bench),
                               rows_file=str(paths.rows))
    else:
        report = tree_vs_chain(shape="llama2-7b", device="cuda", dtype="bfloat16", exit_layer=1, cost_model=cost,
                               prompt_tokens=128, new_tokens=128, tree_nodes=15, runs=3, out_dir=str(paths.bench),
                               rows_file=str(paths.rows))
    return {"report": report, "markdown": _read_md(paths.bench, "tree_vs_chain_")}


def stage_train_step(paths: RunPaths, dry_run: bool) -> dict[str, Any]:
    from kangaroo_lit.bench.train_step import train_step

    if dry_run:
        report = train_step(shape="tiny", device="cpu", seq_len=32, batch_size=2, steps=2, warmup=1, threads=1,
                            in_process=True, out_dir=str(paths.bench), rows_file=str(paths.rows))
    else:
        report = train_step(shape="llama2-7b", device="cuda", steps=6, warmup=2, worker_timeout=120,
                            out_dir=str(paths.bench), rows_file=str(paths.rows))
    return {"report": report, "markdown": _read_md(paths.bench, "train_step_")}


def _read_md(folder: Path, prefix: str) -> str | None:
    found = sorted(folder.glob(f"{prefix}*.md"))
    return found[-1].read_text() if found else None


StageFunction = Callable[[RunPaths, bool], dict[str, Any]]
STAGE_FUNCTIONS: dict[str, StageFunction] = {name: globals()[f"stage_{name}"] for name in STAGES}


# --------------------------------------------------------------------------------------------------
# Preflight: what the machine has, without importing torch (the parent process stays off the GPU)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gpu_name() -> str:
    """``name, memory`` of the first GPU from nvidia-smi (the parent must not hold a CUDA context)."""
    if shutil.which("nvidia-smi") is None:
        return "none (no nvidia-smi)"
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown (nvidia-smi: {err})"
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else f"unknown (nvidia-smi exit {proc.returncode})"


def preflight() -> dict[str, str]:
    """The GPU and the versions that decide whether the figures compare with earlier ones."""
    return {"gpu": _gpu_name(), **{name: _version(name) for name in PREFLIGHT_PACKAGES},
            "python": sys.version.split()[0]}


def preflight_line(info: dict[str, str], revision: str | None) -> str:
    packages = ", ".join(f"{name} {info[name]}" for name in PREFLIGHT_PACKAGES)
    return f"preflight: GPU {info['gpu']}; python {info['python']}; {packages}; revision {revision or 'unknown'}"


def resolve_revision(given: str | None) -> tuple[str | None, str]:
    """(revision, where it came from): ``--revision``, then ``KANGAROO_REVISION``, then git in this checkout.

    The GPU machine receives the working tree without ``.git``, so there the revision must be passed in.
    """
    if given:
        return given, "--revision"
    if os.environ.get("KANGAROO_REVISION"):
        return os.environ["KANGAROO_REVISION"], "KANGAROO_REVISION"
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=10)
            return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else ""), "git"
    except (OSError, subprocess.SubprocessError):
        pass
    return None, "unknown (no --revision, no KANGAROO_REVISION, no git)"


# --------------------------------------------------------------------------------------------------
# Directories, log, report files


def new_run(out: str | Path, work_dir: str | Path | None = None) -> RunPaths:
    """Create OUT (removing only this suite's files from an earlier run) and a fresh run directory."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in (*OUT_FILES, f"{ARCHIVE}.part", f"{REPORT_JSON}.part"):
        (out / name).unlink(missing_ok=True)
    root = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "kangaroo_gpu_suite"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root.mkdir(parents=True, exist_ok=True)
    # A new directory every time (mkdtemp never reuses a name): an old run's checkpoints would be met again.
    run = Path(tempfile.mkdtemp(prefix=f"run-{stamp}-", dir=root.resolve()))
    return RunPaths(out=out, run=run)


def say(paths: RunPaths, message: str) -> None:
    """A line of the suite's progress: on stderr and in OUT's log."""
    print(message, file=sys.stderr, flush=True)
    with paths.log.open("a") as f:
        f.write(f"[{_now()}] {message}\n")


def write_report(paths: RunPaths, report: dict[str, Any]) -> None:
    """Both report files, the JSON replaced atomically (a kill mid-write leaves the previous one)."""
    tmp = paths.out / f"{REPORT_JSON}.part"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, paths.out / REPORT_JSON)
    (paths.out / REPORT_MD).write_text(markdown(report, read_rows(paths.rows)))


def _archived(path: Path) -> str | None:
    """Why ``path`` stays out of the archive, or None when it goes in."""
    if path.name.endswith(EXCLUDED_SUFFIXES):
        return "weights or checkpoint"
    if path.is_symlink() or not path.is_file():
        return "not a plain file"
    if path.stat().st_size > MAX_ARCHIVED_FILE_BYTES:
        return f"over {MAX_ARCHIVED_FILE_BYTES // 1024**2} MiB"
    return None


def pack_run(paths: RunPaths) -> dict[str, Any]:
    """``OUT/gpu_suite.tar.gz``: the run directory without checkpoints, caches and weights."""
    part, archive = paths.out / f"{ARCHIVE}.part", paths.out / ARCHIVE
    added, total, left_out = 0, 0, []
    with tarfile.open(part, "w:gz") as tar:
        for folder, dirs, files in os.walk(paths.run):
            here = Path(folder)
            for name in sorted(dirs):
                if name in EXCLUDED_DIRS or name.endswith(EXCLUDED_SUFFIXES):  # DeepSpeed's last.ckpt/ too
                    left_out.append(f"{(here / name).relative_to(paths.run)}/ (checkpoints or cache)")
                    dirs.remove(name)
            dirs.sort()
            for name in sorted(files):
                path = here / name
                why = _archived(path)
                if why is None and total + path.stat().st_size > MAX_ARCHIVED_TOTAL_BYTES:
                    why = "the archive is full"
                if why:
                    left_out.append(f"{path.relative_to(paths.run)} ({why})")
                    continue
                tar.add(path, arcname=str(Path(paths.run.name) / path.relative_to(paths.run)), recursive=False)
                added, total = added + 1, total + path.stat().st_size
    os.replace(part, archive)
    return {"file": ARCHIVE, "bytes": archive.stat().st_size, "files": added, "uncompressed_bytes": total,
            "left_out": left_out[:40], "left_out_count": len(left_out)}


# --------------------------------------------------------------------------------------------------
# Running stages


@contextlib.contextmanager
def _signals(handler: Callable[[int, Any], None] | int, *signums: int) -> Iterator[None]:
    """``handler`` for these signals inside the block (main thread only), the previous ones after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _ignore_stop_signals() -> None:
    """From here on SIGTERM and SIGINT are ignored: a second one must not stop the packing of the results."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)


def _raise_interrupted(signum: int, frame: Any) -> None:
    _ignore_stop_signals()
    raise SuiteInterrupted(signal.Signals(signum).name, signum)


def _raise_timeout(signum: int, frame: Any) -> None:
    raise StageTimeout()


@contextlib.contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Raise :class:`StageTimeout` in this (main) thread after ``seconds``; nothing when None."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    with _signals(_raise_timeout, signal.SIGALRM):
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def run_stage(name: str, paths: RunPaths, dry_run: bool, timeout: float | None = None) -> dict[str, Any]:
    """Run one stage in this process; its entry of the report. :class:`SuiteInterrupted` passes through."""
    start = time.monotonic()
    try:
        with _alarm(timeout):
            result = STAGE_FUNCTIONS[name](paths, dry_run)
        entry = {"status": "ok", "result": result}
    except StageTimeout:
        entry = {"status": "timeout", "error": f"stopped after {timeout:.0f} s"}
    except StageFailed as err:
        entry = {"status": "failed", "error": str(err)}
    except Exception as err:  # noqa: BLE001 - a stage's crash is its result; the suite goes on
        entry = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    entry["seconds"] = round(time.monotonic() - start, 1)
    return entry


def kill_group(proc: subprocess.Popen, grace: float = KILL_GRACE_S) -> None:
    """End ``proc``'s whole process group: SIGTERM, ``grace`` seconds, then SIGKILL for whatever is left
    (a benchmark's worker holding the GPU included, even when the stage's own process already exited)."""
    pgid = proc.pid  # start_new_session=True made it the leader of its group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait()


def run_in_group(command: list[str], log: Path, timeout: float) -> tuple[int | None, int]:
    """Run ``command`` in a new session (its own process group), output appended to ``log``, and end the
    whole group afterwards: (exit code or None on timeout, the group's id). On :class:`SuiteInterrupted`
    (or any other exception) the group is ended before it propagates."""
    with log.open("a") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return None, proc.pid
        except BaseException:
            kill_group(proc)
            raise
        # Stragglers (a worker the stage left behind) must not keep the GPU for the next stage.
        kill_group(proc, grace=0)
    return code, proc.pid


def run_stage_in_subprocess(name: str, paths: RunPaths, timeout: float, dry_run: bool = False) -> dict[str, Any]:
    """Run one stage in its own process group (``python -m kangaroo_lit.bench.gpu_suite OUT --stage NAME
    --run_dir RUN``); its output goes to OUT's log, its entry comes back in ``RUN/stages/NAME.json``."""
    start = time.monotonic()
    result_file = paths.run / "stages" / f"{name}.json"
    result_file.unlink(missing_ok=True)
    offset = paths.log.stat().st_size if paths.log.is_file() else 0
    command = [sys.executable, "-m", "kangaroo_lit.bench.gpu_suite", str(paths.out), "--stage", name,
               "--run_dir", str(paths.run), *(["--dry-run"] if dry_run else [])]
    code, pgid = run_in_group(command, paths.log, timeout)
    if result_file.is_file():
        try:
            entry = json.loads(result_file.read_text())
        except ValueError:  # written atomically, so only a foreign or damaged file: a failed stage
            entry = {"status": "failed", "error": f"the stage's result file {result_file.name} is not JSON"}
    elif code is None:
        entry = {"status": "timeout", "error": f"killed (its whole process group) after {timeout:.0f} s"}
    else:
        entry = {"status": "failed", "error": f"the stage's process exited with {code} without a result"}
    entry["seconds"] = round(time.monotonic() - start, 1)
    entry["process_group"] = pgid
    if entry["status"] != "ok":
        entry["log_tail"] = _log_since(paths.log, offset)[-3000:]
    return entry


def _log_since(log: Path, offset: int) -> str:
    if not log.is_file():
        return ""
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def new_report(paths: RunPaths, dry_run: bool, stages: tuple[str, ...], budget_s: float,
               revision: str | None, revision_source: str, info: dict[str, str]) -> dict[str, Any]:
    notes = [NOTES["deepspeed_zero2"]] if "deepspeed_zero2" in stages else []
    if dry_run:
        notes.append(NOTES["dry_run"])
    return {"suite": "kangaroo_lit GPU suite", "dry_run": dry_run, "revision": revision,
            "revision_source": revision_source, "preflight": info, "preflight_line": preflight_line(info, revision),
            "started_utc": _now(), "out_dir": str(paths.out), "run_dir": str(paths.run), "budget_s": budget_s,
            "complete": False, "cut": None, "all_ok": False, "seconds": None, "notes": notes,
            "stages": {name: {"status": "pending"} for name in stages}}


def finish(paths: RunPaths, report: dict[str, Any], start: float) -> dict[str, Any]:
    """Mark what finished, write the report, pack the archive, write the report again (with the archive)."""
    stages = report["stages"]
    for entry in stages.values():
        if entry["status"] in ("pending", "running"):
            entry["status"] = "not run"
    report["seconds"] = round(time.monotonic() - start, 1)
    report["stages_finished"] = [n for n, e in stages.items() if e["status"] in FINISHED]
    report["stages_not_finished"] = [n for n, e in stages.items() if e["status"] not in FINISHED]
    report["complete"] = report["cut"] is None and not report["stages_not_finished"]
    report["all_ok"] = report["complete"] and all(e["status"] == "ok" for e in stages.values())
    report["rows"] = dict(Counter(str(r.get("bench")) for r in read_rows(paths.rows)))
    write_report(paths, report)  # first: if packing is killed, the report is already there
    try:
        report["archive"] = pack_run(paths)
    except Exception as err:  # noqa: BLE001 - the report and the rows must come back even without it
        report["archive"] = {"error": f"{type(err).__name__}: {err}"}
    write_report(paths, report)
    return report


def run_suite(out: str | Path, dry_run: bool = False, stages: tuple[str, ...] = STAGES, isolate: bool | None = None,
              budget_s: float = BUDGET_S, work_dir: str | Path | None = None,
              revision: str | None = None) -> dict[str, Any]:
    """Run the stages (isolated in process groups unless a dry run), keep every figure in OUT as it comes,
    pack the run at the end or when cut (SIGTERM, SIGINT, the budget); returns the report."""
    start = time.monotonic()
    paths = new_run(out, work_dir)
    isolate = (not dry_run) if isolate is None else isolate
    revision, source = resolve_revision(revision)
    info = preflight()
    report = new_report(paths, dry_run, stages, budget_s, revision, source, info)
    say(paths, report["preflight_line"])
    say(paths, f"run directory {paths.run}; results into {paths.out}")
    write_report(paths, report)
    current = None
    with _signals(_raise_interrupted, signal.SIGTERM, signal.SIGINT):
        try:
            for name in stages:
                current, stage_start = name, time.monotonic()
                left = budget_s - PACK_RESERVE_S - (stage_start - start)
                if left < MIN_STAGE_S:
                    report["cut"] = report["cut"] or f"time budget of {budget_s:.0f} s"
                    report["stages"][name] = {"status": "skipped", "error": f"time budget of {budget_s:.0f} s spent"}
                    continue
                timeout = min(TIMEOUTS[name], left)
                say(paths, f"== {name} ({stage_start - start:.0f} s in; at most {timeout:.0f} s)")
                report["stages"][name] = {"status": "running", "timeout_s": round(timeout)}
                write_report(paths, report)
                if isolate:
                    entry = run_stage_in_subprocess(name, paths, timeout, dry_run)
                else:
                    entry = run_stage(name, paths, dry_run, timeout)
                report["stages"][name] = {**entry, "timeout_s": round(timeout)}
                write_report(paths, report)
                error = f": {entry['error']}" if entry.get("error") else ""
                say(paths, f"   {entry['status']} in {entry['seconds']} s{error}")
            current = None
        except SuiteInterrupted as stop:
            report["cut"] = stop.reason
            report["exit_signal"] = stop.signum
            if current is not None:
                report["stages"][current] = {
                    "status": "interrupted", "error": f"{stop.reason} during the stage",
                    "seconds": round(time.monotonic() - stage_start, 1)}
            say(paths, f"   {stop.reason}: stopping{f' {current}' if current else ''}; packing what was measured")
        _ignore_stop_signals()  # the previous handlers come back when the block ends, after the packing
        return finish(paths, report, start)


# --------------------------------------------------------------------------------------------------
# The report for people


def _headline(name: str, entry: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    r = entry.get("result") or {}
    if entry["status"] != "ok":
        text = (entry.get("error") or "").splitlines()[0][:160] if entry.get("error") else ""
        kept = sum(row.get("bench") == name for row in rows)
        return f"{text}; {kept} finished rows kept" if kept else text
    if name == "environment":
        return f"{r.get('gpu') or r.get('cpu')}; torch {r.get('torch')}; deepspeed {r.get('deepspeed_import')}"
    if name == "deepspeed_zero2":
        g = r["generate"]
        return (f"{r['checkpoint_layout']} checkpoint, {r['checkpoint_bytes'] / 1e6:.1f} MB; resumed losses within "
                f"{r['resume_loss_max_abs_diff']:.2g}; generate identical={g['identical']}, MAT {g['mat']:.2f} "
                "(1 device: smoke test, not sharding)")
    if name == "deepspeed_zero3":
        return "refused with its reason (exit 2)"
    if name == "bf16_identical":
        return (f"bf16 {r['bfloat16']['identical_fraction']:.3f}, fp32 {r['float32']['identical_fraction']:.3f} "
                f"of {r['prompts']} prompts identical")
    return "see the tables below"


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "?"


def rows_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The finished rows, one line each: what a stage cut short still measured."""
    lines = []
    for row in rows:
        bench, kind = row.get("bench"), row.get("kind", "")
        if "error" in row:
            text = f"error: {str(row['error']).splitlines()[0][:120]}"
        elif bench == "train_step":
            text = (f"{row.get('mode')}/{row.get('impl')}: {_fmt(row.get('step_time_s', 0) * 1e3, '.1f')} ms/step, "
                    f"{_fmt(row.get('tokens_per_s'), ',.0f')} tokens/s, "
                    f"peak {_fmt(row.get('peak_memory_bytes'), ',')} B")
        elif kind == "costs":
            text = (f"exit layer {row.get('exit_layer')}: c {_fmt(row.get('c'), '.3f')}, full step "
                    f"{_fmt((row.get('times_s') or {}).get('full', 0) * 1e3, '.3f')} ms")
        elif kind == "forced":
            text = (f"exit layer {row.get('exit_layer')}: realised {_fmt(row.get('realised'), '.3f')}x vs predicted "
                    f"{_fmt(row.get('predicted'), '.3f')}x, "
                    f"vs HF generate {_fmt(row.get('realised_vs_generate'), '.3f')}x")
        elif kind == "hf_static_cache":
            text = (f"HF static cache ({row.get('compile')}): {_fmt(row.get('tokens_per_s'), '.1f')} tok/s vs eager "
                    f"{_fmt(row.get('eager_tokens_per_s'), '.1f')}; compile + warm-up "
                    f"{_fmt(row.get('compile_and_warmup_s'), '.1f')} s")
        else:
            text = ", ".join(f"{k}={v}" for k, v in row.items() if not isinstance(v, (dict, list)))[:160]
        lines.append(f"* {bench} {kind}: {text}".replace("  ", " "))
    return lines


def markdown(report: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> str:
    rows = rows or []
    status = ("complete" if report["complete"] else
              f"INCOMPLETE (cut: {report['cut']})" if report.get("cut") else "INCOMPLETE")
    seconds = f"{report['seconds']} s" if report.get("seconds") is not None else "running"
    lines = [f"# GPU suite{' (dry run: tiny shapes on CPU)' if report['dry_run'] else ''}", "",
             f"Revision `{report.get('revision') or 'unknown'}` ({report.get('revision_source')}); started "
             f"{report['started_utc']}; {seconds} (budget {report['budget_s']:.0f} s); **{status}**.", "",
             f"`{report['preflight_line']}`", ""]
    lines += [f"* {note}" for note in report.get("notes", [])]
    lines += ["", "| stage | status | seconds | result |", "| --- | --- | ---: | --- |"]
    for name, entry in report["stages"].items():
        text = _headline(name, entry, rows).replace("|", "/")
        lines.append(f"| {name} | {entry['status']} | {entry.get('seconds', '')} | {text} |")
    for name in ("cost_model", "train_step"):
        md = ((report["stages"].get(name) or {}).get("result") or {}).get("markdown")
        if md:
            lines += ["", f"## {name}", "", md.strip()]
    unreported = [r for r in rows if not ((report["stages"].get(r.get("bench")) or {}).get("result") or {})]
    if unreported:
        lines += ["", f"## Rows of stages that did not finish ({ROWS})", "", *rows_markdown(unreported)]
    archive = report.get("archive") or {}
    if archive.get("file"):
        lines += ["", f"Archive `{archive['file']}`: {archive['files']} files of the run directory, "
                      f"{archive['bytes'] / 1e6:.2f} MB; {archive['left_out_count']} left out (checkpoints, "
                      f"caches, weights). Unpack with `tar xzf {archive['file']}`."]
    return "\n".join(lines) + "\n"


def exit_code(report: dict[str, Any]) -> int:
    """0 when every stage ran and passed; 128 + the signal when stopped by one; else 1."""
    if report.get("exit_signal"):
        return 128 + report["exit_signal"]
    return 0 if report["all_ok"] else 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="scripts/gpu_suite.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help=f"output folder: {', '.join(OUT_FILES)} (nothing else, no sub-folders)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, stages in this process")
    parser.add_argument("--stage", choices=STAGES, help="run only this stage, in this process (used by the suite)")
    parser.add_argument("--run_dir", help="the run directory of --stage (used by the suite)")
    parser.add_argument("--isolate", action="store_true",
                        help="with --dry-run: each stage in its own process group anyway, as on the GPU")
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    parser.add_argument("--budget_s", type=float, default=BUDGET_S, help="seconds for the whole suite")
    parser.add_argument("--work_dir", help="parent of the run directories (default: <tmp>/kangaroo_gpu_suite)")
    parser.add_argument("--revision", help="the commit being measured (default: $KANGAROO_REVISION, then git)")
    args = parser.parse_args(argv)
    if args.stage:  # one isolated stage: write its entry where the parent looks for it
        if not args.run_dir:
            parser.error("--stage needs --run_dir")
        paths = RunPaths(out=Path(args.out).resolve(), run=Path(args.run_dir).resolve())
        entry = run_stage(args.stage, paths, args.dry_run)
        path = paths.run / "stages" / f"{args.stage}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Beside, then renamed: a timeout's SIGTERM during the write must not leave half a file to parse.
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(entry, default=str) + "\n")
        os.replace(tmp, path)
        return 0 if entry["status"] == "ok" else 1
    report = run_suite(args.out, dry_run=args.dry_run, stages=tuple(args.only or STAGES), budget_s=args.budget_s,
                       work_dir=args.work_dir, revision=args.revision, isolate=True if args.isolate else None)
    verdict = ("all stages ok" if report["all_ok"] else
               f"INCOMPLETE ({report['cut']})" if report["cut"] else "some stages FAILED")
    print(f"wrote {', '.join(sorted(p.name for p in Path(report['out_dir']).iterdir()))} into {report['out_dir']}: "
          f"{verdict} in {report['seconds']} s; revision {report['revision'] or 'unknown'}")
    return exit_code(report)


if __name__ == "__main__":
    sys.exit(main())
