"""One (mode, loop) pair of ``kangaroo-lit bench train_step``: ``warmup + steps`` training steps, timed.

A worker gets a JSON spec (the module's :class:`~kangaroo_lit.settings.KangarooSettings` as a dict, the
loop, the batch shape, the device) and returns its step times, losses and peak memory. The driver
(:mod:`kangaroo_lit.bench.train_step`) runs each in a fresh ``python -m kangaroo_lit.bench.train_worker
SPEC RESULT`` process, so that peak memories do not mix, or in its own process (``--in_process``).

Both loops train the module that :func:`build_module` makes, on the batches of :func:`make_batches`:
``lightning`` through ``trainer.fit``, ``raw`` as the module's own step, backward and the AdamW step
and schedule of :mod:`kangaroo_lit.optim` with the same settings. Both seed torch's RNG right before
the first step, so they draw the same LoRA dropout masks and must record the same losses.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from kangaroo_lit.bench.common import cpu_name, random_base_model, torch_threads
from kangaroo_lit.settings import KangarooSettings


def make_batches(n: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """``n`` CPU batches: random real tokens, no padding, the first half of each row a masked prompt."""
    from kangaroo_lit.losses import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=g)
        labels = ids.clone()
        labels[:, : seq_len // 2] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def build_module(settings: KangarooSettings, seed: int):
    """The one place the benchmark makes a :class:`~kangaroo_lit.lit_module.KangarooLitModule` (both loops).

    Its ``configure_model`` is the library's, unchanged, with only the weight loading swapped for
    :func:`~kangaroo_lit.bench.common.random_base_model` of the same config: under Lightning it runs inside
    ``tensor_init_context`` (under ``with torch.device(...)`` in the raw loop), so the random weights are
    born on the device, and the same seed gives the same weights (and LoRA A) in every worker.
    """
    from unittest import mock

    from transformers import AutoConfig

    from kangaroo_lit.lit_module import KangarooLitModule

    def load_random(name_or_path: str, dtype: Any = "float32", attn_implementation: str = "sdpa"):
        return random_base_model(AutoConfig.from_pretrained(name_or_path), dtype, attn_implementation, seed=seed)

    class RandomBaseLitModule(KangarooLitModule):
        def configure_model(self) -> None:
            with mock.patch("kangaroo_lit.lit_module.load_base_model", load_random):
                super().configure_model()

    return RandomBaseLitModule.from_settings(settings)


class StepClock:
    """Per-step timestamps and losses, synchronised with the device; resets peak memory after warm-up."""

    def __init__(self, device: str, warmup: int) -> None:
        self.cuda = device == "cuda"
        self.warmup = warmup
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # process CPU time: steadier than wall time on a shared CPU
        self.losses: list[float] = []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self.starts.append(time.perf_counter())

    def end(self, loss) -> None:
        self._sync()
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.losses.append(float(loss))
        if len(self.ends) == self.warmup and self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def result(self) -> dict[str, Any]:
        w = self.warmup
        # "loop" time of step i: from the end of step i-1 to the end of step i, so it holds everything
        # the loop does (data fetch, hooks, logging), not only the forward/backward/optimizer step.
        loop = [self.ends[i] - self.ends[i - 1] for i in range(w, len(self.ends))]
        step = [self.ends[i] - self.starts[i] for i in range(w, len(self.ends))]
        cpu = [self.cpu_ends[i] - self.cpu_ends[i - 1] for i in range(w, len(self.ends))]
        return {
            "loop_times_s": loop,
            "step_times_s": step,
            "step_time_s": statistics.median(loop),
            "hook_step_time_s": statistics.median(step),
            "cpu_times_s": cpu,
            "cpu_time_s": statistics.median(cpu),
            "losses": self.losses,
            "first_loss": self.losses[0],
        }


def run_lightning(module, spec: dict[str, Any], batches: list[dict], clock: StepClock) -> None:
    """``warmup + steps`` steps of ``trainer.fit``."""
    import lightning as L
    from torch.utils.data import DataLoader

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                torch.manual_seed(spec["seed"])  # the raw loop does the same before its first step
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.end(outputs["loss"])

    trainer = L.Trainer(accelerator=spec["device"], devices=1, precision=spec["precision"], max_steps=len(batches),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Timer()])
    with warnings.catch_warnings():  # a one-process loader of ready batches; the base stays in eval mode
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        warnings.filterwarnings("ignore", message=r".*Tensor Cores.*")
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")  # inside Lightning, not ours
        trainer.fit(module, DataLoader(batches, batch_size=None))


def run_raw(module, spec: dict[str, Any], batches: list[dict], clock: StepClock) -> None:
    """The same steps without Lightning: the module's step, backward, and kangaroo_lit.optim's AdamW and schedule."""
    from kangaroo_lit.optim import build_optimizer, build_scheduler

    device = torch.device(spec["device"])
    with device:  # the same random weights as the Lightning worker, born on the device too
        module.configure_model()
    module.to(device)
    settings = module.settings.optimizer
    optimizer = build_optimizer((p for _, p in module.model.trainable_parameters()), settings)
    scheduler = build_scheduler(optimizer, settings, total_steps=len(batches))
    bf16 = spec["precision"] == "bf16-mixed"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    torch.manual_seed(spec["seed"])
    for batch in batches:
        clock.start()
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            terms, _ = module._step(batch)  # what training_step computes, without its logging
        terms.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss = terms.loss.detach()
        del terms, batch  # as Lightning does: nothing of this step stays alive into the next one
        clock.end(loss)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of one mode through one loop; return its timings and memory."""
    # Imported before the RSS baseline, in both loops alike (the model code's share is the same in both).
    import lightning  # noqa: F401

    import kangaroo_lit.lit_module  # noqa: F401
    import kangaroo_lit.optim  # noqa: F401

    with torch_threads(spec.get("threads")):
        rss_after_imports = _current_rss()
        if spec["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()
        batches = make_batches(spec["warmup"] + spec["steps"], spec["batch_size"], spec["seq_len"],
                               spec["vocab_size"], seed=spec["seed"])
        clock = StepClock(spec["device"], spec["warmup"])
        module = build_module(KangarooSettings.from_dict(spec["settings"]), spec["seed"])
        (run_lightning if spec["impl"] == "lightning" else run_raw)(module, spec, batches, clock)
        model = module.model
        result = {"mode": spec["mode"], "impl": spec["impl"], "lora_scope": spec["settings"]["lora"]["scope"],
                  **clock.result(),
                  "trainable_params": sum(p.numel() for _, p in model.trainable_parameters()),
                  "train_mode_modules": sum(m.training for m in model.modules())}
        result["tokens_per_step"] = spec["batch_size"] * spec["seq_len"]
        result["tokens_per_s"] = result["tokens_per_step"] / result["step_time_s"]
        if spec["device"] == "cuda":
            result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
            result["peak_memory_kind"] = "cuda max_memory_allocated (reset after warm-up)"
            result["device_name"] = torch.cuda.get_device_name()
        else:
            result["peak_memory_bytes"] = _peak_rss()
            result["rss_after_imports_bytes"] = rss_after_imports
            result["peak_memory_kind"] = "peak RSS of the worker process"
            result["device_name"] = cpu_name()
            result["torch_threads"] = torch.get_num_threads()
        result["torch_version"] = torch.__version__
    return result


def _current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _peak_rss() -> int:
    """Peak RSS of this process in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_in_subprocess(spec: dict[str, Any], tmp: Path, timeout: float | None) -> dict[str, Any]:
    """:func:`run_worker` in a fresh ``python -m kangaroo_lit.bench.train_worker SPEC RESULT`` process."""
    name = f"{spec['mode']}-{spec['impl']}"
    spec_path, result_path = tmp / f"{name}.spec.json", tmp / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "kangaroo_lit.bench.train_worker", str(spec_path), str(result_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": spec["mode"], "impl": spec["impl"], "error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or proc.stdout or "")[-3000:]
        return {"mode": spec["mode"], "impl": spec["impl"], "error": f"exit code {proc.returncode}:\n{tail}"}
    return json.loads(result_path.read_text())


def _worker_main(argv: list[str]) -> int:
    """``python -m kangaroo_lit.bench.train_worker SPEC RESULT``: one worker, its result written as JSON."""
    spec_path, result_path = argv
    Path(result_path).write_text(json.dumps(run_worker(json.loads(Path(spec_path).read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
