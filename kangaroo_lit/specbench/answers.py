"""Spec-Bench answer files: one JSON line per question, appended and flushed as each question finishes.

A line (DESIGN §4; what Spec-Bench's ``evaluation/eval.py`` writes and ``evaluation/speed.py`` reads)::

    {"question_id": 81, "category": "writing", "answer_id": "...", "model_id": "...",
     "choices": [{"index": 0, "turns": [text, ...], "decoding_steps": [...], "new_tokens": [...],
                  "wall_time": [...], "accept_lengths": [...]}],
     "tstamp": 1700000000.0}

``turns``, ``decoding_steps``, ``new_tokens`` and ``wall_time`` hold one entry per turn and
``accept_lengths`` one flat list over all turns. ``speed.py`` reads ``category``, ``choices[0]``'s
``new_tokens``, ``wall_time``, ``accept_lengths`` and (of the baseline) ``turns``. This project adds, in
``choices[0]``: ``token_ids`` (per turn: compared with the vanilla loop's), ``prompt_tokens`` and
``prompt_cut`` (per turn: tokens fed, tokens cut from the left), ``drafted`` and ``accepted`` (per turn;
null where the method cannot tell) and, for HF's early exit, ``draft_passes``.

Resume: an interrupted run leaves whole lines plus at most one truncated last line (a line is written
in one call and flushed). :func:`read_answers` drops that line from the file, so its question is redone;
:func:`reorder` sorts the file by question order at the end, as Spec-Bench's ``reorg_answer_file`` does,
so a resumed run leaves the same files as an uninterrupted one (timings aside).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kangaroo_lit.errors import DataError
from kangaroo_lit.specbench.methods import TurnResult
from kangaroo_lit.specbench.questions import Question

FIELDS = ("question_id", "category", "answer_id", "model_id", "choices", "tstamp")
CHOICE_FIELDS = ("index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths")


def answer_path(out_dir: str | Path, run: int, method: str) -> Path:
    """``<out_dir>/run_<run>/<method>.jsonl`` (runs count from 1, as Spec-Bench's ``..._run_1`` folders)."""
    return Path(out_dir) / f"run_{run}" / f"{method}.jsonl"


def answer_id(model_id: str, question_id: int, run: int) -> str:
    """A stable id (Spec-Bench draws a random one): the same answer gets the same id when redone."""
    return hashlib.sha1(f"{model_id}/{run}/{question_id}".encode()).hexdigest()[:22]


def make_record(question: Question, model_id: str, run: int, texts: Sequence[str], results: Sequence[TurnResult],
                prompt_tokens: Sequence[int], prompt_cut: Sequence[int]) -> dict[str, Any]:
    """The answer line of one question (all its turns) for one method."""
    choice = {
        "index": 0,
        "turns": list(texts),
        "decoding_steps": [r.decoding_steps for r in results],
        "new_tokens": [len(r.tokens) for r in results],
        "wall_time": [r.wall_time for r in results],
        "accept_lengths": [n for r in results for n in r.accept_lengths],
        "token_ids": [r.tokens for r in results],
        "prompt_tokens": list(prompt_tokens),
        "prompt_cut": list(prompt_cut),
        "drafted": [r.drafted for r in results],
        "accepted": [r.accepted for r in results],
    }
    if any(r.draft_passes is not None for r in results):
        choice["draft_passes"] = [r.draft_passes for r in results]
    if any(r.round_drafted for r in results):
        choice["round_drafted"] = [r.round_drafted for r in results]
    return {
        "question_id": question.question_id,
        "category": question.category,
        "answer_id": answer_id(model_id, question.question_id, run),
        "model_id": model_id,
        "choices": [choice],
        "tstamp": time.time(),
    }


def append_answer(path: Path, record: dict[str, Any]) -> None:
    """Append one line in one write, flushed and synced, so an interruption leaves whole lines only
    (or one truncated last line, which :func:`read_answers` drops)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_answers(path: Path, repair: bool = True) -> dict[int, dict[str, Any]]:
    """``{question_id: record}`` of an answer file (missing: empty).

    An unfinished last line (no newline at its end, or not JSON) is what an interrupted write leaves:
    it is dropped, and with ``repair`` cut from the file so that appending continues cleanly.

    Raises:
        DataError: a malformed line *before* the last one (the file was not left so by an interruption),
            naming the file and line.
    """
    if not path.is_file():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    good_end = 0
    records: dict[int, dict[str, Any]] = {}
    for lineno, raw in enumerate(lines, start=1):
        last = lineno == len(lines)  # the text after the final newline (empty when the file ends cleanly)
        if not raw.strip():
            if not last:
                good_end += len(raw) + 1
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("question_id"), int):
                raise ValueError("not an answer line")
        except ValueError as err:
            if last or lineno == len(lines) - 1 and not lines[-1]:
                # the unfinished line of an interrupted write: drop it, redo its question
                break
            raise DataError(f"{path}:{lineno}: not an answer line ({err}); move the file away to redo its "
                            "questions") from None
        if last:
            break  # complete JSON but no newline: the write was interrupted before its end
        records[record["question_id"]] = record
        good_end += len(raw) + 1
    if repair and good_end < len(data):
        with path.open("r+b") as f:
            f.truncate(good_end)
    return records


def reorder(path: Path, order: Sequence[int]) -> None:
    """Rewrite an answer file with one line per question, in ``order`` (ids not in it keep file order, after).

    Written to a temporary file and renamed, so the file is never half written.
    """
    records = read_answers(path)
    if not records:
        return
    rank = {qid: i for i, qid in enumerate(order)}
    position = {qid: i for i, qid in enumerate(records)}
    ids = sorted(records, key=lambda q: (rank.get(q, len(rank)), position[q]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(records[q]) + "\n" for q in ids), encoding="utf-8")
    os.replace(tmp, path)
