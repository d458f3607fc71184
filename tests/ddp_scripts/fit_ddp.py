"""Two CPU processes (``strategy: ddp``, gloo) through the real CLI: five fits in one launch.

    KANGAROO_DDP_MODEL=DIR KANGAROO_DDP_DATA=FILE.jsonl KANGAROO_DDP_OUT=DIR python tests/ddp_scripts/fit_ddp.py

Lightning starts rank 1 by running this same command again (``LOCAL_RANK=1``); every later Trainer in
these two processes reuses them and their process group, so the fits below cost one start-up:

* ``u0``: one epoch without LoRA dropout, validation (and decoding checks) at its end: compared with a
  1-process run at the same global batch;
* ``u``: 6 steps with LoRA dropout 0.1, a checkpoint every 2 steps: the uninterrupted reference;
* ``c``: the same run crashing at step 5 (after last.ckpt was written at step 4);
* ``r``: ``c`` resumed from its last.ckpt up to step 6;
* ``s``: like ``u``, with SIGTERM sent to rank 1 alone after step 3.

Each fit writes its records under ``OUT_DIR/<name>/`` (``tests/ddp_scripts/recorder.py``) and its
run directory under ``OUT_DIR/runs/<name>``. The script exits 0 only if every fit did what it should.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

START = time.time()

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # the recorder's class path (tests.ddp_scripts.recorder)

import torch  # noqa: E402

from kangaroo_lit.cli import main  # noqa: E402
from tests.ddp_scripts.recorder import Crash  # noqa: E402


def common_args(model_dir: str, data: str, cache: str) -> list[str]:
    """The 2-process run's settings; the test builds its 1-process reference from the same list."""
    return [
        "--config", str(REPO_ROOT / "configs" / "tiny.yaml"),
        "--model.base_model", model_dir, "--model.exit_layer", "1", "--model.optimizer.warmup_steps", "2",
        "--model.optimizer.lr", "0.01",
        "--data.data_path", data, "--data.format", "text", "--data.max_length", "32", "--data.batch_size", "2",
        "--data.val_fraction", "0.1", "--data.test_fraction", "0", "--data.num_workers", "0",
        "--data.cache_dir", cache,
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]


def recorded(out: Path, name: str, crash_at_step: int | None = None) -> list[str]:
    args = ["--trainer.callbacks+=tests.ddp_scripts.recorder.Recorder", "--trainer.callbacks.out", str(out / name)]
    if crash_at_step is not None:
        args += ["--trainer.callbacks.crash_at_step", str(crash_at_step)]
    return args


def run(argv: list[str], expect: int = 0) -> int:
    print(f"[{time.time() - START:.1f}s] fit {argv[argv.index('--trainer.default_root_dir') + 1]}", flush=True)
    code = main(argv)
    if code != expect:
        raise SystemExit(f"kangaroo-lit fit exited with {code}, expected {expect}")
    return code


def fit_all(model_dir: str, data: str, out: Path) -> None:
    base = ["fit", *common_args(model_dir, data, str(out / "cache")),
            "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    runs = out / "runs"
    # One epoch, no dropout, validation with decoding checks at its end (the decode callback runs on
    # every rank; before, a rank-0-only decode left rank 1 waiting in the next collective).
    run([*base, "--model.lora.dropout", "0", "--trainer.max_epochs", "1",
         "--trainer.default_root_dir", str(runs / "u0"), *recorded(out, "u0"),
         "--trainer.callbacks+=kangaroo_lit.callbacks.DecodeEvalCallback",
         "--trainer.callbacks.num_prompts", "2", "--trainer.callbacks.max_new_tokens", "6"])
    resumable = [*base, "--model.lora.dropout", "0.1", "--trainer.max_steps", "6",
                 "--trainer.limit_val_batches", "0", "--checkpoint.every_n_train_steps", "2"]
    run([*resumable, "--trainer.default_root_dir", str(runs / "u"), *recorded(out, "u")])
    try:
        run([*resumable, "--trainer.default_root_dir", str(runs / "c"), *recorded(out, "c", crash_at_step=5)])
        raise SystemExit("the crashing run did not crash")
    except Crash:
        pass
    torch.manual_seed(999)  # the resumed run must not depend on the RNG state left by the crash
    run([*resumable, "--trainer.default_root_dir", str(runs / "c"), *recorded(out, "r"),
         "--ckpt_path", str(runs / "c" / "checkpoints" / "last.ckpt")])
    # SIGTERM to rank 1 alone after step 3: both ranks stop after step 3 (the decision is reduced), rank 1
    # exits 143, last.ckpt holds step 3
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    run([*resumable, "--trainer.default_root_dir", str(runs / "s"), *recorded(out, "s"),
         "--trainer.callbacks.sigterm_rank", "1", "--trainer.callbacks.sigterm_at_step", "3"],
        expect=143 if rank == 1 else 0)


if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes on a 2-core runner: one thread each
    # The arguments come from the environment, which rank 1 inherits, so that sys.argv (the command
    # Lightning repeats for rank 1) holds nothing LightningCLI would read as its own arguments.
    env = os.environ
    fit_all(env["KANGAROO_DDP_MODEL"], env["KANGAROO_DDP_DATA"], Path(env["KANGAROO_DDP_OUT"]))
    print(f"[{time.time() - START:.1f}s] done", flush=True)
