"""Prompt files for ``predict`` and ``generate``: what to decode, without responses.

Accepted formats:

* ``.txt``: one prompt per non-empty line, used as is (``\\n`` escapes are not interpreted).
* ``.jsonl`` / ``.json`` (JSON lines or a list): objects with either ``prompt`` (raw text, used as is)
  or ``instruction`` (+ optional ``context``), rendered with the training template so a fine-tuned
  model sees the prompts it was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from kangaroo_lit.errors import DataError, DataFileNotFound


def _record_prompt(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt' or 'instruction', got {type(record).__name__}")
    if isinstance(record.get("prompt"), str):
        return {"raw": record["prompt"]}
    if isinstance(record.get("instruction"), str):
        context = record.get("context", "")
        if context is not None and not isinstance(context, str):
            raise DataError(f"{where}: field 'context' must be a string, got {type(context).__name__}")
        return {"instruction": record["instruction"], "context": context or ""}
    raise DataError(f"{where}: needs a string field 'prompt' or 'instruction' (fields: {sorted(record)})")


def load_prompt_entries(path: str | Path) -> list[tuple[str, dict]]:
    """Like :func:`load_prompts`, each entry with where it comes from: ``"<path>:<line>"`` (``.txt``,
    JSON lines) or ``"<path>: element <i>"`` (a JSON list), for messages about one prompt.

    Raises:
        DataFileNotFound: the file does not exist.
        DataError: naming the file and line (or element) of a malformed entry, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"prompt file {path} does not exist")
    prompts: list[tuple[str, dict]] = []
    text = path.read_text()
    if path.suffix == ".txt":
        prompts = [(f"{path}:{lineno}", {"raw": line}) for lineno, line in enumerate(text.splitlines(), start=1)
                   if line.strip()]
    elif text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        for i, record in enumerate(records):
            where = f"{path}: element {i}"
            prompts.append((where, _record_prompt(record, where)))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            prompts.append((f"{path}:{lineno}", _record_prompt(record, f"{path}:{lineno}")))
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompt")
    return prompts


def load_prompts(path: str | Path) -> list[dict]:
    """Read a prompt file into ``[{"raw": text} | {"instruction": ..., "context": ...}]``.

    Raises:
        DataFileNotFound: the file does not exist.
        DataError: naming the file and line (or element) of a malformed entry, or an empty file.
    """
    return [entry for _, entry in load_prompt_entries(path)]


def check_prompt_lengths(prompts: Iterable[tuple[str, int]], max_new_tokens: int, context_length: int | None,
                         option: str = "--max_new_tokens") -> None:
    """Refuse, before anything is decoded, a prompt that is empty or leaves no room for ``max_new_tokens``.

    Args:
        prompts: ``(where, prompt tokens)`` for every prompt (``where`` as :func:`load_prompt_entries`).
        context_length: the model's ``max_position_embeddings`` (None: no limit known).
        option: how the user sets ``max_new_tokens``, for the message.

    Raises:
        DataError: naming the first such prompt's file and line, its length, ``max_new_tokens`` and the
            context length (and where the others are, if several are too long).
    """
    prompts = list(prompts)
    for where, length in prompts:
        if length < 1:
            raise DataError(f"{where}: the prompt holds no token; nothing was decoded")
    if context_length is None:
        return
    too_long = [(where, length) for where, length in prompts if length + max_new_tokens > context_length]
    if not too_long:
        return
    where, length = too_long[0]
    others = ""
    if len(too_long) > 1:
        shown = ", ".join(w for w, _ in too_long[1:6]) + (", ..." if len(too_long) > 6 else "")
        others = f" ({len(too_long) - 1} more too long: {shown})"
    raise DataError(
        f"{where}: prompt of {length} tokens + {option} {max_new_tokens} = {length + max_new_tokens} exceeds the "
        f"model's context length (max_position_embeddings {context_length}){others}; nothing was decoded: "
        f"shorten the prompt or lower {option}"
    )


def render_prompt(entry: dict, tokenizer, use_chat_template: bool = False) -> str:
    """The text to feed the model for one entry of :func:`load_prompts`."""
    if "raw" in entry:
        return entry["raw"]
    from kangaroo_lit.data.tokenize import RowEncoder

    encoder = RowEncoder(tokenizer, max_length=2**31 - 1, use_chat_template=use_chat_template)
    prompt, _ = encoder.render({"instruction": entry["instruction"], "context": entry["context"], "response": ""})
    return prompt
