"""The project's GPU checks in one command: ``bash scripts/gpu_suite.sh OUT`` (``--dry-run``: tiny, on CPU).

Writes ``OUT/gpu_report.json`` (every number, per stage: status, seconds, result or error) and
``OUT/gpu_report.md`` (the same for people, with the benchmarks' own tables), then exits 0 when every
stage passed, 1 otherwise. The stages, in order (each within the time left of ``budget_s``):

* ``environment``: versions, the GPU, whether DeepSpeed imports.
* ``deepspeed_zero2``: the embedded tiny Llama trained through the real CLI with
  ``configs/deepspeed-zero2.yaml`` (bf16-mixed): a straight run checkpointing every ``half`` steps, a
  second run resumed from its step-``half`` checkpoint directory (losses compared step by step), the
  checkpoint directory's layout and size (frozen base excluded), ``kangaroo-lit export`` of it and
  ``kangaroo-lit generate --compare_vanilla`` with the artifact.
* ``deepspeed_zero3``: ``configs/deepspeed-zero3.yaml`` must be refused with its reason (exit 2).
* ``bf16_identical``: the fraction of held-out prompts whose greedy self-speculative output equals the
  vanilla loop's, in bfloat16 and (control) float32, with the artifact of ``deepspeed_zero2``.
* ``cost_model``: ``kangaroo-lit bench cost_model`` on the Llama-2-7B shape (random bf16 weights, exit
  layers 1 and 2, 20 repeats, 2 forced-acceptance runs).
* ``train_step``: ``kangaroo-lit bench train_step`` on the Llama-2-7B shape (SGP vs joint vs LoRA, Lightning
  vs raw loop; 2 warm-up + 6 measured steps per worker), last because it is the longest: when the budget
  runs out it is the one cut (rerun it alone with ``--only train_step``).

On the GPU every stage runs in its own process (a CUDA error or a DeepSpeed crash fails that stage,
not the suite) with a timeout; ``--dry-run`` runs the same stage functions in this process with tiny
shapes on the CPU (DeepSpeed is then replaced by the plain CPU strategy: it needs CUDA), which is what
the default test tier checks (``tests/test_gpu_suite.py``).

    bash scripts/gpu_suite.sh /tmp/gpu            # on the GPU machine (about 7 minutes on an H100/H200)
    bash scripts/gpu_suite.sh /tmp/gpu --dry-run  # here, CPU only, under a minute
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
STAGES = ("environment", "deepspeed_zero2", "deepspeed_zero3", "bf16_identical", "cost_model", "train_step")
# Seconds each stage may take on the GPU (its own process is killed after that).
TIMEOUTS = {"environment": 60, "deepspeed_zero2": 180, "deepspeed_zero3": 60, "bf16_identical": 120,
            "cost_model": 180, "train_step": 300}
BUDGET_S = 480  # the whole suite: 8 minutes


class StageFailed(AssertionError):
    """A stage ran but what it checks did not hold (the message says what)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise StageFailed(message)


# --------------------------------------------------------------------------------------------------
# Stages: each takes (out_dir, dry_run) and returns a JSON-able result, or raises


def stage_environment(out: Path, dry_run: bool) -> dict[str, Any]:
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
    """``kangaroo-lit ARGV`` in this process: (exit code, what it printed on stdout)."""
    from kangaroo_lit.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue()


def stage_deepspeed_zero2(out: Path, dry_run: bool) -> dict[str, Any]:
    import torch

    from kangaroo_lit.checkpointing import load_checkpoint

    steps, half = (4, 2) if dry_run else (40, 20)
    root, cache = out / "zero2", out / "cache"
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


def stage_deepspeed_zero3(out: Path, dry_run: bool) -> dict[str, Any]:
    from kangaroo_lit.checkpointing import ZERO3_REFUSAL

    argv = ["fit", "--config", str(CONFIGS / "tiny.yaml"), "--config", str(CONFIGS / "deepspeed-zero3.yaml"),
            "--trainer.devices", "1", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(out / "zero3"),
            "--data.max_rows", "100", "--data.cache_dir", str(out / "cache")]
    if dry_run:
        argv += ["--trainer.accelerator", "cpu"]  # the refusal comes before Lightning's CUDA check
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code, _ = _cli(argv)
    message = stderr.getvalue()
    check(code == 2 and ZERO3_REFUSAL in message, f"expected the ZeRO-3 refusal (exit 2), got exit {code}: "
                                                  f"{message[-500:]}")
    return {"refused": True, "exit_code": code, "message": ZERO3_REFUSAL}


