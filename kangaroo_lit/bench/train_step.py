"""``kangaroo-lit bench train_step``: SGP vs the joint baseline vs plain LoRA, through Lightning and raw.

Every mode trains on the same synthetic batches (fixed seed; every position a real token, the first
half of each row a prompt with label -100), with :data:`MODES` as its loss settings:

* ``sgp``: ``detach_exit=True`` (deep layers under ``no_grad``), ``beta_exit=0.7``, ``exit_loss=ce``;
* ``joint``: the same with ``detach_exit=False`` (``loss_main`` back-propagates through every layer);
* ``lora``: no draft path, plain LoRA on layers ``0..exit_layer`` (``beta_exit=0``, ``detach_exit=False``,
  always LoRA scope ``shared``).

Each mode runs twice, from the same :class:`~kangaroo_lit.lit_module.KangarooLitModule` (built by
:func:`~kangaroo_lit.bench.train_worker.build_module` alone): in a real ``lightning.Trainer`` fit loop
(``lightning``), and as the module's own step (forward, :func:`~kangaroo_lit.losses.sgp_loss`), backward
and the AdamW step and schedule of :mod:`kangaroo_lit.optim` with the same settings in a plain PyTorch
loop (``raw``), so the report gives the Lightning path's throughput as a fraction of the raw loop's.
Both loops seed torch's RNG right before the first step, so they draw the same LoRA dropout masks and
record the same losses. Each (mode, loop) pair runs in its own subprocess
(:mod:`~kangaroo_lit.bench.train_worker`) so that peak memory (CUDA: ``max_memory_allocated`` after a
reset at the end of warm-up; CPU: the process's peak RSS) does not mix between them.

The base model has random weights made from a config directly on the device
(:func:`~kangaroo_lit.bench.common.random_base_model`; nothing but ``config.json`` is written): the
module's ``configure_model`` runs unchanged with only the loading of the weights swapped.

    kangaroo-lit bench train_step --shape tiny --threads 1 --repeats 3 --out_dir /tmp/bench
    kangaroo-lit bench train_step --shape small --threads 1 --repeats 2 --steps 6 --warmup 2 --out_dir /tmp/bench
    python -m kangaroo_lit.bench train_step --shape llama2-7b --device cuda --out_dir $OUT   # bf16-mixed, seq 1024

On a CPU that other processes share, use ``--threads 1`` (two spinning OpenMP threads on two busy
cores made a tiny step 80x slower) and ``--repeats``, which interleaves the workers so a busy spell
does not land on one mode; the report records the load average.

Outputs under ``--out_dir``: ``train_step_<shape>_<device>.json`` (every number, the machine and the
versions), ``.md`` (the tables for BENCHMARKS.md) and ``.png`` (tokens/s and peak memory per mode;
skipped when matplotlib is missing), all written at the end; with ``--rows_file`` each worker's result is
also appended there as one JSON line the moment it finishes, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from kangaroo_lit.bench.common import (
    SHAPES,
    DType,
    Shape,
    describe_shape,
    load_average,
    machine_info,
    markdown_table,
    print_table,
    pyplot,
    shape_config,
    write_outputs,
)
from kangaroo_lit.bench.gpu_suite import append_row
from kangaroo_lit.bench.train_worker import run_in_subprocess, run_worker
from kangaroo_lit.errors import ConfigError
from kangaroo_lit.settings import KangarooSettings, LoraSettings, LossSettings, OptimizerSettings

# The loss settings of each mode (exit_loss "ce" and the shared exit head throughout).
MODES: dict[str, LossSettings] = {
    "sgp": LossSettings(beta_exit=0.7, detach_exit=True),
    "joint": LossSettings(beta_exit=0.7, detach_exit=False),
    "lora": LossSettings(beta_exit=0.0, detach_exit=False),
}
# Constant learning rate, no decay: the benchmark measures steps, not what they learn.
OPTIMIZER = OptimizerSettings(lr=1e-4, weight_decay=0.0, warmup_steps=0, schedule="constant")
IMPLS = ("lightning", "raw")
Mode = Literal["sgp", "joint", "lora"]
Impl = Literal["lightning", "raw"]
Precision = Literal["32-true", "bf16-mixed"]
GIB = 1024**3
MIB = 1024**2


def train_step(
    shape: Shape = "tiny",
    seq_len: int | None = None,
    batch_size: int = 4,
    exit_layer: int = 2,
    lora_rank: int = 8,
    lora_scope: Literal["shared", "draft"] = "shared",
    device: Literal["cpu", "cuda"] = "cpu",
    precision: Precision | None = None,
    dtype: DType | None = None,
    steps: int = 10,
    warmup: int = 3,
    modes: tuple[Mode, ...] = ("sgp", "joint", "lora"),
    impls: tuple[Impl, ...] = IMPLS,
    repeats: int = 1,
    seed: int = 0,
    threads: int | None = None,
    out_dir: str = str(Path(tempfile.gettempdir()) / "kangaroo_lit_bench"),
    worker_timeout: float | None = None,
    in_process: bool = False,
    rows_file: str | None = None,
) -> dict[str, Any]:
    """Time the training step of every (mode, loop) pair; returns the report.

    Args:
        shape: random-weight Llama shape.
        seq_len: tokens per row (default: 1024 for llama2-7b, else 256).
        batch_size: rows per batch.
        exit_layer: L (0..num_layers - 2).
        lora_rank: LoRA rank on layers 0..L (0: no LoRA, and no lora mode).
        lora_scope: of sgp and joint: shared is the original SGP code's; draft keeps the verifier the
            untouched base. Mode lora always runs with shared.
        device: cpu or cuda.
        precision: Lightning precision (default: bf16-mixed on cuda, 32-true on cpu).
        dtype: frozen base dtype (default: bfloat16 with bf16-mixed, else float32).
        steps: measured steps.
        warmup: warm-up steps (at least 1: a step is timed from the previous step's end).
        modes: subset of sgp, joint, lora.
        impls: subset of lightning, raw.
        repeats: run every (mode, loop) worker this many times, round-robin; steps are pooled.
        seed: seed of the weights, the batches and the dropout masks.
        threads: torch CPU threads per worker (default: torch's own choice); 1 is far steadier on a CPU
            that other processes share.
        out_dir: write train_step_<shape>_<device>.json, .md and .png here.
        worker_timeout: seconds per worker process.
        in_process: run every worker in this process (tests, debugging): peak memories then mix.
        rows_file: append each worker's result here as one JSON line the moment it finishes (the GPU
            suite's results file: a run cut short keeps the workers that finished).
    """
    config = dict(locals())
    seq_len = seq_len or (1024 if shape == "llama2-7b" else 256)
    precision = precision or ("bf16-mixed" if device == "cuda" else "32-true")
    dtype = dtype or ("bfloat16" if precision.startswith("bf16") else "float32")
    modes = [m for m in modes if lora_rank > 0 or m != "lora"]  # no LoRA, no draft path: nothing would train
    if not modes or not impls:
        raise ConfigError("nothing to run: give at least one mode (lora needs --lora_rank > 0) and one loop")
    if warmup < 1 or steps < 1 or repeats < 1:
        raise ConfigError("--warmup, --steps and --repeats must be >= 1 (a step is timed from the previous one's end)")
    layers = SHAPES[shape]["num_layers"]
    if not 0 <= exit_layer <= layers - 2:
        raise ConfigError(f"--exit_layer must be in 0..{layers - 2} for shape {shape}")
    info = machine_info(device)  # its load average is the one at the start
    with tempfile.TemporaryDirectory(prefix="kangaroo_bench_") as tmp:
        model_dir = Path(tmp) / "model"
        shape_config(shape, max(seq_len, 4096)).save_pretrained(model_dir)
        common = dict(shape=shape, vocab_size=SHAPES[shape]["vocab_size"], seq_len=seq_len, batch_size=batch_size,
                      device=device, precision=precision, steps=steps, warmup=warmup, seed=seed, threads=threads)
        specs = [dict(common, mode=mode, impl=impl,
                      settings=bench_settings(str(model_dir), exit_layer, dtype, lora_rank, lora_scope, mode).to_dict())
                 for mode in modes for impl in impls]
        runs = []
        # Repeats go round-robin over the (mode, loop) pairs so that a busy spell of a shared machine
        # spreads over all of them instead of landing on one.
        for repeat in range(repeats):
            for spec in specs:
                tag = f"[{spec['mode']}/{spec['impl']}" + (f" #{repeat + 1}]" if repeats > 1 else "]")
                print(f"{tag} running ...", file=sys.stderr, flush=True)
                start = time.perf_counter()
                result = run_worker(spec) if in_process else run_in_subprocess(spec, Path(tmp), worker_timeout)
                wall = time.perf_counter() - start
                if "error" in result:
                    print(f"{tag} FAILED: {result['error']}", file=sys.stderr, flush=True)
                else:
                    print(f"{tag} {result['step_time_s'] * 1e3:.1f} ms/step, {result['tokens_per_s']:,.0f} tokens/s "
                          f"({wall:.0f} s)", file=sys.stderr, flush=True)
                runs.append(result)
                append_row(rows_file, {"bench": "train_step", "kind": "worker", "shape": shape, "device": device,
                                       "seq_len": seq_len, "batch_size": batch_size, "repeat": repeat + 1,
                                       "wall_s": round(wall, 2), **result})
    results = merge_repeats(runs)
    first_ok = next((r for r in results if "error" not in r), {})
    revision = info["git_revision"]
    meta = {
        "shape": shape,
        "model": describe_shape(shape),
        "model_config": SHAPES[shape],
        "seq_len": seq_len, "batch_size": batch_size, "exit_layer": exit_layer, "lora_rank": lora_rank,
        "lora_scope": lora_scope, "device": device, "precision": precision, "dtype": dtype, "steps": steps,
        "warmup": warmup, "repeats": repeats, "seed": seed, "threads": threads,
        "modes": {m: dataclasses.asdict(MODES[m]) for m in modes},
        "optimizer": dataclasses.asdict(OPTIMIZER),
        "exit_loss": "ce",
        "device_name": first_ok.get("device_name", info["cpu"] if device == "cpu" else "cuda"),
        "cpu": info["cpu"],
        "cpu_count": info["cpu_count"],
        "torch_threads": first_ok.get("torch_threads"),
        "load_average_1_5_15": {"start": info["load_average_1_5_15"], "end": load_average()},
        "in_process": in_process,
        "date_utc": info["date"],
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": config,
        "git_revision": revision,
        # git_revision ends in "-dirty" when tracked files differ from it: the figures are then not of it.
        "library_uncommitted_changes": None if revision is None else revision.endswith("-dirty"),
        "python": info["python"],
        "versions": info["versions"],
    }
    report = {"meta": meta, "results": results, "ratios": summarize(results)}
    print_table(f"Training step, shape {shape} on {meta['device_name']}", table_header(device == "cuda"),
                table_rows(report), left=2)
    for line in ratio_lines(report):
        print(line)
    write_outputs(out_dir, f"train_step_{shape}_{device}", report, markdown(report), plot=plot)
    return report


def bench_settings(model_dir: str, exit_layer: int, dtype: str, lora_rank: int, lora_scope: str,
                   mode: str) -> KangarooSettings:
    """The module settings of one mode: plain LoRA must act on the main path, so mode lora uses scope shared
    (with scope draft and no draft path nothing would train)."""
    scope = "shared" if mode == "lora" else lora_scope
    return KangarooSettings(base_model=model_dir, exit_layer=exit_layer, dtype=dtype,
                            lora=LoraSettings(rank=lora_rank, alpha=16.0, dropout=0.05, scope=scope),
                            loss=MODES[mode], optimizer=OPTIMIZER)


# ==================================================================================================
# Report
def merge_repeats(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per (mode, loop): medians over the measured steps of all its successful repeats."""
    merged = []
    for key in dict.fromkeys((r["mode"], r["impl"]) for r in runs):
        group = [r for r in runs if (r["mode"], r["impl"]) == key]
        good = [r for r in group if "error" not in r]
        if not good:
            merged.append(group[0])
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


def ratio_lines(report: dict[str, Any]) -> list[str]:
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
    out += ["", markdown_table(table_header(cuda), table_rows(report), left=2), ""]
    out += [f"* {line}" for line in ratio_lines(report)]
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
        out.append("* `--in_process true`: every worker ran in one process, so the memory figures mix and mean "
                   "nothing.")
    for r in report["results"]:
        if "error" in r:
            out.append(f"* {r['mode']}/{r['impl']} failed: `{r['error'].splitlines()[0]}`")
    return "\n".join(out) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    """Bar charts of tokens/s and peak memory per mode, Lightning and raw side by side."""
    plt = pyplot()
    if plt is None:
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
