"""What the project's own subcommands (``export``, ``generate``, ``specbench``, ``bench``, ``pull``) share.

* :func:`build_parser`: a parser from a function's signature or a dataclass's fields (jsonargparse,
  LightningCLI's underscore style), the docstring's ``Args:`` as the help, ``--config FILE`` and
  ``--print_config``, bool parameters as switches (``--json``, ``--json false``, ``--no_json``);
* :func:`parse`: its arguments as a dict (``--config`` files applied, then the flags after them);
* :func:`run_reporting`/:func:`report_user_error`: the one error contract of :mod:`kangaroo_lit.errors`:
  a :class:`~kangaroo_lit.errors.KangarooError` is one ``error:`` line and exit code 2 (its traceback too
  with ``KANGAROO_DEBUG=1``); anything else is a bug and keeps its traceback;
* :func:`kernel_linears`: the ``--kernel`` option the decoding commands share, with its error worded for it.

jsonargparse is imported when a parser is built, not with this module (``kangaroo-lit --help`` stays quick).
"""

from __future__ import annotations

import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from kangaroo_lit.errors import ConfigError, KangarooError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from jsonargparse import ArgumentParser
    from torch import nn


def switch_defaults(target: Callable[..., Any]) -> dict[str, bool]:
    """``{name: default}`` of the bool parameters of a function, or the bool fields of a dataclass."""
    # a dataclass's signature is its __init__'s: its fields, in order, with their defaults
    parameters = inspect.signature(target).parameters.values()
    return {p.name: bool(p.default) for p in parameters if p.annotation in (bool, "bool")}


def argument_docs(target: Callable[..., Any]) -> dict[str, str | None]:
    """The help of each argument: the ``Args:`` section of the target's docstring."""
    from docstring_parser import parse as parse_docstring

    return {p.arg_name: p.description for p in parse_docstring(target.__doc__ or "").params}


def _help_formatter() -> type:
    """The help formatter of every own subcommand (a class only once jsonargparse is imported)."""
    import argparse

    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """jsonargparse's help, with the description's examples kept as written."""

    return HelpFormatter


def build_parser(target: Callable[..., Any], prog: str, description: str | None = None, *,
                 text: Iterable[str] = ()) -> ArgumentParser:
    """``--config``, ``--print_config`` and one ``--name`` per parameter of ``target`` (a function or a dataclass).

    Args:
        target: the function (its parameters) or dataclass (its fields) the arguments are for.
        prog: the command as the user types it (``kangaroo-lit export``), for usage lines and errors.
        description: the help's text above the arguments; default the docstring of ``target``'s module
            (each front-end's module docstring is its manual).
        text: parameters parsed as plain text, never YAML: ``null`` or ``# Title`` stay the words, and an
            absent value (the default, None) is told apart from an empty one.

    Bool parameters become switches: ``--json`` alone means true, ``--json false`` or ``--no_json`` false,
    so a config file can set them as well.
    """
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    if description is None:
        description = sys.modules[target.__module__].__doc__
    switches = switch_defaults(target)
    text = tuple(text)
    docs = argument_docs(target)
    defaults = {name: p.default for name, p in inspect.signature(target).parameters.items()}
    # exact names only: no abbreviations (an old --ckpt must not quietly mean --ckpt_path)
    parser = ArgumentParser(prog=prog, description=description, formatter_class=_help_formatter(),
                            allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of these arguments (repeatable)")
    add_arguments = parser.add_class_arguments if inspect.isclass(target) else parser.add_function_arguments
    add_arguments(target, as_group=False, as_positional=False, skip={*switches, *text})
    for name in text:
        parser.add_argument(f"--{name}", type=str, default=defaults[name], help=docs.get(name))
    for name, default in switches.items():
        parser.add_argument(f"--{name}", action=ActionYesNo, nargs="?", default=default, help=docs.get(name))
    return parser


def parse(parser: ArgumentParser, argv: list[str] | None = None) -> dict[str, Any]:
    """The parsed arguments (``--config`` files applied, then the flags after them), without ``config``.

    ``argv`` None reads ``sys.argv[1:]``; ``--help`` and ``--print_config`` print and exit (SystemExit 0),
    a malformed argument exits with code 2 after jsonargparse's message.
    """
    config = parser.parse_args(argv).as_dict()
    config.pop("config", None)
    return config


def report_user_error(err: KangarooError) -> int:
    """``error: <message>`` on stderr, after the traceback when ``KANGAROO_DEBUG`` is set (not ``0``); 2.

    The one reporter of :mod:`kangaroo_lit.errors`' contract, for ``fit`` and the own subcommands alike.
    """
    if os.environ.get("KANGAROO_DEBUG", "") not in ("", "0"):
        traceback.print_exception(type(err), err, err.__traceback__)
    print(f"error: {err}", file=sys.stderr)
    return 2


def run_reporting(action: Callable[[], Any]) -> int:
    """Run a command's ``action``; its exit code.

    0 when it returns (or the int it returns, for a command that has its own codes); 2 with one line from
    :func:`report_user_error` for a :class:`KangarooError`. Any other exception is a bug and propagates
    with its traceback: a ``ValueError`` from deep inside is not the user's to fix.
    """
    try:
        result = action()
    except KangarooError as err:
        return report_user_error(err)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def kernel_linears(model: nn.Module, kernel: str) -> AbstractContextManager[int]:
    """``--kernel``: the context in which ``model``'s linears run on ``kernel`` (yields how many are patched).

    Checked when called, not when entered, so that a machine without the streaming kernel is refused with
    the option's own words before any work starts.

    Raises:
        ConfigError: ``--kernel streaming`` where the kernel cannot be built (the message says why).
    """
    from kangaroo_lit.kernels import streaming_linear

    if kernel == "streaming":
        ok, why = streaming_linear.available()
        if not ok:
            raise ConfigError(f"--kernel streaming: {why}; use --kernel eager")
    return streaming_linear.streaming_linears(model, kernel == "streaming")
