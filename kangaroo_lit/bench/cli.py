"""``kangaroo-lit bench <name> [--config FILE] [--print_config] [arguments]``: dispatch to one benchmark.

Each benchmark is a function whose parameters are its arguments (jsonargparse, LightningCLI's
underscore style; the docstring's ``Args:`` are the help). Any argument may come from ``--config FILE``;
``--print_config`` prints them all as YAML and exits. Lists are written as ``'[1,2]'``::

    kangaroo-lit bench decode --artifact runs/tiny/artifact --thresholds '[0,0.3,0.6]' --out_dir /tmp/bench
    kangaroo-lit bench cost_model --shape small --exit_layer '[1,2]' --print_config > cost.yaml
    kangaroo-lit bench cost_model --config cost.yaml --repeats 50    # a later flag wins
    kangaroo-lit bench train_step --shape tiny --threads 1 --in_process --out_dir /tmp/bench
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from kangaroo_lit import cli_scaffold

PROG = "kangaroo-lit bench"
# name -> "module:function"; imported only when chosen (train_step imports Lightning, decode does not need it).
BENCHMARKS: dict[str, str] = {
    "decode": "kangaroo_lit.bench.decode:decode",
    "cost_model": "kangaroo_lit.bench.cost_model:cost_model",
    "train_step": "kangaroo_lit.bench.train_step:train_step",
    "tree_vs_chain": "kangaroo_lit.bench.tree_vs_chain:tree_vs_chain",
    "threshold_curve": "kangaroo_lit.bench.threshold_curve:threshold_curve",
}


def benchmark(name: str) -> Callable[..., dict[str, Any]]:
    """The function of benchmark ``name``."""
    module_name, func_name = BENCHMARKS[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def parse(name: str, argv: list[str]) -> dict[str, Any]:
    """The arguments of benchmark ``name`` (``--config`` files applied, then the flags after them).

    Bool parameters are switches, as in ``kangaroo-lit generate``: ``--in_process`` alone means true,
    ``--in_process false`` or ``--no_in_process`` false.
    """
    return cli_scaffold.parse(cli_scaffold.build_parser(benchmark(name), f"{PROG} {name}"), argv)


def usage() -> str:
    lines = [f"usage: {PROG} {{{','.join(BENCHMARKS)}}} [--config FILE] [--print_config] [arguments]", ""]
    for name in BENCHMARKS:
        lines.append(f"  {name:<11} {(benchmark(name).__doc__ or '').splitlines()[0]}")
    lines += ["", f"Run `{PROG} <name> --help` for the arguments of each."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark; 0 on success, 2 with one ``error:`` line for a user's mistake (a missing file, a
    setting out of range: a KangarooError); anything else is a bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(usage(), file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    config = parse(argv[0], argv[1:])
    return cli_scaffold.run_reporting(lambda: benchmark(argv[0])(**config))
