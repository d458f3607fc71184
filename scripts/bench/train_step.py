"""Benchmark the training step: SGP vs the joint baseline vs plain LoRA, through Lightning and raw.

Every mode trains on the same synthetic batches (fixed seed; every position a real token, the first
half of each row a prompt with label -100):

* ``sgp``: ``detach_exit=True`` (deep layers under ``no_grad``), ``beta_exit=0.7``, ``exit_loss=ce``;
* ``joint``: the same with ``detach_exit=False`` (``loss_main`` back-propagates through every layer);
* ``lora``: no draft path, plain LoRA on layers ``0..exit_layer`` (``beta_exit=0``, ``detach_exit=False``).

Each mode runs twice: through :class:`~kangaroo_lit.lit_module.KangarooLitModule` in a real
``lightning.Trainer`` fit loop (``lightning``), and as the same ``KangarooModel`` forward,
:func:`~kangaroo_lit.losses.sgp_loss`, backward and AdamW step in a plain PyTorch loop (``raw``), so the
report gives the Lightning path's throughput as a fraction of the raw loop's. Each (mode, loop) pair
runs in its own subprocess so that peak memory (CUDA: ``max_memory_allocated`` after a reset at the
end of warm-up; CPU: the process's peak RSS) does not mix between them.

The base model is built from a config with random weights directly on the device
(``AutoModelForCausalLM.from_config`` under a device context; nothing but ``config.json`` is written):
the Lightning worker loads it through a subclass of the LightningModule whose ``configure_model``
swaps the library's ``load_base_model`` for :func:`build_random_base`.

Run from the repository root (the CPU figures in BENCHMARKS.md came from the first two lines)::

    python scripts/bench/train_step.py --shape tiny --threads 1 --repeats 3 --out /tmp/bench
    python scripts/bench/train_step.py --shape small --threads 1 --repeats 2 --steps 6 --warmup 2 --out /tmp/bench
    python scripts/bench/train_step.py --shape llama2-7b --device cuda --out $OUT   # H100: bf16-mixed, seq 1024

Each worker process pays ~10-15 s of imports here; ``tiny`` takes ~5 min and ``small`` ~6 min on the
2-core CPU as run above. On a CPU that other processes share, use ``--threads 1`` (two spinning
OpenMP threads on two busy cores made a tiny step 80x slower) and ``--repeats``, which interleaves
the workers so a busy spell does not land on one mode; the report records the load average.

Outputs under ``--out``: ``train_step_<shape>_<device>.json`` (every number, the machine and the
versions), ``.md`` (the tables for BENCHMARKS.md) and ``.png`` (tokens/s and peak memory per mode;
skipped when matplotlib is missing). ``rich`` prints the table when installed. The worker path imports
only torch, lightning, transformers, peft and torchmetrics (no ``datasets``, no ``jsonargparse``), so
the command runs on the GPU image as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Offline before any Hugging Face import: the benchmark never touches the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a source checkout
    sys.path.insert(0, str(REPO_ROOT))

# Model shapes (Llama). ``tiny`` is the test fixtures' size; ``small`` gives a meaningful CPU number;
# ``llama2-7b`` is Llama-2-7B's shape (random weights, bf16, built on the device).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                 intermediate_size=256),
    "small": dict(vocab_size=4096, hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=8,
                  intermediate_size=688),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      intermediate_size=11008, rms_norm_eps=1e-5),
}

# KangarooLitModule arguments per mode (the rest is shared, see :func:`worker_specs`).
MODES: dict[str, dict[str, Any]] = {
    "sgp": dict(detach_exit=True, beta_exit=0.7),
    "joint": dict(detach_exit=False, beta_exit=0.7),
    "lora": dict(detach_exit=False, beta_exit=0.0),
}
IMPLS = ("lightning", "raw")
PRECISIONS = ("32-true", "bf16-mixed")
GIB = 1024**3
MIB = 1024**2


# ==================================================================================================
# Worker: one (mode, loop) pair, normally in its own process
def build_random_base(name_or_path: str, dtype: Any = "float32", attn_implementation: str = "sdpa", seed: int = 0):
    """Drop-in for ``kangaroo_lit.architectures.load_base_model``: random weights from ``config.json``.

    The weights are created under whatever device context is active (Lightning's
    ``tensor_init_context`` puts them on the accelerator), in ``dtype``, frozen and in eval mode like
    the library's loader. The same seed gives the same weights in every worker.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kangaroo_lit.architectures import check_architecture, resolve_dtype

    config = AutoConfig.from_pretrained(name_or_path)
    check_architecture(config, source=f"benchmark config {name_or_path!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
    )
    model.requires_grad_(False)
    model.eval()
    return model


