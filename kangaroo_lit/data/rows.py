"""Reading and validating raw rows: Dolly instruction rows and plain-text documents.

A *row* is a plain ``dict`` of strings: ``{"instruction", "context", "response"}`` for ``format="dolly"``
and ``{"text"}`` for ``format="text"``. Everything that can be wrong with an input row is found here,
before any tokenization, and reported with the file, the 1-based line (or the element index of a
``.json`` list) and the field, so a user can fix the data instead of guessing.

Accepted inputs:

* ``.jsonl``: one JSON object per line (blank lines are ignored).
* ``.json``: a JSON list of objects, or JSON lines (Dolly's own file is JSON lines named ``.jsonl``,
  but copies named ``.json`` are common).
* ``.txt`` (``format="text"`` only): documents separated by one or more blank lines.
* A Hugging Face Hub dataset (``load_hub_rows``), validated the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kangaroo_lit.errors import ConfigError, DataError, DataFileNotFound

log = logging.getLogger(__name__)

DataFormat = Literal["dolly", "text"]
BadRowPolicy = Literal["error", "skip"]

# Dolly's schema. ``context`` may be absent (Alpaca-style exports drop empty fields) but, when
# present, must be a string like the others; ``category`` and any other key are ignored.
DOLLY_REQUIRED = ("instruction", "response")
DOLLY_OPTIONAL = ("context",)
TEXT_FIELD = "text"

# How many problems an error or warning message lists before it only gives the count.
MAX_LISTED_PROBLEMS = 5


@dataclass(frozen=True)
class Location:
    """Where a record came from.

    Attributes:
        source: file path or Hub dataset name.
        line: 1-based line number (JSON lines, ``.txt``), or None.
        index: 0-based element index (``.json`` list, Hub dataset row), or None.
    """

    source: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}, line {self.line}"
        if self.index is not None:
            return f"{self.source}, element {self.index}"
        return self.source


@dataclass(frozen=True)
class RowProblem:
    """One malformed row.

    Attributes:
        location: where the row is.
        message: what is wrong.
        field: the offending field, when one is to blame.
    """

    location: Location
    message: str
    field: str | None = None

    def __str__(self) -> str:
        where = str(self.location)
        if self.field is not None:
            where += f", field {self.field!r}"
        return f"{where}: {self.message}"


class _NotJson:
    """Marker for a record that could not be decoded; carries the reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def validate_record(record: Any, data_format: DataFormat, location: Location) -> tuple[dict | None, list]:
    """Check one decoded record against the schema of ``data_format``.

    Args:
        record: the decoded JSON value (or a ``_NotJson`` marker).
        data_format: ``"dolly"`` or ``"text"``.
        location: where the record came from, for messages.

    Returns:
        ``(row, problems)``: the normalised row (None when there are problems) and the list of
        ``RowProblem``.
    """
    if isinstance(record, _NotJson):
        return None, [RowProblem(location, record.reason)]
    if not isinstance(record, dict):
        return None, [RowProblem(location, f"expected a JSON object, got {_type_name(record)}")]

    required = DOLLY_REQUIRED if data_format == "dolly" else (TEXT_FIELD,)
    optional = DOLLY_OPTIONAL if data_format == "dolly" else ()
    problems = []
    row: dict[str, str] = {}
    for name in required + optional:
        if name not in record:
            if name in required:
                problems.append(RowProblem(location, "missing", name))
            else:
                row[name] = ""
            continue
        value = record[name]
        if not isinstance(value, str):
            problems.append(RowProblem(location, f"expected a string, got {_type_name(value)}", name))
        elif name in required and not value.strip():
            # An empty instruction or text trains on nothing useful; an empty response would teach
            # the model to stop at once. Both are data bugs worth reporting.
            problems.append(RowProblem(location, "empty string", name))
        else:
            row[name] = value
    return (None, problems) if problems else (row, [])


