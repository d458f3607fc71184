"""What ``kangaroo-lit`` says around a LightningCLI run: quiet logs, one-line usage errors, a closing summary.

Everything here acts inside the command only (a context manager, or a function the command calls): importing
this module changes nothing in the importing process (``tests/test_import_side_effects.py``).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
import shlex
import shutil
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# Lightning's loggers that print its "💡 Tip: ... try installing litlogger / litmodels" advertisements.
_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero")

# Files a run writes before its first step: a refused run may leave these and nothing else.
_SETUP_ONLY_FILES = {"config.yaml", "hparams.yaml"}


class _DropLightningTips(logging.Filter):
    """Drops Lightning's advertisements for its cloud services (nothing a user of this tool can act on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence, for the block only, what Lightning and torch print that is wrong or useless for this tool.

    * the frozen HF base stays in eval mode on purpose (no dropout in the model being served);
    * the data module's loader does resume mid-epoch exactly (its position travels in the data module's
      ``state_dict``, which Lightning's check does not look at);
    * Lightning's own ``_pytree`` still builds torch's deprecated ``LeafSpec`` (Lightning's to change;
      printed twice per run, it says nothing about the user's run);
    * the litlogger / litmodels tips.
    """
    tip_filter = _DropLightningTips()
    loggers = [logging.getLogger(name) for name in _TIP_LOGGERS]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        for logger in loggers:
            logger.addFilter(tip_filter)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(tip_filter)


# --------------------------------------------------------------------------------------------------
# Usage errors in one line

_UNKNOWN_KEY_PATTERNS = (
    re.compile(r"does not accept option '([^']+)'"),  # a key in a --config file
    re.compile(r"unrecognized arguments: --([^\s=]+)"),  # a flag on the command line
    re.compile(r"No action for key \"?([^\s\"]+)\"?"),
)


def unknown_key(message: str) -> str | None:
    """The configuration key an argument-parsing error message complains about, if it names one."""
    for pattern in _UNKNOWN_KEY_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1)
    return None


def valid_keys(parser: Any) -> list[str]:
    """Every ``--a.b.c`` option of a (jsonargparse) parser, without the dashes."""
    keys = []
    for action in getattr(parser, "_actions", []):
        for option in action.option_strings:
            if option.startswith("--") and not option.endswith("+"):
                keys.append(option[2:])
    return keys


def nearest_key(key: str, keys: Iterable[str]) -> str | None:
    """The valid key closest to a mistyped one (difflib), or None when nothing is close.

    When the key's group exists (``model.`` for ``model.exit_layr``), only its members are candidates: a
    typo in the last part is a sibling's name, never the group itself or a similar name elsewhere. A
    group that does not exist (``modle.exit_layer``) is itself the typo: every key is a candidate.
    """
    keys = list(keys)
    group = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in keys if group and k.startswith(group)]
    match = difflib.get_close_matches(key, siblings or keys, n=1, cutoff=0.75)
    return match[0] if match else None


def one_line_usage_error(message: str, parser: Any) -> str:
    """``error: <message>[; did you mean <key>?] (<prog> --help lists every option)`` on one line."""
    text = " ".join(message.split())
    key = unknown_key(text)
    nearest = nearest_key(key, valid_keys(parser)) if key else None
    hint = f"; did you mean {nearest}?" if nearest else ""
    prog = str(getattr(parser, "prog", "kangaroo-lit")).replace(" [options]", "")
    return f"error: {text}{hint} (`{prog} --help` lists every option)"


# --------------------------------------------------------------------------------------------------
# A refused run leaves no folder behind


def remove_setup_only_dir(log_dir: str | Path | None) -> bool:
    """Delete ``log_dir`` when it holds nothing but what a run writes before its first step.

    A run refused at setup (bad data, a setting out of range) would otherwise leave a ``version_N``
    folder with only its ``config.yaml``, or empty, which reads like a run that happened. The parent
    (``lightning_logs``) goes too when that leaves it empty. Returns whether anything was removed.
    """
    if log_dir is None:
        return False
    path = Path(log_dir)
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    if any(entry.is_dir() or entry.name not in _SETUP_ONLY_FILES for entry in entries):
        return False
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only if empty
    return True


# --------------------------------------------------------------------------------------------------
# The summary at the end of fit


def prompt_format(data_format: str | None, use_chat_template: bool) -> str:
    """The ``generate --format`` that renders prompts as the training data was rendered."""
    if data_format == "text":
        return "raw"
    return "chat" if use_chat_template else "instruction"


def fit_summary(root_dir: str | Path, log_dir: str | Path | None, last_ckpt: str | Path | None,
                fmt: str) -> str:
    """Where a finished ``fit`` left its outputs, and the commands that decode with what it trained."""
    lines = [f"done: run directory {root_dir}" + (f" (logs in {log_dir})" if log_dir else "")]
    if last_ckpt is None or not Path(last_ckpt).is_file():
        lines.append("no checkpoint was written (checkpointing is off): nothing to export")
        return "\n".join(lines)
    artifact = Path(root_dir) / "artifact"
    lines += [
        f"last checkpoint: {last_ckpt}",
        "next: export the draft, then decode with it:",
        f"  kangaroo-lit export --ckpt_path {shlex.quote(str(last_ckpt))} --out_dir {shlex.quote(str(artifact))}",
        f"  kangaroo-lit generate --artifact {shlex.quote(str(artifact))} --format {fmt} "
        "--prompt \"What is 12 plus 7?\" --compare_vanilla",
    ]
    return "\n".join(lines)


def print_fit_summary(cli: Any) -> None:
    """Print :func:`fit_summary` for a finished LightningCLI ``fit`` on stderr (global rank 0 only)."""
    trainer = cli.trainer
    if not trainer.is_global_zero:
        return
    from kangaroo_lit.checkpointing import KangarooCheckpoint

    checkpoint = next((cb for cb in trainer.callbacks if isinstance(cb, KangarooCheckpoint)), None)
    last = checkpoint.last_path if checkpoint is not None and checkpoint.dirpath else None
    logger = trainer.logger
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    data = cli.datamodule
    fmt = prompt_format(getattr(data, "data_format", None), bool(getattr(data, "use_chat_template", False)))
    print(fit_summary(trainer.default_root_dir, log_dir, last, fmt), file=sys.stderr)
