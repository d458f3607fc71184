"""``kangaroo-lit specbench``: Spec-Bench (DESIGN §4) for the self-speculative draft and its peers.

    kangaroo-lit specbench --limit 1 --max_new_tokens 24                  # the embedded model, untrained exit
    kangaroo-lit specbench --artifact runs/tiny/artifact --format instruction --limit 10 --max_new_tokens 128
    kangaroo-lit specbench --base_model lmsys/vicuna-7b-v1.3 --exit_layer 1 --dtype float16 --runs 3 \\
        --question_file data/spec_bench/question.jsonl --out_dir runs/specbench-vicuna
    kangaroo-lit specbench --config specbench.yaml --subtasks '[qa,rag]'  # a later flag wins

Every question of the chosen subtasks (``--limit N``: the first N of each) is decoded, in one process and
interleaved per question, by the vanilla loop (the baseline), HF ``generate``, HF prompt lookup
decoding, HF's ``assistant_early_exit`` and the self-speculative decoder: with the trained draft of
``--artifact`` (``kangaroo``), or, without one, with an untrained adapter at ``--exit_layer`` on
``--base_model`` (``early_exit``; default the embedded tiny model at exit layer 1). MT-Bench's
questions have two turns; each method answers the second after its own first answer.

Written under ``--out_dir``: ``run_<k>/<method>.jsonl`` (Spec-Bench answer files, one line per question,
appended as each finishes: an interrupted run resumes where it stopped), ``summary.json`` (per subtask
and overall: speedup, MAT, acceptance rate, tokens/s, the vanilla loop's tokens/s, the fraction of
outputs identical to the vanilla loop's), ``summary.md`` (the tables) and ``summary.png`` (speedup and
MAT per subtask; needs matplotlib).

The arguments are the parameters of :func:`specbench` (jsonargparse, LightningCLI's underscore style):
any of them may come from ``--config FILE``; ``--print_config`` prints them as YAML and exits.
"""

from __future__ import annotations

from typing import Any, Literal

from kangaroo_lit import cli_scaffold

PROG = "kangaroo-lit specbench"
DEFAULT_QUESTIONS = "../shared/data/spec_bench_question.jsonl"


