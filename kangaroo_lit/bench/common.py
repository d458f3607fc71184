"""What every benchmark shares: timing, the machine it ran on, statistics, tables and the output files.

Model shapes for random-weight benchmarks are here too (:data:`SHAPES`), built with
:func:`kangaroo_lit.tiny.tiny_config`, so the cost model and the training-step benchmark measure the
same models.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from kangaroo_lit.decoding.common import synchronize

# Llama shapes: ``tiny`` = the test fixtures' size, ``small`` a CPU-sized model, ``llama2-7b`` Llama-2-7B's
# shape (random weights; ~13.5 GB in bf16, built directly on the device).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256),
    "small": dict(vocab_size=4096, hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=8,
                  intermediate_size=688),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      intermediate_size=11008, rms_norm_eps=1e-5),
}
Shape = Literal["tiny", "small", "llama2-7b"]
DType = Literal["float64", "float32", "bfloat16", "float16"]


# --------------------------------------------------------------------------------------------------
# Models with random weights
def shape_config(shape: str, max_positions: int = 4096):
    """The Llama config of a :data:`SHAPES` entry."""
    from kangaroo_lit.tiny import tiny_config

    return tiny_config("llama", max_position_embeddings=max_positions, **SHAPES[shape])


def describe_shape(shape: str) -> str:
    """``Llama, hidden 64, 4 layers, ...``: one line for reports."""
    s = SHAPES[shape]
    return (f"Llama, hidden {s['hidden_size']}, {s['num_layers']} layers, {s['num_heads']} heads "
            f"({s['num_kv_heads']} KV), intermediate {s['intermediate_size']}, vocab {s['vocab_size']}")


def random_base_model(config, dtype: str | torch.dtype = "float32", attn_implementation: str = "sdpa", seed: int = 0):
    """A causal LM with random weights from ``config``, frozen and in eval mode like ``load_base_model``'s.

    The weights are created under whatever device context is active (``with torch.device("cuda")``, or
    Lightning's ``tensor_init_context``), so a 7B model is born on the GPU and nothing is written to disk.
    The same seed gives the same weights.
    """
    from transformers import AutoModelForCausalLM

    from kangaroo_lit.architectures import check_architecture, resolve_dtype

    check_architecture(config, source="benchmark config")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype),
                                             attn_implementation=attn_implementation)
    return model.requires_grad_(False).eval()


# --------------------------------------------------------------------------------------------------
# Timing
def resolve_device(device: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; anything else is a torch device name."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``(fn(), seconds)``, the device synchronised before and after so queued GPU work is counted."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads (None: leave them), restoring the previous count afterwards.

    Small models run fastest on one thread, and on a shared machine more threads spin-wait for busy
    cores (20x slower decoding and 80x slower tiny training steps were seen on 2 cores).
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def rotated(items: list, shift: int) -> list:
    """``items`` rotated left by ``shift``: the order of methods changes from one measurement to the next,
    so that none of them always runs first (warm caches) or last."""
    shift %= max(1, len(items))
    return items[shift:] + items[:shift]


# --------------------------------------------------------------------------------------------------
# The machine
def cpu_name() -> str:
    """The CPU's model name (what ``lscpu`` prints), or ``platform``'s guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: a CPU benchmark on a shared machine must say how busy it was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """Date, CPU (name, cores, torch threads, load), GPU, package versions and the git revision."""
    from kangaroo_lit.run_info import git_revision, package_versions

    device = torch.device(device)
    versions = package_versions()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": load_average(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": versions.get("transformers"),
        "python": platform.python_version(),
        "versions": versions,
        "git_revision": git_revision(),
    }


# --------------------------------------------------------------------------------------------------
# Statistics and tables
def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def plus_minus(stat: dict[str, float], fmt: str = ".1f") -> str:
    """``"12.3 ± 0.4"`` of a :func:`mean_std` result."""
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"


def markdown_table(header: list[str], rows: list[list[str]], left: int = 0) -> str:
    """A Markdown table; columns from index ``left`` on are right-aligned (numbers)."""
    align = [" --- " if i < left or not left else " ---: " for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, header: list[str], rows: list[list[str]], left: int = 0) -> None:
    """Print a table on stdout: with ``rich`` when installed, else as Markdown."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(markdown_table(header, rows, left))
        return
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < left else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=200).print(table)


# --------------------------------------------------------------------------------------------------
# Output files
def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def legend_outside(ax, fontsize: str | float = "small"):
    """The legend of ``ax`` to the right of its plotting area, where it cannot cover a bar or a line.

    Inside the axes, matplotlib's ``loc="best"`` still lands on bars once every spot is taken (a grouped
    bar chart fills its axes); outside it costs some width instead. Save the figure with
    ``bbox_inches="tight"`` so that the legend is not cut off.
    """
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=fontsize,
                     frameon=False)


def fresh_run_dir(root: str | Path, prefix: str) -> Path:
    """A directory ``<root>/<prefix>-<YYYYmmdd-HHMMSS>`` that does not exist yet (``-2``, ``-3`` ... on a clash).

    A benchmark run without ``--out_dir`` writes here: its files appear, and never overwrite an earlier run's.
    """
    import datetime as _dt

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = Path(root) / f"{prefix}-{stamp}", 1
    while candidate.exists():
        n += 1
        candidate = Path(root) / f"{prefix}-{stamp}-{n}"
    return candidate


def write_outputs(out_dir: str | Path, stem: str, report: dict[str, Any], markdown: str,
                  plot: Callable[[dict[str, Any], Path], bool] | None = None) -> list[Path]:
    """Write ``<stem>.json`` (every number), ``<stem>.md`` (the tables) and, when ``plot`` draws one,
    ``<stem>.png`` under ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths[1].write_text(markdown)
    if plot is not None:
        if plot(report, out / f"{stem}.png"):
            paths.append(out / f"{stem}.png")
        else:
            print("no matplotlib, so no .png (pip install 'kangaroo_lit[plots]')", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return paths
