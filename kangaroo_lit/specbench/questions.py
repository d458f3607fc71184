"""Spec-Bench's question file: ``{"question_id": int, "category": str, "turns": [str, ...]}`` per line.

Spec-Bench has six subtasks. Five are a ``category`` value of their own; the sixth, ``mt_bench``, has no
category of that name: its questions keep MT-Bench's eight original categories (``writing``,
``roleplay``, ...) and have two turns each, the second asked after the model's own first answer
(``../shared/data/README.md``). Spec-Bench's ``evaluation/speed.py`` maps them the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kangaroo_lit.errors import ConfigError, DataError, DataFileNotFound

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SUBTASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


def subtask_of(category: str) -> str | None:
    """The Spec-Bench subtask of a question ``category`` (None: not one of Spec-Bench's)."""
    if category in MT_BENCH_CATEGORIES:
        return "mt_bench"
    return category if category in SUBTASKS else None


@dataclass(frozen=True)
class Question:
    """One question of the file.

    Attributes:
        question_id: Spec-Bench's id (81-560 in the real file), unique in the file.
        category: the ``category`` field as written (an MT-Bench category for ``mt_bench`` questions).
        turns: the user's messages; turn ``i > 0`` follows the model's own answer to turn ``i - 1``.
        line: the 1-based line of the file it came from (for messages).
    """

    question_id: int
    category: str
    turns: tuple[str, ...]
    line: int = 0

    @property
    def subtask(self) -> str:
        return subtask_of(self.category) or self.category


def parse_question(record: object, where: str, line: int = 0) -> Question:
    """One parsed JSON line as a :class:`Question`.

    Raises:
        DataError: naming ``where`` (``file:line``) and the field that is missing or malformed.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with question_id, category and turns, got "
                        f"{type(record).__name__}")
    for key in ("question_id", "category", "turns"):
        if key not in record:
            raise DataError(f"{where}: field '{key}' is missing (fields: {sorted(record)})")
    qid, category, turns = record["question_id"], record["category"], record["turns"]
    if not isinstance(qid, int) or isinstance(qid, bool):
        raise DataError(f"{where}: field 'question_id' must be an integer, got {qid!r}")
    if not isinstance(category, str):
        raise DataError(f"{where}: field 'category' must be a string, got {category!r}")
    if subtask_of(category) is None:
        raise DataError(f"{where}: category {category!r} belongs to no Spec-Bench subtask; allowed: "
                        f"{', '.join(SUBTASKS[1:])} and MT-Bench's {', '.join(MT_BENCH_CATEGORIES)}")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise DataError(f"{where}: field 'turns' must be a non-empty list of non-empty strings, got "
                        f"{json.dumps(turns)[:120]}")
    return Question(question_id=qid, category=category, turns=tuple(turns), line=line)


def load_questions(path: str | Path) -> list[Question]:
    """Every question of a Spec-Bench question file, in file order.

    Raises:
        DataFileNotFound: the file does not exist.
        DataError: with the file and line of a line that is not JSON, lacks a field, has a malformed one,
            or repeats a ``question_id``; or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"question file {path} does not exist (pass Spec-Bench's question.jsonl with "
                               "--question_file)")
    questions: list[Question] = []
    seen: dict[int, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            question = parse_question(record, where, lineno)
            if question.question_id in seen:
                raise DataError(f"{where}: question_id {question.question_id} repeats the one on line "
                                f"{seen[question.question_id]}")
            seen[question.question_id] = lineno
            questions.append(question)
    if not questions:
        raise DataError(f"question file {path} holds no question")
    return questions


def select_questions(questions: Sequence[Question], subtasks: Sequence[str] | None = None,
                     limit: int | None = None) -> list[Question]:
    """The questions of ``subtasks`` (default all six), the first ``limit`` of each, in file order.

    Raises:
        ConfigError: an unknown subtask name or a ``limit`` below 1.
        DataError: nothing is left to run.
    """
    wanted = list(SUBTASKS if not subtasks else subtasks)
    unknown = [s for s in wanted if s not in SUBTASKS]
    if unknown:
        raise ConfigError(f"--subtasks: unknown subtask(s) {', '.join(map(repr, unknown))}; allowed: "
                          f"{', '.join(SUBTASKS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1 (questions per subtask), got {limit}")
    taken = {s: 0 for s in wanted}
    out = []
    for q in questions:
        if q.subtask in taken and (limit is None or taken[q.subtask] < limit):
            taken[q.subtask] += 1
            out.append(q)
    if not out:
        raise DataError(f"the question file holds no question of subtask(s) {', '.join(wanted)}")
    return out