def stage_bf16_identical(out: Path, dry_run: bool) -> dict[str, Any]:
    artifact = out / "zero2" / "artifact"
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


def stage_cost_model(out: Path, dry_run: bool) -> dict[str, Any]:
    from kangaroo_lit.bench.cost_model import cost_model

    if dry_run:
        report = cost_model(shape="tiny", device="cpu", dtype="float32", exit_layer=1, ks=(2, 3, 4), repeats=2,
                            max_draft=2, runs=1, forced_new_tokens=10, threads=1, out_dir=str(out / "bench"))
    else:
        report = cost_model(shape="llama2-7b", device="cuda", dtype="bfloat16", exit_layer=(1, 2), repeats=20,
                            runs=2, out_dir=str(out / "bench"))
    return {"report": report, "markdown": _read_md(out / "bench", "decode_cost_")}


def stage_train_step(out: Path, dry_run: bool) -> dict[str, Any]:
    from kangaroo_lit.bench.train_step import train_step

    if dry_run:
        report = train_step(shape="tiny", device="cpu", seq_len=32, batch_size=2, steps=2, warmup=1, threads=1,
                            in_process=True, out_dir=str(out / "bench"))
    else:
        report = train_step(shape="llama2-7b", device="cuda", steps=6, warmup=2, worker_timeout=120,
                            out_dir=str(out / "bench"))
    return {"report": report, "markdown": _read_md(out / "bench", "train_step_")}


def _read_md(folder: Path, prefix: str) -> str | None:
    found = sorted(folder.glob(f"{prefix}*.md"))
    return found[-1].read_text() if found else None


STAGE_FUNCTIONS: dict[str, Callable[[Path, bool], dict[str, Any]]] = {
    name: globals()[f"stage_{name}"] for name in STAGES
}


# --------------------------------------------------------------------------------------------------
# Running stages and writing the report


def run_stage(name: str, out: Path, dry_run: bool) -> dict[str, Any]:
    """Run one stage in this process; its entry of the report."""
    start = time.monotonic()
    try:
        result = STAGE_FUNCTIONS[name](out, dry_run)
        entry = {"status": "ok", "result": result}
    except StageFailed as err:
        entry = {"status": "failed", "error": str(err)}
    except Exception as err:  # noqa: BLE001 - a stage's crash is its result; the suite goes on
        entry = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    entry["seconds"] = round(time.monotonic() - start, 1)
    return entry


def run_stage_in_subprocess(name: str, out: Path, timeout: float, dry_run: bool = False) -> dict[str, Any]:
    """Run one stage in its own process (``python -m kangaroo_lit.bench.gpu_suite OUT --stage NAME``)."""
    start = time.monotonic()
    result_file = out / "stages" / f"{name}.json"
    result_file.unlink(missing_ok=True)
    log = out / "stages" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        try:
            command = [sys.executable, "-m", "kangaroo_lit.bench.gpu_suite", str(out), "--stage", name,
                       *(["--dry-run"] if dry_run else [])]
            proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO_ROOT)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    if result_file.is_file():
        entry = json.loads(result_file.read_text())
    elif code is None:
        entry = {"status": "timeout", "error": f"killed after {timeout:.0f} s"}
    else:
        entry = {"status": "failed", "error": f"the stage's process exited with {code} without a result"}
    entry["seconds"] = round(time.monotonic() - start, 1)
    entry["log"] = str(log)
    if entry["status"] != "ok":
        entry["log_tail"] = log.read_text()[-3000:]
    return entry


