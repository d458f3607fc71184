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

from typing import Any

from kangaroo_lit import cli_scaffold

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


def parse(argv: list[str] | None = None) -> dict[str, Any]:
    """The parsed arguments of :func:`export` (``--config`` files applied, then the flags after them)."""
    return cli_scaffold.parse(cli_scaffold.build_parser(export, PROG), argv)


def main(argv: list[str] | None = None) -> int:
    """``kangaroo-lit export``: 0 on success, 2 with one ``error:`` line for a user's mistake."""
    cfg = parse(argv)
    return cli_scaffold.run_reporting(lambda: export(**cfg))
