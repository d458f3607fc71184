"""Self-distilled training data: the base model answers the instructions itself (``kangaroo-lit distill``).

A draft learns to predict what the verifier will actually say, so training it on the model's own
answers rather than human ones is what matters (Medusa-2 and EAGLE report it). Each Dolly row is
rendered exactly as training renders it (:class:`~kangaroo_lit.data.tokenize.RowEncoder`: the chat
template when asked), answered by the model (greedy, or sampled at a temperature, several samples per
row), and written back as a Dolly row whose ``response`` is the model's answer.

Rows are generated in left-padded batches and appended to the output one batch at a time (flushed), so
an interrupted run resumes where it stopped: finished ``(source_row, sample)`` pairs are skipped and a
truncated last line is dropped and redone. Once every row is answered the file is rewritten in source
order (by ``(source_row, sample)``, atomically), so a data split by row position holds out the same
instructions in the distilled file as in the source file. Never distill on an evaluation set (Spec-Bench's questions
are the test set).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from kangaroo_lit.errors import ConfigError, DataError


def finished_pairs(out_path: Path) -> set[tuple[int, int]]:
    """``(source_row, sample)`` pairs already in ``out_path``; a truncated last line is cut off the file."""
    done: set[tuple[int, int]] = set()
    if not out_path.exists():
        return done
    lines = out_path.read_bytes().split(b"\n")
    good = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.add((int(row["source_row"]), int(row["sample"])))
            good.append(line)
        except (ValueError, KeyError, TypeError) as err:
            if number < len(lines) - 1:  # only the last line may be torn by an interruption
                raise DataError(f"{out_path}, line {number}: not a distilled row ({err}); fix or remove it") from err
    out_path.write_bytes(b"".join(line + b"\n" for line in good))
    return done


def answer_batch(model, tokenizer, prompts: list[str], add_special_tokens: bool, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int) -> list[tuple[str, int]]:
    """Generate one answer per prompt in one left-padded batch.

    Returns:
        ``(text, new_tokens)`` per prompt: the answer up to (not including) the first EOS.
    """
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    answers = []
    eos = tokenizer.eos_token_id
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        if eos in row:
            row = row[: row.index(eos)]
        answers.append((tokenizer.decode(row, skip_special_tokens=True).strip(), len(row)))
    return answers


def distill(
    base_model: str,
    data_path: str,
    out_path: str,
    samples_per_row: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    max_prompt_tokens: int = 768,
    batch_size: int = 8,
    use_chat_template: bool = True,
    max_rows: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    dtype: str = "float32",
) -> int:
    """Answer every Dolly row of ``data_path`` with the model itself and write Dolly rows to ``out_path``.

    Args:
        base_model: HF name, local directory or short name (``model:<name>``, ``embedded:<name>``).
        data_path: Dolly rows (JSONL/JSON): instruction, context, response, category.
        out_path: the output JSONL; appended to and resumed if it exists.
        samples_per_row: answers per row (more rows from few instructions; use a temperature > 0).
        temperature: 0 = greedy; else sampled (with ``top_p``).
        top_p: nucleus sampling mass.
        max_new_tokens: longest answer; an answer cut there keeps its text (no EOS target then).
        max_prompt_tokens: rows whose prompt is longer are skipped (counted).
        batch_size: prompts generated together (left-padded).
        use_chat_template: render rows with the tokenizer's chat template, as training does.
        max_rows: only the first rows (quick runs).
        seed: base seed; each batch is seeded from it and the batch's first (row, sample).
        threads: torch CPU threads (default: 1 for models under 20M parameters, else every core).
        dtype: model dtype.

    Returns:
        The number of rows written by this call.
    """
    from tqdm import tqdm

    from kangaroo_lit.architectures import load_base_model
    from kangaroo_lit.data.rows import load_file_rows
    from kangaroo_lit.data.tokenize import RowEncoder
    from kangaroo_lit.embedded import resolve_path

    if samples_per_row < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ConfigError("samples_per_row, batch_size and max_new_tokens must be >= 1")
    if samples_per_row > 1 and temperature == 0:
        raise ConfigError("samples_per_row > 1 with temperature 0 repeats one greedy answer; set --temperature > 0")
    from transformers import AutoTokenizer

    from kangaroo_lit.threads import set_threads_for

    path = resolve_path(base_model)
    set_threads_for(path, threads)  # the project's rule (1 thread for tiny models), as fit and generate
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:  # Llama's tokenizers have none: pad with EOS (masked anyway)
        tokenizer.pad_token = tokenizer.eos_token
    model = load_base_model(path, dtype)
    encoder = RowEncoder(tokenizer, max_length=2**31 - 1, use_chat_template=use_chat_template)
    add_special = not encoder.use_chat_template

    rows = load_file_rows(resolve_path(data_path), "dolly", "error")
    if max_rows is not None:
        rows = rows[:max_rows]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = finished_pairs(out)
    todo, skipped = [], 0
    for index, row in enumerate(rows):
        prompt = encoder.render({**row, "response": ""})[0]
        length = len(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
        if length > max_prompt_tokens:
            skipped += 1
            continue
        todo.extend((length, index, s, prompt) for s in range(samples_per_row) if (index, s) not in done)
    if skipped:
        print(f"skipped {skipped} rows with prompts over {max_prompt_tokens} tokens", file=sys.stderr)
    # Longest prompts first: similar lengths share a batch, so left padding wastes little.
    todo = [(index, s, prompt) for _, index, s, prompt in sorted(todo, key=lambda t: (-t[0], t[1], t[2]))]
    written = 0
    generator: dict[str, Any] = {"base_model": base_model, "temperature": temperature, "top_p": top_p,
                                 "max_new_tokens": max_new_tokens, "seed": seed}
    with out.open("a") as f, tqdm(total=len(todo), desc="distill", unit="answer", file=sys.stderr) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            first_row, first_sample = batch[0][0], batch[0][1]
            answers = answer_batch(model, tokenizer, [p for _, _, p in batch], add_special, max_new_tokens,
                                   temperature, top_p, seed * 1_000_003 + first_row * 101 + first_sample)
            for (index, sample, _), (text, n_new) in zip(batch, answers):
                row = rows[index]
                f.write(json.dumps({
                    "instruction": row["instruction"], "context": row.get("context", ""), "response": text,
                    "category": row.get("category", ""), "source_row": index, "sample": sample,
                    "new_tokens": n_new, "hit_max_new_tokens": n_new >= max_new_tokens, "generator": generator,
                }) + "\n")
            f.flush()
            written += len(batch)
            bar.update(len(batch))
    sort_by_source_row(out)
    return written


def sort_by_source_row(out_path: Path) -> None:
    """Rewrite ``out_path`` ordered by ``(source_row, sample)`` (write beside, fsync, rename: never half-written)."""
    import os

    lines = [line for line in out_path.read_bytes().split(b"\n") if line.strip()]
    keyed = sorted(lines, key=lambda line: (lambda r: (int(r["source_row"]), int(r["sample"])))(json.loads(line)))
    tmp = out_path.with_name(out_path.name + ".partial")
    with tmp.open("wb") as f:
        f.write(b"".join(line + b"\n" for line in keyed))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)


def main(argv: list[str] | None = None) -> int:
    """``kangaroo-lit distill``: self-distilled Dolly rows (``--help`` lists the options)."""
    import jsonargparse

    from kangaroo_lit.errors import KangarooError

    try:
        written = jsonargparse.CLI(distill, args=argv, as_positional=False)
    except KangarooError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written} rows", file=sys.stderr)
    return 0