def _decode_json_line(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return _NotJson(f"not valid UTF-8 ({err.reason} at byte {err.start})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return _NotJson(f"not valid JSON ({err.msg}, column {err.colno})")


def iter_json_lines(path: Path) -> Iterator[tuple[Location, Any]]:
    """Yield ``(location, decoded record)`` for every non-blank line of a JSON-lines file (``.gz``: gzipped)."""
    import gzip

    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                yield Location(str(path), line=line_no), _decode_json_line(raw)


def iter_json_file(path: Path) -> Iterator[tuple[Location, Any]]:
    """Yield records of a ``.json`` file: a JSON list (by element index) or JSON lines (by line).

    Raises:
        ValueError: the file starts like a list but is not valid JSON as a whole.
    """
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from iter_json_lines(path)
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f", line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise DataError(f"{path}{where}: not a valid JSON list ({err})") from err
    for index, record in enumerate(records):
        yield Location(str(path), index=index), record


def iter_text_documents(path: Path) -> Iterator[tuple[Location, Any]]:
    """Yield ``{"text": document}`` records of a ``.txt`` file; documents are separated by blank lines.

    The location is the 1-based line on which the document starts.
    """
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    lines: list[str] = []
    start = 0
    for line_no, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            if not lines:
                start = line_no
            lines.append(line.rstrip())
        elif lines:
            yield Location(str(path), line=start), {TEXT_FIELD: "\n".join(lines)}
            lines = []
    if lines:
        yield Location(str(path), line=start), {TEXT_FIELD: "\n".join(lines)}


def iter_file_records(path: str | Path, data_format: DataFormat) -> Iterator[tuple[Location, Any]]:
    """Dispatch on the file suffix: ``.jsonl`` (or ``.jsonl.gz``), ``.json`` or (text format only) ``.txt``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the suffix is not supported for this format.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFileNotFound(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or path.name.lower().endswith(".jsonl.gz"):
        return iter_json_lines(path)
    if suffix == ".json":
        return iter_json_file(path)
    if suffix == ".txt" and data_format == "text":
        return iter_text_documents(path)
    allowed = ".json, .jsonl, .jsonl.gz" + (", .txt" if data_format == "text" else "")
    raise DataError(f"{path}: unsupported file type {suffix!r} for format={data_format!r} (use {allowed})")


def collect_rows(
    records: Iterable[tuple[Location, Any]],
    data_format: DataFormat,
    on_bad_row: BadRowPolicy = "error",
    source: str = "data",
) -> list[dict]:
    """Validate records and apply the bad-row policy.

    Args:
        records: ``(location, decoded record)`` pairs.
        data_format: ``"dolly"`` or ``"text"``.
        on_bad_row: ``"error"`` raises on any malformed row; ``"skip"`` drops them with a warning.
        source: name used in the summary messages.

    Returns:
        The valid rows, in input order.

    Raises:
        ValueError: malformed rows with ``on_bad_row="error"`` (the first few listed, with the
            count), or no valid row at all (never a silent zero-step run).
    """
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    rows: list[dict] = []
    problems: list[RowProblem] = []
    bad_rows = 0
    for location, record in records:
        row, row_problems = validate_record(record, data_format, location)
        if row_problems:
            bad_rows += 1
            problems.extend(row_problems)
        else:
            rows.append(row)

    if problems:
        listed = "\n  ".join(str(p) for p in problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        listed += f"\n  ... and {more} more" if more > 0 else ""
        if on_bad_row == "error":
            raise DataError(
                f"{bad_rows} malformed row(s) in {source} (format={data_format!r}); fix them or pass "
                f"on_bad_row='skip':\n  {listed}"
            )
        log.warning("skipped %d malformed row(s) in %s:\n  %s", bad_rows, source, listed)
    if not rows:
        raise DataError(f"no valid rows in {source} (format={data_format!r}); nothing to train on")
    return rows


def load_file_rows(path: str | Path, data_format: DataFormat, on_bad_row: BadRowPolicy = "error") -> list[dict]:
    """Read and validate all rows of a local file (see the module docstring for the formats)."""
    return collect_rows(iter_file_records(path, data_format), data_format, on_bad_row, source=str(path))


def load_hub_rows(
    dataset_name: str, data_format: DataFormat, on_bad_row: BadRowPolicy = "error", split: str = "train"
) -> tuple[list[dict], str]:
    """Load a Hugging Face Hub dataset split and validate its rows like a local file.

    Args:
        dataset_name: Hub id, e.g. ``databricks/databricks-dolly-15k``.
        data_format: ``"dolly"`` or ``"text"``.
        on_bad_row: see ``collect_rows``.
        split: the split to load.

    Returns:
        ``(rows, fingerprint)``; the fingerprint changes whenever the dataset's content does, and
        keys the tokenization cache.
    """
    load_dataset = hub_load_dataset()

    dataset = load_dataset(dataset_name, split=split)
    # ``_fingerprint`` is the datasets library's content hash (stable across processes for a given
    # download); fall back to the name plus its size and schema when a build lacks it.
    fingerprint = getattr(dataset, "_fingerprint", None) or f"{dataset_name}:{split}:{dataset.num_rows}"
    source = f"{dataset_name} (split {split!r})"
    records = ((Location(source, index=i), record) for i, record in enumerate(dataset))
    return collect_rows(records, data_format, on_bad_row, source=source), str(fingerprint)


def hub_load_dataset():
    """``datasets.load_dataset``, imported lazily (local files need no ``datasets``), or a clear error."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ConfigError(
            "loading data from the Hugging Face Hub (data.data_path: null) needs the 'datasets' package: "
            "pip install 'kangaroo_lit[data]', or pass a local file with --data.data_path"
        ) from err
    return load_dataset
