"""``kangaroo-lit``: LightningCLI's fit/validate/test/predict plus the project's own subcommands.

LightningCLI arguments keep its underscore style (``--model.exit_layer``, ``--ckpt_path``); the
project's own subcommands (``export``, ``generate``, ``specbench``, ``bench``) use hyphens.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from kangaroo_lit.callbacks import JsonlPredictionWriter
from kangaroo_lit.checkpointing import KangarooCheckpoint
from kangaroo_lit.lit_module import STRUCTURAL_HPARAMS, KangarooLitModule, saved_hparams
from kangaroo_lit.run_info import RunInfoCallback

# name -> "module:function"; each function takes argv (list[str]) and returns an exit code.
OWN_SUBCOMMANDS: dict[str, str] = {
    "export": "kangaroo_lit.cli_export:main",
    "generate": "kangaroo_lit.cli_generate:main",
    "bench": "kangaroo_lit.bench_decode:main",
}
# Model arguments that only affect decoding (predict, decode callbacks): never a conflict on resume.
DECODING_HPARAMS = ("max_new_tokens", "threshold", "max_draft", "temperature")


class CheckpointConfigMismatch(ValueError):
    """Model arguments given for a resumed run disagree with the checkpoint's."""


def _normalise(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_normalise(v) for v in value]
    return value


class KangarooCLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the base model and a fixed-place checkpoint."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Users name the model once; the data module tokenizes with the same model's tokenizer.
        parser.link_arguments("model.base_model", "data.tokenizer")
        parser.add_lightning_class_args(KangarooCheckpoint, "checkpoint")

    def _parse_ckpt_path(self) -> None:
        """Resume safely: never let the checkpoint silently override what the user asked for.

        Lightning's default re-parses the checkpoint's hyperparameters over the command line. Here,
        a model argument left at its default takes the checkpoint's value (so ``--ckpt_path`` alone
        resumes the same model); one set to something else that disagrees with the checkpoint is an
        error listing every such argument, except decoding settings (and, outside ``fit``, anything
        that leaves the model's structure alone), which the command line may change.
        """
        if not self.config.get("subcommand"):
            return
        sub = self.config.subcommand
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        if not Path(ckpt_path).is_file():
            return
        saved = saved_hparams(torch.load(ckpt_path, weights_only=True, map_location="cpu"))
        if not saved:
            return
        defaults = {
            name: p.default
            for name, p in inspect.signature(KangarooLitModule.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        given = self.config[sub].model
        conflicts, adopt = [], {}
        for key, saved_value in saved.items():
            if key not in given:
                continue
            value = given[key]
            if _normalise(value) == _normalise(saved_value):
                continue
            if key in defaults and _normalise(value) == _normalise(defaults[key]):
                adopt[key] = saved_value
            elif key in DECODING_HPARAMS or (sub != "fit" and key not in STRUCTURAL_HPARAMS):
                # Free to change: decoding settings always; outside fit, anything that does not change
                # the model's structure. The command line wins, said out loud.
                print(f"note: model.{key}={value!r} (checkpoint has {saved_value!r})", file=sys.stderr)
            else:
                conflicts.append(f"  model.{key}: checkpoint has {saved_value!r}, this run asks for {value!r}")
        if conflicts:
            raise CheckpointConfigMismatch(
                f"checkpoint {ckpt_path} was trained with other model arguments than this run:\n"
                + "\n".join(conflicts)
                + "\nResume with the checkpoint's values (drop or correct these arguments), or start a new "
                "run without --ckpt_path."
            )
        for key, value in adopt.items():
            given[key] = value


def run_lightning(argv: list[str] | None = None, run: bool = True) -> KangarooCLI:
    """Build (and by default run) the LightningCLI for ``argv``."""
    from kangaroo_lit.data import InstructionDataModule

    return KangarooCLI(
        KangarooLitModule,
        InstructionDataModule,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "callbacks": [RunInfoCallback(), JsonlPredictionWriter()],
            # The data module's batch sampler shards batches across ranks itself.
            "use_distributed_sampler": False,
        },
        parser_kwargs={"description": __doc__},
        auto_configure_optimizers=False,
    )


def _usage() -> str:
    own = ", ".join(sorted(OWN_SUBCOMMANDS)) or "(none yet)"
    return (
        "usage: kangaroo-lit {fit,validate,test,predict} [--config FILE] [LightningCLI options]\n"
        f"       kangaroo-lit {{{own}}} [options]\n"
        "Run `kangaroo-lit fit --help` (or `<subcommand> --help`) for the options of each subcommand."
    )


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``kangaroo-lit`` and ``python -m kangaroo_lit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OWN_SUBCOMMANDS:
        module_name, func_name = OWN_SUBCOMMANDS[argv[0]].split(":")
        return int(getattr(importlib.import_module(module_name), func_name)(argv[1:]) or 0)
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print(_usage())
        return 0 if argv else 2
    try:
        # From the console the arguments are sys.argv's: let LightningCLI read them itself (passing
        # them again as ``args`` makes it warn about arguments given twice).
        run_lightning(None if argv == sys.argv[1:] else argv)
    except CheckpointConfigMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