def specbench(
    question_file: str = DEFAULT_QUESTIONS,
    artifact: str | None = None,
    base_model: str | None = None,
    exit_layer: int | None = None,
    format: Literal["auto", "chat", "vicuna", "instruction"] = "auto",
    subtasks: list[str] | None = None,
    limit: int | None = None,
    turns: int | None = None,
    methods: list[str] | None = None,
    max_new_tokens: int = 1024,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    threshold: float | None = None,
    max_draft: int | None = None,
    pld_num_tokens: int = 10,
    pld_ngram_size: int = 3,
    prompt_lookup: int = 7,
    skip_below: float | None = None,
    tree_width: int = 4,
    tree_nodes: int = 7,
    tree_depth: int = 6,
    cost_model: str | None = None,
    lookup_window: Literal["cost", "fixed"] = "cost",
    kernel: Literal["eager", "streaming"] = "eager",
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32",
    device: str = "auto",
    runs: int = 1,
    warmup: int = 1,
    threads: int | None = None,
    out_dir: str = "runs/specbench",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run Spec-Bench; returns the summary (also written to ``out_dir``).

    Args:
        question_file: Spec-Bench question file (JSON lines: question_id, category, turns).
        artifact: directory written by ``kangaroo-lit export``: its trained draft is the ``kangaroo`` method.
        base_model: HF name or local path. Without --artifact: the model, decoded with an untrained adapter at
            --exit_layer (default embedded:tiny-llama); with --artifact: overrides the base it records.
        exit_layer: exit layer L without --artifact (default 1; an artifact records its own).
        format: the prompt format (the same option as generate's and distill's): auto (the tokenizer's chat
            template, else vicuna), chat, vicuna (Spec-Bench's Vicuna template) or instruction (this project's
            training template, the embedded model's).
        subtasks: some of mt_bench, translation, summarization, qa, math_reasoning, rag (default all).
        limit: the first N questions of each subtask (default all 80).
        turns: answer only the first N turns of each question (MT-Bench has two; default all).
        methods: some of vanilla, generate, pld, pld7 (HF prompt lookup at 7 tokens), hf_early_exit, lookup
            (prompt lookup alone in this project's decoder), kangaroo, kangaroo_lookup, kangaroo_tree,
            kangaroo_tree_lookup (tree drafts), early_exit (default all that apply but pld7 and the tree methods;
            vanilla always runs: it is the baseline).
        max_new_tokens: most tokens per answer (Spec-Bench: 1024); prompts longer than the context minus this are
            cut from the left and counted.
        temperature: 0 = greedy (Spec-Bench's setting), else sampling at this temperature (outputs are then not
            compared token by token).
        top_p: nucleus sampling (sampling only; 1 = off).
        top_k: top-k sampling (sampling only; 0 = off).
        seed: sampling seed (each question and turn gets its own seed derived from it, the same for every method).
        threshold: draft confidence threshold of the self-speculative decoder and HF's early exit (default the
            artifact's recorded decoding setting, else 0.6).
        max_draft: most drafts per round, likewise (default the artifact's, else 6).
        pld_num_tokens: prompt lookup: tokens proposed per round (prompt_lookup_num_tokens; Spec-Bench: 10).
        pld_ngram_size: prompt lookup: longest n-gram matched (max_matching_ngram_size; Spec-Bench: 3).
        prompt_lookup: lookup and kangaroo_lookup: most tokens a round copies from a prompt n-gram match.
        skip_below: kangaroo, kangaroo_lookup, early_exit: a round whose first draft's confidence is below this
            verifies no draft (a plain step); 0 = off (default the artifact's recorded sizing, else 0).
        tree_width: kangaroo_tree, kangaroo_tree_lookup: candidates per expanded node and nodes expanded per level.
        tree_nodes: kangaroo_tree(_lookup): most nodes verified a round (the cost model picks how many).
        tree_depth: kangaroo_tree(_lookup): most levels below the last committed token.
        cost_model: a ``bench cost_model`` JSON report (decode_cost_*.json) of this device to size trees
            (kangaroo_tree, kangaroo_tree_lookup) and lookup windows by (default: the built-in table for the device
            and --kernel).
        lookup_window: lookup, kangaroo_lookup, kangaroo_tree_lookup: cost (each round verifies as many of the
            --prompt_lookup copied tokens as the cost model and the running acceptance say pay) or fixed (all the
            match offers). HF's prompt lookup (pld, pld7) has no such rule: size it with --pld_num_tokens.
        kernel: linear layers over <= 8 rows: eager (``F.linear``) or streaming (the CPU kernel of
            :mod:`kangaroo_lit.kernels.streaming_linear`, float32); every method, the baseline too, decodes with it.
        dtype: dtype of the whole model.
        device: torch device; auto = cuda when available, else cpu.
        runs: repeats of the whole benchmark (mean and std over runs); answers in run_1/, run_2/, ...
        warmup: questions decoded (first turn) by every method before the measured ones, not recorded.
        threads: torch CPU threads (default on CPU: 1, as ``bench decode``).
        out_dir: answer files, summary.json/.md/.png; a second run with the same settings resumes there.
        overwrite: delete the answers already in --out_dir (needed when they were made with other settings).
        progress: show a progress bar on stderr.
    """
    from kangaroo_lit.specbench.runner import SpecBenchSettings, run_specbench

    return run_specbench(SpecBenchSettings(
        question_file=question_file, artifact=artifact, base_model=base_model, exit_layer=exit_layer,
        template=format, subtasks=tuple(subtasks) if subtasks else None, limit=limit, turns=turns,
        methods=tuple(methods) if methods else None, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, top_k=top_k, seed=seed, threshold=threshold, max_draft=max_draft,
        pld_num_tokens=pld_num_tokens, pld_ngram_size=pld_ngram_size, prompt_lookup=prompt_lookup,
        skip_below=skip_below, tree_width=tree_width, tree_nodes=tree_nodes, tree_depth=tree_depth,
        cost_model=cost_model, lookup_window=lookup_window, kernel=kernel, dtype=dtype, device=device, runs=runs,
        warmup=warmup, threads=threads, out_dir=out_dir, overwrite=overwrite, progress=progress))


def parse(argv: list[str] | None = None) -> dict[str, Any]:
    """The parsed arguments of :func:`specbench` (``--config`` files applied, then the flags after them).

    ``--overwrite`` and ``--progress`` are switches: alone they mean true; ``--overwrite false`` or
    ``--no_progress`` set false (so a config file can set them).
    """
    return cli_scaffold.parse(cli_scaffold.build_parser(specbench, PROG), argv)


def main(argv: list[str] | None = None) -> int:
    """``kangaroo-lit specbench``: 0 on success, 2 with one ``error:`` line for a user's mistake."""
    cfg = parse(argv)
    return cli_scaffold.run_reporting(lambda: specbench(**cfg))
