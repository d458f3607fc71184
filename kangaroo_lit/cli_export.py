"""``kangaroo-lit export --ckpt <lightning ckpt> --out <dir>``: write the artifact of DESIGN §4b."""

from __future__ import annotations

import argparse
import sys

from kangaroo_lit.artifact import export_checkpoint, read_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kangaroo-lit export", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (e.g. runs/x/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="artifact directory to write")
    parser.add_argument("--base-model", default=None,
                        help="override the base model name/path recorded in the checkpoint")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, base_model=args.base_model)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifest = read_manifest(out)
    lora = manifest["lora"]
    print(f"exported {args.ckpt} -> {out} (base {manifest['base_model']}, exit_layer {manifest['exit_layer']}, "
          f"LoRA {'rank ' + str(lora['rank']) + ' scope ' + lora['scope'] if lora else 'off'}, "
          f"exit head {manifest['exit_head']})")
    return 0