def run_suite(out: str | Path, dry_run: bool = False, stages: tuple[str, ...] = STAGES, isolate: bool | None = None,
              budget_s: float = BUDGET_S) -> dict[str, Any]:
    """Run the stages (isolated in processes unless a dry run), write the reports; returns the report."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    isolate = (not dry_run) if isolate is None else isolate
    start = time.monotonic()
    report: dict[str, Any] = {"suite": "kangaroo_lit GPU suite", "dry_run": dry_run, "out_dir": str(out),
                              "budget_s": budget_s, "stages": {}}
    for name in stages:
        left = budget_s - (time.monotonic() - start)
        if left <= 5:
            report["stages"][name] = {"status": "skipped", "error": f"time budget of {budget_s:.0f} s spent"}
            continue
        print(f"== {name} ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
        if isolate:
            entry = run_stage_in_subprocess(name, out, min(TIMEOUTS[name], left), dry_run)
        else:
            entry = run_stage(name, out, dry_run)
        report["stages"][name] = entry
        error = f": {entry['error']}" if entry.get("error") else ""
        print(f"   {entry['status']} in {entry['seconds']} s{error}", file=sys.stderr, flush=True)
    report["seconds"] = round(time.monotonic() - start, 1)
    report["all_ok"] = all(e["status"] == "ok" for e in report["stages"].values())
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_report.md").write_text(markdown(report))
    return report


def _headline(name: str, entry: dict[str, Any]) -> str:
    r = entry.get("result") or {}
    if entry["status"] != "ok":
        return (entry.get("error") or "").splitlines()[0][:160] if entry.get("error") else ""
    if name == "environment":
        return f"{r.get('gpu') or r.get('cpu')}; torch {r.get('torch')}; deepspeed {r.get('deepspeed_import')}"
    if name == "deepspeed_zero2":
        g = r["generate"]
        return (f"{r['checkpoint_layout']} checkpoint, {r['checkpoint_bytes'] / 1e6:.1f} MB; resumed losses within "
                f"{r['resume_loss_max_abs_diff']:.2g}; generate identical={g['identical']}, MAT {g['mat']:.2f}")
    if name == "deepspeed_zero3":
        return "refused with its reason (exit 2)"
    if name == "bf16_identical":
        return (f"bf16 {r['bfloat16']['identical_fraction']:.3f}, fp32 {r['float32']['identical_fraction']:.3f} "
                f"of {r['prompts']} prompts identical")
    return "see the tables below"


def markdown(report: dict[str, Any]) -> str:
    env = (report["stages"].get("environment") or {}).get("result") or {}
    lines = [f"# GPU suite{' (dry run: tiny shapes on CPU)' if report['dry_run'] else ''}", "",
             f"{env.get('date', '?')}; {env.get('gpu') or env.get('cpu', '?')}; torch {env.get('torch', '?')}, "
             f"transformers {env.get('transformers', '?')}, git {env.get('git_revision', '?')}; "
             f"{report['seconds']} s in all (budget {report['budget_s']:.0f} s).", "",
             "| stage | status | seconds | result |", "| --- | --- | ---: | --- |"]
    for name, entry in report["stages"].items():
        text = _headline(name, entry).replace("|", "/")
        lines.append(f"| {name} | {entry['status']} | {entry.get('seconds', '')} | {text} |")
    for name in ("cost_model", "train_step"):
        md = ((report["stages"].get(name) or {}).get("result") or {}).get("markdown")
        if md:
            lines += ["", f"## {name}", "", md.strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="scripts/gpu_suite.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (gpu_report.json, gpu_report.md, run directories)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, stages in this process")
    parser.add_argument("--stage", choices=STAGES, help="run only this stage, in this process (used by the suite)")
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    parser.add_argument("--budget_s", type=float, default=BUDGET_S, help="seconds for the whole suite")
    args = parser.parse_args(argv)
    if args.stage:  # one isolated stage: write its entry where the parent looks for it
        entry = run_stage(args.stage, Path(args.out).resolve(), args.dry_run)
        path = Path(args.out).resolve() / "stages" / f"{args.stage}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entry, default=str) + "\n")
        return 0 if entry["status"] == "ok" else 1
    report = run_suite(args.out, dry_run=args.dry_run, stages=tuple(args.only or STAGES), budget_s=args.budget_s)
    print(f"wrote {Path(args.out) / 'gpu_report.json'} and gpu_report.md: "
          f"{'all stages ok' if report['all_ok'] else 'some stages FAILED'} in {report['seconds']} s")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