def make_batches(n: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """``n`` CPU batches: random real tokens, no padding, the first half of each row a masked prompt."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=g)
        labels = ids.clone()
        labels[:, : seq_len // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


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


class _Clock:
    """Per-step timestamps, synchronised with the device, and the peak-memory reset after warm-up."""

    def __init__(self, device: str, warmup: int) -> None:
        import torch

        self.cuda = device == "cuda"
        self.torch = torch
        self.warmup = warmup
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # process CPU time: steadier than wall time on a shared CPU
        self.first_loss: float | None = None

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def start(self) -> None:
        self.sync()
        self.starts.append(time.perf_counter())

    def end(self, loss) -> None:
        self.sync()
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if self.first_loss is None:
            self.first_loss = float(loss)
        if len(self.ends) == self.warmup and self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

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
            "first_loss": self.first_loss,
        }


def _trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _lightning_module_class():
    """KangarooLitModule whose base comes from :func:`build_random_base` instead of ``from_pretrained``."""
    from unittest import mock

    from kangaroo_lit.lit_module import KangarooLitModule

    class RandomBaseLitModule(KangarooLitModule):
        def configure_model(self) -> None:
            # The library's configure_model, unchanged, with only the weight loading swapped: it runs
            # inside Lightning's tensor_init_context, so the random weights are born on the device.
            with mock.patch("kangaroo_lit.lit_module.load_base_model", build_random_base):
                super().configure_model()

    return RandomBaseLitModule


def _run_lightning(spec: dict[str, Any], batches: list[dict], clock: _Clock) -> dict[str, Any]:
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader

    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*Tensor Cores.*")
    module = _lightning_module_class()(
        base_model=spec["model_dir"],
        exit_layer=spec["exit_layer"],
        dtype=spec["dtype"],
        lora_rank=spec["lora_rank"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
        lora_scope=spec["lora_scope"],
        exit_loss=spec["exit_loss"],
        learning_rate=spec["learning_rate"],
        warmup_steps=0,
        lr_schedule="constant",
        **MODES[spec["mode"]],
    )

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.end(outputs["loss"])

    trainer = L.Trainer(
        accelerator=spec["device"],
        devices=1,
        precision=spec["precision"],
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Timer()],
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return {
        "trainable_params": _trainable_count(module.model),
        "train_mode_modules": sum(m.training for m in module.model.modules()),
    }


def _run_raw(spec: dict[str, Any], batches: list[dict], clock: _Clock) -> dict[str, Any]:
    import contextlib

    import torch

    from kangaroo_lit.losses import sgp_loss
    from kangaroo_lit.model import LLAMA_TARGET_MODULES, KangarooModel, LoraSettings

    device = torch.device(spec["device"])
    mode = MODES[spec["mode"]]
    with device:  # the same random weights as the Lightning worker, born on the device too
        base = build_random_base(spec["model_dir"], spec["dtype"])
    lora = None
    if spec["lora_rank"] > 0:
        lora = LoraSettings(rank=spec["lora_rank"], alpha=spec["lora_alpha"], dropout=spec["lora_dropout"],
                            target_modules=list(LLAMA_TARGET_MODULES), scope=spec["lora_scope"])
    model = KangarooModel(base, spec["exit_layer"], lora=lora, exit_head="shared")
    # Same parameter groups and schedule as KangarooLitModule.configure_optimizers (decay 0, constant lr).
    params = [p for _, p in model.trainable_parameters()]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.0}]
    if any(p.ndim < 2 for p in params):
        groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=spec["learning_rate"], betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if spec["precision"] == "bf16-mixed":
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext()
    compute_exit = mode["beta_exit"] > 0
    for batch in batches:
        clock.start()
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            out = model(batch["input_ids"], batch["attention_mask"], detach_exit=mode["detach_exit"],
                        compute_exit=compute_exit)
            terms = sgp_loss(out.main_logits, out.exit_logits, batch["labels"], beta_exit=mode["beta_exit"],
                             exit_loss=spec["exit_loss"])
        terms.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss = terms.loss.detach()
        del out, terms, batch  # as Lightning does: nothing of this step stays alive into the next one
        clock.end(loss)
    return {
        "trainable_params": _trainable_count(model),
        "train_mode_modules": sum(m.training for m in model.modules()),
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of one mode through one loop; return its timings and memory."""
    import torch

    if spec["impl"] == "lightning":
        import lightning  # noqa: F401  (imported before the RSS baseline, like the model code below)
    import kangaroo_lit.losses  # noqa: F401
    import kangaroo_lit.model  # noqa: F401

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rss_after_imports = _current_rss()
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batches = make_batches(spec["warmup"] + spec["steps"], spec["batch_size"], spec["seq_len"],
                           spec["vocab_size"], seed=spec["seed"])
    clock = _Clock(spec["device"], spec["warmup"])
    run = _run_lightning if spec["impl"] == "lightning" else _run_raw
    extra = run(spec, batches, clock)
    result = {"mode": spec["mode"], "impl": spec["impl"], "lora_scope": spec["lora_scope"], **clock.result(), **extra}
    tokens = spec["batch_size"] * spec["seq_len"]
    result["tokens_per_step"] = tokens
    result["tokens_per_s"] = tokens / result["step_time_s"]
    if spec["device"] == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        result["peak_memory_kind"] = "cuda max_memory_allocated (reset after warm-up)"
        result["device_name"] = torch.cuda.get_device_name()
    else:
        result["peak_memory_bytes"] = _peak_rss()
        result["rss_after_imports_bytes"] = rss_after_imports
        result["peak_memory_kind"] = "peak RSS of the worker process"
        result["device_name"] = _cpu_name()
        result["torch_threads"] = torch.get_num_threads()
    result["torch_version"] = torch.__version__
    return result


# ==================================================================================================
# Driver: one subprocess per (mode, loop), then the report
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _library_dirty() -> bool | None:
    """Whether ``kangaroo_lit/`` differs from the recorded revision (the figures then are not of it)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "kangaroo_lit"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_model_config(shape: str, seq_len: int, out_dir: Path) -> dict[str, Any]:
    """Save only ``config.json`` of the shape (the weights are made at random in each worker)."""
    from kangaroo_lit.tiny import tiny_config

    max_positions = max(seq_len, 4096 if shape == "llama2-7b" else 512)
    config = tiny_config("llama", max_position_embeddings=max_positions, **SHAPES[shape])
    config.save_pretrained(out_dir)
    return SHAPES[shape]


def worker_specs(args: argparse.Namespace, model_dir: str) -> list[dict[str, Any]]:
    common = dict(
        shape=args.shape,
        model_dir=model_dir,
        vocab_size=SHAPES[args.shape]["vocab_size"],
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        exit_layer=args.exit_layer,
        lora_rank=args.lora_rank,
        lora_alpha=16.0,
        lora_dropout=0.05,
        lora_scope=args.lora_scope,
        exit_loss="ce",
        learning_rate=1e-4,
        device=args.device,
        precision=args.precision,
        dtype=args.dtype,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        threads=args.threads,
    )
    specs = []
    for mode in args.modes:
        # Plain LoRA needs LoRA on the main path, i.e. the shared scope (with scope "draft" and no draft
        # path nothing would train).
        scope = "shared" if mode == "lora" else args.lora_scope
        specs += [dict(common, mode=mode, impl=impl, lora_scope=scope) for impl in args.impls]
    return specs


def _run_in_subprocess(spec: dict[str, Any], tmp: Path, timeout: float | None) -> dict[str, Any]:
    name = f"{spec['mode']}-{spec['impl']}"
    spec_path, result_path = tmp / f"{name}.spec.json", tmp / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), "--result", str(result_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": spec["mode"], "impl": spec["impl"], "error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or proc.stdout or "")[-3000:]
        return {"mode": spec["mode"], "impl": spec["impl"], "error": f"exit code {proc.returncode}:\n{tail}"}
    return json.loads(result_path.read_text())


def merge_repeats(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per (mode, loop): medians over the measured steps of all its successful repeats."""
    merged = []
    for key in dict.fromkeys((r["mode"], r["impl"]) for r in runs):
        group = [r for r in runs if (r["mode"], r["impl"]) == key]
        good = [r for r in group if "error" not in r]
        if not good:
            merged.append(group[0])
            continue
        if len(good) == 1 and len(group) == 1:
            merged.append({**good[0], "repeats": 1, "repeat_step_times_s": [good[0]["step_time_s"]]})
            continue
        out = dict(good[0])
        for series, median in (("loop_times_s", "step_time_s"), ("cpu_times_s", "cpu_time_s"),
                               ("step_times_s", "hook_step_time_s")):
            out[series] = [t for r in good for t in r[series]]
            out[median] = statistics.median(out[series])
        out["tokens_per_s"] = out["tokens_per_step"] / out["step_time_s"]
        out["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in good)
        out["repeats"] = len(good)
        out["repeat_step_times_s"] = [r["step_time_s"] for r in good]
        if len(good) < len(group):
            out["failed_repeats"] = [r["error"] for r in group if "error" in r]
        merged.append(out)
    return merged


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios: SGP over joint (speedup, memory), and Lightning throughput as a fraction of raw.

    Computed from wall time and, where measured, from process CPU time too (``*_cpu_time``).
    """
    ok = {(r["mode"], r["impl"]): r for r in results if "error" not in r}
    ratios: dict[str, Any] = {"sgp_over_joint": {}, "lightning_over_raw_throughput": {}}
    for impl in IMPLS:
        sgp, joint = ok.get(("sgp", impl)), ok.get(("joint", impl))
        if sgp and joint:
            entry = {
                "speedup": joint["step_time_s"] / sgp["step_time_s"],
                "speedup_cpu_time": joint["cpu_time_s"] / sgp["cpu_time_s"],
                "peak_memory_ratio": sgp["peak_memory_bytes"] / joint["peak_memory_bytes"],
            }
            if "rss_after_imports_bytes" in sgp:  # CPU: the part above the interpreter + libraries
                s = sgp["peak_memory_bytes"] - sgp["rss_after_imports_bytes"]
                j = joint["peak_memory_bytes"] - joint["rss_after_imports_bytes"]
                entry["peak_memory_above_imports_ratio"] = s / j if j > 0 else None
            ratios["sgp_over_joint"][impl] = entry
    for mode in MODES:
        lit, raw = ok.get((mode, "lightning")), ok.get((mode, "raw"))
        if lit and raw:
            ratios["lightning_over_raw_throughput"][mode] = {
                "wall_time": raw["step_time_s"] / lit["step_time_s"],
                "cpu_time": raw["cpu_time_s"] / lit["cpu_time_s"],
            }
    return ratios


def _fmt_mem(r: dict[str, Any], cuda: bool) -> str:
    if cuda:
        return f"{r['peak_memory_bytes'] / GIB:.2f} GiB"
    above = r["peak_memory_bytes"] - r.get("rss_after_imports_bytes", 0)
    return f"{r['peak_memory_bytes'] / MIB:.0f} MiB (+{above / MIB:.0f})"


def table_header(cuda: bool) -> list[str]:
    if cuda:
        return ["mode", "loop", "step time (ms)", "tokens/s", "peak memory", "Lightning / raw"]
    return ["mode", "loop", "step wall (ms)", "step CPU (ms)", "tokens/s (wall)", "peak RSS (+ above imports)",
            "Lightning / raw (wall, CPU)"]


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    cuda = report["meta"]["device"] == "cuda"
    fractions = report["ratios"]["lightning_over_raw_throughput"]
    rows = []
    for r in report["results"]:
        if "error" in r:
            rows.append([r["mode"], r["impl"], "error"] + [""] * (len(table_header(cuda)) - 3))
            continue
        frac = ""
        if r["impl"] == "lightning" and r["mode"] in fractions:
            f = fractions[r["mode"]]
            frac = f"{f['wall_time']:.1%}" if cuda else f"{f['wall_time']:.1%}, {f['cpu_time']:.1%}"
        row = [r["mode"], r["impl"], f"{r['step_time_s'] * 1e3:.1f}"]
        if not cuda:
            row.append(f"{r['cpu_time_s'] * 1e3:.1f}")
        row += [f"{r['tokens_per_s']:,.0f}", _fmt_mem(r, cuda), frac]
        rows.append(row)
    return rows


def _ratio_lines(report: dict[str, Any]) -> list[str]:
    cuda = report["meta"]["device"] == "cuda"
    lines = []
    for impl, e in report["ratios"]["sgp_over_joint"].items():
        speed = f"{e['speedup']:.2f}x faster"
        if not cuda:
            speed += f" by wall time, {e['speedup_cpu_time']:.2f}x by CPU time"
        line = f"SGP vs joint ({impl}): {speed}; peak memory {e['peak_memory_ratio']:.2f}x"
        if e.get("peak_memory_above_imports_ratio") is not None:
            line += f" ({e['peak_memory_above_imports_ratio']:.2f}x above the RSS after imports)"
        lines.append(line)
    return lines


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    cuda = m["device"] == "cuda"
    repeats = f" in each of {m['repeats']} repeats" if m["repeats"] > 1 else ""
    out = [
        f"Shape `{m['shape']}` ({m['model']}), batch {m['batch_size']} x seq {m['seq_len']}, exit_layer "
        f"{m['exit_layer']}, LoRA rank {m['lora_rank']} ({m['lora_scope']} scope), {m['precision']}, base "
        f"{m['dtype']}; {m['warmup']} warm-up + {m['steps']} measured steps{repeats}; device: {m['device_name']}.",
    ]
    if not cuda:
        load = m.get("load_average_1_5_15") or {}
        out[0] += (f" {m['torch_threads'] or '?'} torch thread(s) on {m['cpu_count']} cores; 1-min load average "
                   f"{(load.get('start') or ['?'])[0]} at the start, {(load.get('end') or ['?'])[0]} at the end.")
    out += [
        "",
        "| " + " | ".join(table_header(cuda)) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(table_header(cuda)) - 2)) + "|",
    ]
    out += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    out.append("")
    out += [f"* {line}" for line in _ratio_lines(report)]
    if not cuda:
        out.append("* CPU peak memory is the worker process's peak RSS (interpreter and libraries included); "
                   "in brackets, the part above the RSS right after the imports.")
    out.append("* Step time: median over the measured steps of end-of-step to end-of-step wall time "
               "(forward, loss, backward, AdamW step, and everything the loop does in between); tokens/s = "
               "batch x seq / that time.")
    if not cuda:
        out.append("* Step CPU: the same interval in process CPU time (all threads), far less sensitive than wall "
                   "time to other processes on a shared machine; the ratios are given by both.")
    if m["lora_scope"] != "shared" and "lora" in m["modes"]:
        out.append("* Mode lora runs with LoRA scope `shared`: plain LoRA fine-tuning must act on the main path.")
    if m["in_process"]:
        out.append("* `--in-process`: every worker ran in one process, so the memory figures mix and mean nothing.")
    for r in report["results"]:
        if "error" in r:
            out.append(f"* {r['mode']}/{r['impl']} failed: `{r['error'].splitlines()[0]}`")
    return "\n".join(out) + "\n"


def print_table(report: dict[str, Any]) -> None:
    rows = table_rows(report)
    header = table_header(report["meta"]["device"] == "cuda")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the GPU image may lack rich: plain text
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for row in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    else:
        table = Table(title=f"Training step, shape {report['meta']['shape']} on {report['meta']['device_name']}")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i < 2 else "right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    for line in _ratio_lines(report):
        print(line)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Bar charts of tokens/s and peak memory per mode, Lightning and raw side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cuda = report["meta"]["device"] == "cuda"
    ok = {(r["mode"], r["impl"]): r for r in report["results"] if "error" not in r}
    modes = [m for m in MODES if any((m, i) in ok for i in IMPLS)]
    impls = [i for i in IMPLS if any((m, i) in ok for m in modes)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(1, len(impls))
    unit, scale = ("GiB", GIB) if cuda else ("MiB", MIB)
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s"),
                           (axes[1], "peak_memory_bytes", f"peak memory ({unit})")):
        for j, impl in enumerate(impls):
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(modes))]
            ys = [ok[(m, impl)][key] / (scale if key == "peak_memory_bytes" else 1) if (m, impl) in ok else 0
                  for m in modes]
            bars = ax.bar(xs, ys, width, label=impl)
            ax.bar_label(bars, fmt="{:,.0f}" if key == "tokens_per_s" or not cuda else "{:.1f}", fontsize=8)
        ax.margins(y=0.15)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_ylabel(label)
        ax.legend(loc="lower right")
    m = report["meta"]
    fig.suptitle(f"Training step: {m['shape']}, batch {m['batch_size']} x {m['seq_len']}, {m['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--seq-len", type=int, default=None, help="default: 1024 for llama2-7b, else 256")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--exit-layer", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-scope", choices=("shared", "draft"), default="shared",
                   help="shared is the original SGP code's; draft keeps the verifier the untouched base")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="default: bf16-mixed on cuda, 32-true on cpu")
    p.add_argument("--dtype", default=None, help="frozen base dtype; default: bfloat16 with bf16-mixed, else float32")
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps (at least 1)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--repeats", type=int, default=1,
                   help="run every (mode, loop) worker this many times, round-robin; steps are pooled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per worker (default: torch's own choice); 1 is far steadier on a "
                        "CPU that other processes share, where spinning OpenMP threads oversubscribe it")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kangaroo_lit_bench")
    p.add_argument("--worker-timeout", type=float, default=None, help="seconds per worker process")
    p.add_argument("--in-process", action="store_true",
                   help="run every worker in this process (tests, debugging): peak memories then mix")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return args
    args.seq_len = args.seq_len or (1024 if args.shape == "llama2-7b" else 256)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    args.dtype = args.dtype or ("bfloat16" if args.precision.startswith("bf16") else "float32")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for name, values, allowed in (("--modes", args.modes, MODES), ("--impls", args.impls, IMPLS)):
        if not values or any(v not in allowed for v in values):
            p.error(f"{name} must be a comma-separated subset of {','.join(allowed)}")
    if args.lora_rank == 0 and "lora" in args.modes:
        print("--lora-rank 0: dropping mode lora (no LoRA and no draft path leaves nothing to train)")
        args.modes.remove("lora")
        if not args.modes:
            p.error("--lora-rank 0 leaves no mode to run")
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup, --steps and --repeats must be >= 1 (a step's time is measured from the previous step's end)")
    layers = SHAPES[args.shape]["num_layers"]
    if not 0 <= args.exit_layer <= layers - 2:
        p.error(f"--exit-layer must be in 0..{layers - 2} for shape {args.shape}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker is not None:  # child process: one (mode, loop) pair
        result = run_worker(json.loads(args.worker.read_text()))
        args.result.write_text(json.dumps(result))
        return None

    args.out.mkdir(parents=True, exist_ok=True)
    load_start = _load_average()  # a CPU benchmark on a shared machine must say how busy it was
    stem = f"train_step_{args.shape}_{args.device}"
    with tempfile.TemporaryDirectory(prefix="kangaroo_bench_") as tmp:
        tmp = Path(tmp)
        write_model_config(args.shape, args.seq_len, tmp / "model")
        runs = []
        # Repeats go round-robin over the (mode, loop) pairs so that a busy spell of a shared machine
        # spreads over all of them instead of landing on one.
        for repeat in range(args.repeats):
            for spec in worker_specs(args, str(tmp / "model")):
                t0 = time.perf_counter()
                tag = f"[{spec['mode']}/{spec['impl']}" + (f" #{repeat + 1}]" if args.repeats > 1 else "]")
                print(f"{tag} running ...", flush=True)
                if args.in_process:
                    result = run_worker(spec)
                else:
                    result = _run_in_subprocess(spec, tmp, args.worker_timeout)
                if "error" in result:
                    print(f"{tag} FAILED: {result['error']}", flush=True)
                else:
                    print(f"{tag} {result['step_time_s'] * 1e3:.1f} ms/step, {result['tokens_per_s']:,.0f} tokens/s "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
                runs.append(result)
        results = merge_repeats(runs)

    first_ok = next((r for r in results if "error" not in r), {})
    shape = SHAPES[args.shape]
    meta = {
        "shape": args.shape,
        "model": (f"Llama, hidden {shape['hidden_size']}, {shape['num_layers']} layers, {shape['num_heads']} heads "
                  f"({shape['num_kv_heads']} KV), intermediate {shape['intermediate_size']}, "
                  f"vocab {shape['vocab_size']}"),
        "model_config": shape,
        **{k: getattr(args, k) for k in ("seq_len", "batch_size", "exit_layer", "lora_rank", "lora_scope",
                                         "device", "precision", "dtype", "steps", "warmup", "repeats",
                                         "seed", "threads")},
        "modes": {m: MODES[m] for m in args.modes},
        "exit_loss": "ce",
        "device_name": first_ok.get("device_name", _cpu_name() if args.device == "cpu" else "cuda"),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": first_ok.get("torch_threads"),
        "load_average_1_5_15": {"start": load_start, "end": _load_average()},
        "in_process": args.in_process,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:])),
        "git_revision": _git_revision(),
        "library_uncommitted_changes": _library_dirty(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "lightning", "transformers", "peft", "torchmetrics")},
    }
    report = {"meta": meta, "results": results, "ratios": summarize(results)}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(report))
    plotted = plot(report, args.out / f"{stem}.png")
    print_table(report)
    print(f"wrote {args.out / stem}.json, .md" + (", .png" if plotted else " (no matplotlib: no .png)"))
    return report


if __name__ == "__main__":
    main()
