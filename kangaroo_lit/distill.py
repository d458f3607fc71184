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

import inspect
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

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
                 temperature: float, top_p: float, seed: int,
                 stop_ids: set[int] | None = None) -> list[tuple[str, int]]:
    """Generate one answer per prompt in one left-padded batch (finished rows leave the batch early).

    Args:
        stop_ids: the ids that end an answer (default: :func:`~kangaroo_lit.architectures.stop_token_ids`).

    Returns:
        ``(text, new_tokens)`` per prompt: the answer up to (not including) the first stop id.
    """
    from kangaroo_lit.architectures import stop_token_ids
    from kangaroo_lit.data.batch_generate import generate_batch

    stop_ids = set(stop_token_ids(tokenizer, model)) if stop_ids is None else stop_ids
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    generator = torch.Generator().manual_seed(seed)
    rows = generate_batch(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, stop_ids, temperature,
                          top_p, generator)
    answers = []
    for row in rows:
        ends = [i for i, tok in enumerate(row) if tok in stop_ids]
        if ends:
            row = row[: ends[0]]
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
    format: Literal["chat", "instruction"] = "chat",
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
        format: the prompt format (the same option as generate's and specbench's): chat (the tokenizer's
            chat template, as training with ``data.use_chat_template``; the instruction template when the
            tokenizer has none) or instruction (this project's training template).
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
    if format not in ("chat", "instruction"):
        raise ConfigError(f"format must be chat or instruction, got {format!r}")
    encoder = RowEncoder(tokenizer, max_length=2**31 - 1, use_chat_template=format == "chat")
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


REQUESTS_FILE = "requests.jsonl"
ANSWERS_FILE = "answers.jsonl"
MANIFEST_FILE = "manifest.json"
# Rounds in a row without one kept request after which self_instruct gives up (the model, or the settings,
# do not produce usable requests: better a clear error than a loop that never ends).
MAX_BARREN_ROUNDS = 20
# Requests pooled before answering (in batches): the shortest are answered together (less padding).
ANSWER_POOL_BATCHES = 4
# Settings that change which requests are written or how they are answered: a resume must match them.
_SELF_INSTRUCT_SETTINGS = ("base_model", "system", "categories", "temperature", "top_p", "batch_size",
                           "answer_max_new_tokens", "seed", "dtype")


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of ``path`` (plain or ``.gz``); a torn last line (an interrupted append) is dropped."""
    import gzip

    if not path.exists():
        return []
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    lines = [line for line in data.split(b"\n") if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            if number < len(lines):
                raise DataError(f"{path}, line {number}: not valid JSON ({err}); fix or remove it") from err
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` atomically (gzip with a fixed mtime when the name ends in ``.gz``)."""
    import gzip
    import os

    data = b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=9, mtime=0)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` atomically (beside, then renamed)."""
    import os

    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _restore(out_dir: Path, name: str) -> list[dict]:
    """The rows of ``name`` in ``out_dir``, taken from its ``.gz`` snapshot when that holds more.

    The plain file is the working copy (appended to, not committed); the snapshot is what a repository
    keeps, so a fresh clone resumes from it.
    """
    plain, packed = out_dir / name, out_dir / (name + ".gz")
    rows, snapshot = _read_jsonl(plain), _read_jsonl(packed)
    if len(snapshot) > len(rows):
        rows = snapshot
    _write_jsonl(plain, rows)  # drops a torn last line, so appends start on a clean line
    return rows


def self_instruct(
    base_model: str,
    out_dir: str,
    count: int,
    categories: list[str] | None = None,
    system: str = "",
    temperature: float = 1.0,
    top_p: float = 0.95,
    answer_max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    threads: int | None = None,
    dtype: str = "float32",
    snapshot_every: int = 100,
    duplicate_threshold: float = 0.7,
) -> int:
    """Write ``count`` instructions with the model itself and answer them with it (Magpie).

    Rounds of ``batch_size`` requests, each round one category (cycled): the model continues its chat
    template's opening of a user turn (the category's hint in the system prompt, one of its openings
    in the user turn) at ``temperature``/``top_p``; requests are filtered (:func:`reject_reason`) and
    de-duplicated against every kept one (exact and near, :class:`DuplicateIndex`); kept ones are
    answered greedily in batches, rendered exactly as training renders a row (the chat template).

    Files in ``out_dir``: ``requests.jsonl`` (every candidate with its status), ``answers.jsonl`` (Dolly
    rows, ``source_row`` = request id), their ``.gz`` snapshots every ``snapshot_every`` answers and at
    the end (the files to commit; train on ``answers.jsonl.gz``), ``manifest.json`` (the settings) and
    ``stats.json`` (rejections, diversity, throughput). Interrupted, it resumes: from the plain files, or
    from the snapshots on a fresh clone; a round cut in the middle is redone from its seed.

    Args:
        base_model: HF name, local directory or short name; a chat model (a base model works with the
            plain instruction template, with weaker requests).
        out_dir: the output directory (created; resumed when it holds a manifest).
        count: answered instructions to reach (a resumed run continues up to it).
        categories: names from ``self_instruct.CATEGORIES`` (default: all).
        system: the system prompt before each hint ("" = ``self_instruct.DEFAULT_SYSTEM``).
        temperature: sampling temperature of the requests.
        top_p: nucleus mass of the requests.
        answer_max_new_tokens: longest answer (greedy).
        batch_size: requests per round, and answers per batch.
        seed: base seed; round r samples with ``seed * 1_000_003 + r``.
        threads: torch CPU threads (default: the project's rule).
        dtype: model dtype.
        snapshot_every: answers between snapshots.
        duplicate_threshold: word-3-gram Jaccard similarity from which a request is a near duplicate.

    Returns:
        The number of answers written by this call.
    """
    import random
    import time

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from kangaroo_lit.architectures import load_base_model, stop_token_ids
    from kangaroo_lit.data.self_instruct import (
        CATEGORIES,
        DEFAULT_SYSTEM,
        DuplicateIndex,
        diversity,
        query_prefix,
        reject_reason,
    )
    from kangaroo_lit.data.tokenize import RowEncoder
    from kangaroo_lit.embedded import resolve_path
    from kangaroo_lit.threads import set_threads_for

    categories = list(categories or CATEGORIES)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ConfigError(f"unknown self-instruct categories {unknown}; allowed: {sorted(CATEGORIES)}")
    if count < 1 or batch_size < 1 or answer_max_new_tokens < 1 or snapshot_every < 1:
        raise ConfigError("count, batch_size, answer_max_new_tokens and snapshot_every must be >= 1")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0 to sample different requests, got {temperature}")
    system = system or DEFAULT_SYSTEM
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"base_model": base_model, "system": system, "categories": categories, "temperature": temperature,
                "top_p": top_p, "batch_size": batch_size, "answer_max_new_tokens": answer_max_new_tokens,
                "seed": seed, "dtype": dtype}
    manifest = out / MANIFEST_FILE
    if manifest.exists():
        try:
            before = json.loads(manifest.read_text())
        except ValueError as err:
            raise ConfigError(f"{manifest} is not a self_instruct manifest ({err}); fix or remove it") from None
        changed = [k for k in _SELF_INSTRUCT_SETTINGS if before.get(k) != settings[k]]
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise ConfigError(f"{out} was written with other settings ({diff}); "
                              "use another out_dir or the same settings")

    path = resolve_path(base_model)
    set_threads_for(path, threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_base_model(path, dtype)
    if not manifest.exists():  # only once the model loads: a mistyped model name leaves nothing behind
        _write_json(manifest, settings)
    encoder = RowEncoder(tokenizer, max_length=2**31 - 1, use_chat_template=True)
    add_special = not encoder.use_chat_template
    stop_ids = set(stop_token_ids(tokenizer, model))

    # Resume: complete rounds only (a round's candidates are appended in one write, but be safe); the
    # next round is the first one not complete, redone from its own seed.
    requests = _restore(out, REQUESTS_FILE)
    per_round = Counter(r["id"] // batch_size for r in requests)
    requests = [r for r in requests if per_round[r["id"] // batch_size] == batch_size]
    _write_jsonl(out / REQUESTS_FILE, requests)
    # The working copy also holds the requests answered with nothing (response ""), so that a resume does
    # not answer them again; the snapshot (the training file) leaves them out.
    rows = _restore(out, ANSWERS_FILE)
    answers = [a for a in rows if a["response"]]
    empty = [a for a in rows if not a["response"]]
    answered = {a["source_row"] for a in rows}
    index = DuplicateIndex(duplicate_threshold)
    pending = []
    for r in requests:
        if r["status"] == "kept":
            index.add(r["instruction"])
            if r["id"] not in answered:
                pending.append(r)
    next_round = max((r["id"] // batch_size for r in requests), default=-1) + 1
    barren_rounds = 0  # rounds in a row that kept no request
    reasons = Counter(r["status"] for r in requests)
    written = 0
    generator = {"base_model": base_model, "temperature": 0.0, "max_new_tokens": answer_max_new_tokens,
                 "requests": {"temperature": temperature, "top_p": top_p, "seed": seed}}
    start_time, new_tokens = time.perf_counter(), 0

    def snapshot() -> None:
        _write_jsonl(out / (REQUESTS_FILE + ".gz"), requests)
        _write_jsonl(out / (ANSWERS_FILE + ".gz"), answers)
        kept = [r for r in requests if r["status"] == "kept"]
        elapsed = time.perf_counter() - start_time
        stats = {"answers": len(answers), "empty_answers": len(empty), "candidates": len(requests),
                 "status": dict(sorted(reasons.items())),
                 "requests": diversity([r["instruction"] for r in kept], [r["category"] for r in kept]),
                 "answer_tokens": sum(a["new_tokens"] for a in answers),
                 "this_run": {"seconds": round(elapsed, 1), "answers": written,
                              "answer_tokens_per_s": round(new_tokens / elapsed, 2) if elapsed else None}}
        _write_json(out / "stats.json", stats)

    last_snapshot = len(answers)
    with (out / REQUESTS_FILE).open("a") as req_file, (out / ANSWERS_FILE).open("a") as ans_file, \
            tqdm(total=count, initial=min(len(answers), count), desc="self-instruct", unit="answer",
                 file=sys.stderr) as bar:
        while len(answers) < count:
            # Keep a pool of several batches of requests and answer the shortest together: a batch is
            # left-padded to its longest prompt, and padding cost most of the time when one round's
            # prompts (86 tokens on average, up to 280) shared a batch.
            if len(pending) < ANSWER_POOL_BATCHES * batch_size and len(answers) + len(pending) < count:
                category = CATEGORIES[categories[next_round % len(categories)]]
                rng = random.Random(seed * 1_000_003 + next_round)
                hint = f"{system} {category.hint}".strip()
                openings = [rng.choice(category.openings) for _ in range(batch_size)]
                prefixes = [query_prefix(tokenizer, hint, opening) for opening in openings]
                chat = prefixes[0][1]
                texts = answer_batch(model, tokenizer, [p for p, _ in prefixes], not chat, category.max_new_tokens,
                                     temperature, top_p, seed * 1_000_003 + next_round)
                lines = []
                for j, (opening, (text, n_new)) in enumerate(zip(openings, texts)):
                    # An opening is part of the request; the model's text continues it.
                    joined = opening + text if not opening or text[:1] in ",.:;!?" else f"{opening} {text}"
                    instruction = joined.strip()
                    cut_off = n_new >= category.max_new_tokens
                    status = reject_reason(instruction, cut_off) or index.duplicate_of(instruction)
                    row = {"id": next_round * batch_size + j, "category": category.name, "opening": opening,
                           "instruction": instruction, "status": status or "kept", "new_tokens": n_new}
                    if status is None:
                        index.add(instruction)
                        pending.append(row)
                    reasons[row["status"]] += 1
                    lines.append(row)
                requests.extend(lines)
                req_file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
                req_file.flush()
                next_round += 1
                barren_rounds = 0 if any(r["status"] == "kept" for r in lines) else barren_rounds + 1
                if barren_rounds >= MAX_BARREN_ROUNDS:
                    counts = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
                    raise ConfigError(f"{MAX_BARREN_ROUNDS} rounds in a row kept no request ({counts}); the model "
                                      "does not write usable requests with these settings (a chat model, other "
                                      "--categories or --temperature)")
                bar.set_postfix(kept=f"{reasons['kept']}/{len(requests)}", round=next_round)
                continue
            pending.sort(key=lambda r: len(r["instruction"]))
            batch = pending[: min(batch_size, count - len(answers))]
            pending = pending[len(batch):]
            prompts = [encoder.render({"instruction": r["instruction"], "context": "", "response": ""})[0]
                       for r in batch]
            replies = answer_batch(model, tokenizer, prompts, add_special, answer_max_new_tokens, 0.0, 1.0, seed,
                                   stop_ids)
            rows = []
            for r, (text, n_new) in zip(batch, replies):
                rows.append({"instruction": r["instruction"], "context": "", "response": text,
                             "category": r["category"], "source_row": r["id"], "sample": 0, "new_tokens": n_new,
                             "hit_max_new_tokens": n_new >= answer_max_new_tokens, "generator": generator})
                new_tokens += n_new
            ans_file.write("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in rows))
            ans_file.flush()
            # An empty answer teaches nothing (the row validator would refuse it too): kept apart.
            empty.extend(a for a in rows if not a["response"])
            rows = [a for a in rows if a["response"]]
            answers.extend(rows)
            written += len(rows)
            bar.update(len(rows))
            elapsed = time.perf_counter() - start_time
            bar.set_postfix(kept=f"{reasons['kept']}/{len(requests)}", tok_s=f"{new_tokens / elapsed:.1f}")
            if len(answers) - last_snapshot >= snapshot_every:
                snapshot()
                last_snapshot = len(answers)
    snapshot()
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
    from kangaroo_lit import cli_scaffold

    config = cli_scaffold.parse(cli_scaffold.build_parser(distill, "kangaroo-lit distill"), argv)

    def run() -> None:
        written = distill(**config)
        print(f"wrote {written} rows to {config['out_path']}; train on them with --data.data_path "
              f"{config['out_path']}", file=sys.stderr)

    return cli_scaffold.run_reporting(run)


def main_self_instruct(argv: list[str] | None = None) -> int:
    """``kangaroo-lit self_instruct``: instructions written and answered by the model (``--help``)."""
    from kangaroo_lit import cli_scaffold

    parser = cli_scaffold.build_parser(self_instruct, "kangaroo-lit self_instruct",
                                       description=inspect.getdoc(self_instruct).split("\n\nArgs:")[0])
    config = cli_scaffold.parse(parser, argv)

    def run() -> None:
        written = self_instruct(**config)
        out = Path(config["out_dir"])
        print(f"wrote {written} answers to {out / ANSWERS_FILE} (snapshot {out / (ANSWERS_FILE + '.gz')}, "
              f"statistics {out / 'stats.json'}); train on them with --data.data_path "
              f"{out / (ANSWERS_FILE + '.gz')}", file=sys.stderr)

    return cli_scaffold.run_reporting(run)
