"""``kangaroo-lit``: LightningCLI's fit/validate/test/predict plus the project's own subcommands.

Every subcommand names its arguments in LightningCLI's underscore style (``--model.exit_layer``,
``--ckpt_path``, ``--max_new_tokens``), and the project's own (``export``, ``generate``, ``bench``) take
``--config`` and ``--print_config`` like ``fit``: their parsers come from typed signatures (jsonargparse).
"""

from __future__ import annotations

import importlib
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from kangaroo_lit.callbacks import JsonlPredictionWriter
from kangaroo_lit.checkpointing import (
    SETTINGS_KEY,
    CheckpointConfigMismatch,
    KangarooCheckpoint,
    load_checkpoint_file,
    reconcile_settings,
    saved_settings,
)
from kangaroo_lit.cli_scaffold import report_user_error
from kangaroo_lit.cli_support import one_line_usage_error, print_fit_summary, quiet_lightning, remove_setup_only_dir
from kangaroo_lit.embedded import resolve_path
from kangaroo_lit.errors import KangarooError
from kangaroo_lit.lit_module import KangarooLitModule
from kangaroo_lit.preemption import GracefulStop
from kangaroo_lit.run_info import RunInfoCallback
from kangaroo_lit.threads import set_threads_for

# name -> "module:function"; each function takes argv (list[str]) and returns an exit code.
OWN_SUBCOMMANDS: dict[str, str] = {
    "export": "kangaroo_lit.cli_export:main",
    "generate": "kangaroo_lit.cli_generate:main",
    "pull": "kangaroo_lit.model_zoo:main",
    "distill": "kangaroo_lit.distill:main",
    "self_instruct": "kangaroo_lit.distill:main_self_instruct",
    "calibrate": "kangaroo_lit.calibration:main",
    "bench": "kangaroo_lit.bench.cli:main",
    "specbench": "kangaroo_lit.specbench.cli:main",
}

# One line per subcommand for the top-level help (kept apart from OWN_SUBCOMMANDS: the help must not
# import every subcommand's module, which would load torch and transformers just to print it).
DESCRIPTIONS: dict[str, str] = {
    "fit": "train the draft (LoRA + adapter + exit head) on instruction data",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "predict": "decode a prompt file with a checkpoint, writing predictions.jsonl",
    "export": "turn a training checkpoint into a self-describing draft artifact",
    "generate": "decode prompts with a draft (self-speculative), optionally against vanilla",
    "pull": "fetch and convert a known base model (--list shows them)",
    "distill": "answer a data set's prompts with the base model (self-distilled training data)",
    "self_instruct": "instructions written and answered by the base model itself",
    "calibrate": "fit a draft artifact's confidence temperature on held-out answers",
    "bench": "benchmarks: decoding speed, training step, cost model",
    "specbench": "Spec-Bench: decoding methods compared on its question set",
}


