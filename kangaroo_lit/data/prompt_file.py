"""Prompt files for ``predict`` and ``generate``: what to decode, without responses.

Accepted formats:

* ``.txt``: one prompt per non-empty line, used as is (``\\n`` escapes are not interpreted).
* ``.jsonl`` / ``.json`` (JSON lines or a list): objects with either ``prompt`` (raw text, used as is)
  or ``instruction`` (+ optional ``context``), rendered with the training template so a fine-tuned
  model sees the prompts it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path


def _record_prompt(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with 'prompt' or 'instruction', got {type(record).__name__}")
    if isinstance(record.get("prompt"), str):
        return {"raw": record["prompt"]}
    if isinstance(record.get("instruction"), str):
        context = record.get("context", "")
        if context is not None and not isinstance(context, str):
            raise ValueError(f"{where}: field 'context' must be a string, got {type(context).__name__}")
        return {"instruction": record["instruction"], "context": context or ""}
    raise ValueError(f"{where}: needs a string field 'prompt' or 'instruction' (fields: {sorted(record)})")


def load_prompts(path: str | Path) -> list[dict]:
    """Read a prompt file into ``[{"raw": text} | {"instruction": ..., "context": ...}]``.

    Raises:
        ValueError: naming the file and line (or element) of a malformed entry, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts: list[dict] = []
    if path.suffix == ".txt":
        prompts = [{"raw": line.rstrip("\n")} for line in path.read_text().splitlines() if line.strip()]
    else:
        text = path.read_text()
        if text.lstrip().startswith("["):
            for i, record in enumerate(json.loads(text)):
                prompts.append(_record_prompt(record, f"{path}: element {i}"))
        else:
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                prompts.append(_record_prompt(record, f"{path}:{lineno}"))
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt")
    return prompts


def render_prompt(entry: dict, tokenizer, use_chat_template: bool = False) -> str:
    """The text to feed the model for one entry of :func:`load_prompts`."""
    if "raw" in entry:
        return entry["raw"]
    from kangaroo_lit.data.tokenize import RowEncoder

    encoder = RowEncoder(tokenizer, max_length=2**31 - 1, use_chat_template=use_chat_template)
    prompt, _ = encoder.render({"instruction": entry["instruction"], "context": entry["context"], "response": ""})
    return prompt
