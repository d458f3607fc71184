"""``kangaroo-lit export``: a Lightning checkpoint -> the artifact directory of DESIGN §4b.

    kangaroo-lit export --ckpt_path runs/tiny/checkpoints/last.ckpt --out_dir runs/tiny/artifact
    kangaroo-lit export --config export.yaml --out_dir /tmp/artifact     # a later flag wins
    kangaroo-lit export --ckpt_path X --out_dir Y --print_config > export.yaml

The arguments are those of :func:`export` (jsonargparse, LightningCLI's underscore style): any of them
may come from ``--config FILE``; ``--print_config`` prints them as YAML and exits. An existing non-empty
``--out_dir`` is refused unless ``--overwrite`` is given; the artifact is written beside it and renamed
into place only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, DefaultHelpFormatter

from kangaroo_lit.errors import KangarooError


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the description's examples kept as written."""


PROG = "kangaroo-lit export"


def export(ckpt_path: str, out_dir: str, base_model: str | None = None, overwrite: bool = False) -> int:
    """Write the artifact of a Lightning checkpoint; 0 on success.

    Args:
        ckpt_path: Lightning checkpoint to export, a file or a DeepSpeed directory (e.g. runs/x/checkpoints/last.ckpt).
        out_dir: artifact directory to write (refused when it exists and is not empty, unless --overwrite).
        base_model: base model HF name or local path; default the one recorded in the checkpoint.
        overwrite: replace an existing non-empty --out_dir (the old one is deleted once the new one is in place).

    Raises:
        KangarooError: a bad checkpoint, base model or output directory (``main`` prints it as one line).
    """
    from kangaroo_lit.artifact import export_checkpoint, read_manifest

    out = export_checkpoint(ckpt_path, out_dir, base_model=base_model, overwrite=overwrite)
    manifest = read_manifest(out)
    lora = manifest["lora"]
    print(f"exported {ckpt_path} -> {out} (base {manifest['base_model']}, exit_layer {manifest['exit_layer']}, "
          f"LoRA {'rank ' + str(lora['rank']) + ' scope ' + lora['scope'] if lora else 'off'}, "
          f"exit head {manifest['exit_head']})")
    return 0


SWITCHES = ("overwrite",)


def build_parser() -> ArgumentParser:
    """``--config``, ``--print_config`` and one argument per parameter of :func:`export`."""
    # exact names only: no abbreviations (an old --ckpt must not quietly mean --ckpt_path)
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=_HelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of these arguments (repeatable)")
    parser.add_function_arguments(export, as_group=False, as_positional=False, skip=set(SWITCHES))
    # --overwrite alone means true; --overwrite false / --no_overwrite also parse (a config file can set it)
    parser.add_argument("--overwrite", action=ActionYesNo, nargs="?", default=False,
                        help="replace an existing non-empty --out_dir (the old one is deleted once the new one is "
                        "in place)")
    return parser


def parse(argv: list[str] | None = None) -> dict:
    """The parsed arguments of :func:`export` (``--config`` files applied, then the flags after them)."""
    cfg = build_parser().parse_args(argv).as_dict()
    cfg.pop("config", None)
    return cfg


def report_user_error(err: KangarooError) -> int:
    """``error: <message>`` on stderr (with the traceback when ``KANGAROO_DEBUG=1``); exit code 2."""
    if os.environ.get("KANGAROO_DEBUG", "") not in ("", "0"):
        traceback.print_exception(type(err), err, err.__traceback__)
    print(f"error: {err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """``kangaroo-lit export``: 0 on success, 2 with one ``error:`` line for a user's mistake."""
    cfg = parse(argv)
    try:
        return export(**cfg)
    except KangarooError as err:
        return report_user_error(err)