class OneLineErrorParser(LightningArgumentParser):
    """LightningCLI's parser whose usage errors are one line, with the nearest valid key for a typo.

    jsonargparse prints the whole usage (over a hundred lines for ``fit``) before the one line that
    matters; a user who mistyped ``--model.exit_layr`` needs that line and ``did you mean
    model.exit_layer?`` only (:func:`~kangaroo_lit.cli_support.one_line_usage_error`).
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)  # raises: callers that catch parse errors keep them
        parser = getattr(ex, "subcommand_parser", None) or self
        print(one_line_usage_error(message, parser), file=sys.stderr)
        sys.exit(2)


class KangarooCLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the base model, a fixed-place checkpoint and safe resume."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Users name the model once; the data module tokenizes with the same model's tokenizer.
        parser.link_arguments("model.base_model", "data.tokenizer")
        parser.add_lightning_class_args(KangarooCheckpoint, "checkpoint")
        parser.add_argument(
            "--threads", type=int | None, default=None,
            help="torch CPU threads; default 1 for models under 20M parameters, else every core",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then settle what the configuration leaves open: loggers without a ``save_dir`` log
        under the run's root directory, CPU threads suit the model's size (:mod:`kangaroo_lit.threads`),
        and a checkpoint to resume is checked against the settings (:meth:`_reconcile_with_checkpoint`).

        Done here, right after parsing, so that a broken or foreign checkpoint file is reported by
        :func:`~kangaroo_lit.checkpointing.load_checkpoint_file` before anything else reads it.
        """
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub:
            return
        config = self.config[sub]
        self._set_log_dirs(config.trainer)
        if config.trainer.get("accelerator") == "cpu" or not torch.cuda.is_available():
            set_threads_for(resolve_path(config.model.base_model), config.get("threads"))
        self._reconcile_with_checkpoint(sub, config)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a run refused before its first step leaves no log folder that looks like a run."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            for logger in self.trainer.loggers if self.trainer.is_global_zero else []:
                remove_setup_only_dir(getattr(logger, "log_dir", None))
            raise

    def _reconcile_with_checkpoint(self, sub: str, config: Any) -> None:
        """Resume safely: never let the checkpoint silently override what the user asked for.

        A setting left at its default takes the checkpoint's value (so ``--ckpt_path`` alone resumes
        the same model); one set to something else that disagrees with the checkpoint is an error
        listing every such setting, except where its type allows the change
        (:func:`~kangaroo_lit.checkpointing.reconcile_settings`): decoding settings always, and outside
        ``fit`` everything that leaves the model's structure alone. (The module saves no Lightning
        hyperparameters, so LightningCLI itself does not re-parse the checkpoint over the command line.)
        """
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or Path(ckpt_path).is_dir():
            return  # Lightning's own names, or a DeepSpeed directory: Lightning resolves and loads those
        checkpoint = load_checkpoint_file(ckpt_path)
        saved_settings(checkpoint, source=str(ckpt_path))  # refuses a checkpoint of something else
        defaults = KangarooLitModule.default_settings().to_dict()
        result = reconcile_settings(config.model.as_dict(), checkpoint[SETTINGS_KEY], defaults, fitting=sub == "fit")
        if result.conflicts:
            raise CheckpointConfigMismatch(
                f"checkpoint {ckpt_path} was trained with other model settings than this run:\n  "
                + "\n  ".join(result.conflicts)
                + "\nResume with the checkpoint's values (drop or correct these arguments), or start a new "
                "run without --ckpt_path."
            )
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        for key, value in result.adopt.items():
            config.model[key] = value

    @staticmethod
    def _set_log_dirs(trainer_config: Any) -> None:
        """Loggers without a ``save_dir`` log under ``trainer.default_root_dir`` (so logs follow the run)."""
        loggers = trainer_config.get("logger")
        root = trainer_config.get("default_root_dir") or "."
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = logger.get("init_args") if hasattr(logger, "get") else None
            if init_args is not None and "save_dir" in init_args and init_args.save_dir is None:
                init_args.save_dir = root


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
            "callbacks": [RunInfoCallback(), JsonlPredictionWriter(), GracefulStop()],
            # The data module's batch sampler shards batches across ranks itself.
            "use_distributed_sampler": False,
        },
        parser_kwargs={"description": __doc__},
        parser_class=OneLineErrorParser,
        auto_configure_optimizers=False,
    )


def _usage() -> str:
    """The top-level help: both usage forms, then each subcommand with what it does."""
    own = ", ".join(sorted(OWN_SUBCOMMANDS)) or "(none yet)"
    names = ["fit", "validate", "test", "predict", *sorted(OWN_SUBCOMMANDS)]
    width = max(len(name) for name in names)
    listing = "\n".join(f"  {name:<{width}}  {DESCRIPTIONS.get(name, '')}".rstrip() for name in names)
    return (
        "usage: kangaroo-lit {fit,validate,test,predict} [--config FILE] [LightningCLI options]\n"
        f"       kangaroo-lit {{{own}}} [options]\n\n"
        f"subcommands:\n{listing}\n\n"
        "Run `kangaroo-lit fit --help` (or `<subcommand> --help`) for the options of each subcommand."
    )


def run_own_subcommand(name: str, argv: list[str]) -> int:
    """Run one of :data:`OWN_SUBCOMMANDS` with ``argv``.

    Those built with ``jsonargparse.CLI`` name themselves after ``sys.argv[0]`` in their usage line and
    in the tip after an error; it says ``kangaroo-lit <name>`` while the subcommand runs, so both give
    a command that works.
    """
    module_name, func_name = OWN_SUBCOMMANDS[name].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    saved = sys.argv[0] if sys.argv else None
    if sys.argv:
        sys.argv[0] = f"kangaroo-lit {name}"
    try:
        return int(func(argv) or 0)
    finally:
        if saved is not None:
            sys.argv[0] = saved


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``kangaroo-lit`` and ``python -m kangaroo_lit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OWN_SUBCOMMANDS:
        return run_own_subcommand(argv[0], argv[1:])
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print(_usage())
        return 0 if argv else 2
    try:
        # Lightning's tips and known-harmless deprecations are silenced for this command only
        # (quiet_lightning), never when the package is imported.
        with quiet_lightning():
            # From the console the arguments are sys.argv's: let LightningCLI read them itself (passing
            # them again as ``args`` makes it warn about arguments given twice).
            cli = run_lightning(None if argv == sys.argv[1:] else argv)
    except KangarooError as err:
        return report_user_error(err)
    stop = next((cb for cb in cli.trainer.callbacks if isinstance(cb, GracefulStop)), None)
    if stop is not None and stop.received is not None:
        name = signal.Signals(stop.received).name
        print(f"stopped by {name} after step {cli.trainer.global_step}; last.ckpt holds that step "
              "(resume with --ckpt_path)", file=sys.stderr)
        return 128 + stop.received
    if cli.subcommand == "fit" and cli.trainer.state.finished:
        print_fit_summary(cli)
    return 0


if __name__ == "__main__":
    sys.exit(main())
