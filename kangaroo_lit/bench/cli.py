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
import inspect
import sys
from collections.abc import Callable
from typing import Any

PROG = "kangaroo-lit bench"
# name -> "module:function"; imported only when chosen (train_step imports Lightning, decode does not need it).
BENCHMARKS: dict[str, str] = {
    "decode": "kangaroo_lit.bench.decode:decode",
    "cost_model": "kangaroo_lit.bench.cost_model:cost_model",
    "train_step": "kangaroo_lit.bench.train_step:train_step",
}


def benchmark(name: str) -> Callable[..., dict[str, Any]]:
    """The function of benchmark ``name``."""
    module_name, func_name = BENCHMARKS[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def build_parser(name: str):
    """``--config``, ``--print_config`` and one argument per parameter of the benchmark's function.

    Bool parameters are switches, as in ``kangaroo-lit generate``: ``--in_process`` alone means true,
    ``--in_process false`` or ``--no_in_process`` false.
    """
    import argparse

    from docstring_parser import parse as parse_docstring
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """jsonargparse's help, with the description's examples kept as written."""

    func = benchmark(name)
    switches = {n: p.default for n, p in inspect.signature(func).parameters.items() if p.annotation in (bool, "bool")}
    # exact names only: no abbreviations (an old --out must not quietly mean --out_dir)
    parser = ArgumentParser(prog=f"{PROG} {name}", description=importlib.import_module(func.__module__).__doc__,
                            formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of these arguments (repeatable)")
    parser.add_function_arguments(func, as_group=False, as_positional=False, skip=set(switches))
    docs = {p.arg_name: p.description for p in parse_docstring(func.__doc__ or "").params}
    for switch, default in switches.items():
        parser.add_argument(f"--{switch}", action=ActionYesNo, nargs="?", default=default, help=docs.get(switch))
    return parser


def parse(name: str, argv: list[str]) -> dict[str, Any]:
    """The arguments of benchmark ``name`` (``--config`` files applied, then the flags after them)."""
    config = build_parser(name).parse_args(argv).as_dict()
    config.pop("config", None)
    return config


def usage() -> str:
    lines = [f"usage: {PROG} {{{','.join(BENCHMARKS)}}} [--config FILE] [--print_config] [arguments]", ""]
    for name in BENCHMARKS:
        lines.append(f"  {name:<11} {(benchmark(name).__doc__ or '').splitlines()[0]}")
    lines += ["", f"Run `{PROG} <name> --help` for the arguments of each."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark; 0 on success, 2 (with a one-line message) on bad input such as a missing file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(usage(), file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    config = parse(argv[0], argv[1:])
    try:
        benchmark(argv[0])(**config)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
