"""Errors that are the user's to fix: a bad file, setting, checkpoint or model path.

The command line reports a :class:`KangarooError` as one line, ``error: <message>``, with exit code 2
and no traceback (``KANGAROO_DEBUG=1`` shows it). Everything else is a bug and keeps its traceback.
Each class also derives from the built-in exception a caller would expect (``ValueError``,
``FileNotFoundError``), so code that catches those keeps working.
"""

from __future__ import annotations


class KangarooError(Exception):
    """A mistake in the user's input; the message names the file, line, field or setting and what is allowed."""


class DataError(KangarooError, ValueError):
    """A data or prompt file that cannot be used (malformed row, missing field, empty file, too long)."""


class DataFileNotFound(KangarooError, FileNotFoundError):
    """A data or prompt file that does not exist."""


class ConfigError(KangarooError, ValueError):
    """A setting out of its allowed range, or settings that contradict each other."""


class ModelSourceError(KangarooError, ValueError):
    """A base model name or directory that cannot be loaded (missing, empty, unsupported)."""


class CheckpointError(KangarooError, ValueError):
    """A checkpoint or artifact that is not one of this project's, is incomplete, or belongs to another run."""
