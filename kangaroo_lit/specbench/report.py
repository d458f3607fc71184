"""From answer records to ``summary.json``, the Markdown tables and the plot (pure functions).

Aggregation, exactly as DESIGN §3 (and Spec-Bench's ``evaluation/speed.py``):

* a question's tokens/s = its new tokens / its wall time, both summed over its turns;
* a subtask's ``tokens_per_s`` = the mean over its questions; ``speedup`` = that mean for the method
  / the same mean for the vanilla loop (over the same questions); ``overall`` pools every question;
* ``mat`` = new tokens / full-model passes (``decoding_steps``), pooled over the questions: the mean
  of ``accept_lengths`` where a method reports them (their sum is the new tokens, their count the
  passes), and the same quantity for HF ``generate`` methods, which report no accept lengths;
* ``accept_rate`` = accepted drafts / drafted tokens (None for methods that do not draft);
* ``identical_fraction`` = the fraction of questions whose tokens (every turn) equal the vanilla
  loop's (None when sampling);
* with several runs, each figure is computed per run and reported as the mean and the (sample)
  standard deviation over runs, as ``speed.py``'s ``get_mean_speedup``.

Unlike ``speed.py``, the vanilla loop's tokens are counted as generated, not re-tokenized from its text
(DESIGN §3): say so where these figures meet Spec-Bench's leaderboard.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kangaroo_lit.bench.common import legend_outside, markdown_table, mean_std, pyplot
from kangaroo_lit.specbench.questions import SUBTASKS, Question

BASELINE = "vanilla"
METRICS = ("speedup", "mat", "accept_rate", "tokens_per_s", "vanilla_tokens_per_s", "identical_fraction")


def question_tokens_per_s(record: dict[str, Any]) -> float:
    """New tokens / wall time, each summed over the turns (Spec-Bench's per-question speed)."""
    choice = record["choices"][0]
    wall = sum(choice["wall_time"])
    return sum(choice["new_tokens"]) / wall if wall > 0 else 0.0


def _identical(record: dict[str, Any], baseline: dict[str, Any]) -> bool:
    return record["choices"][0]["token_ids"] == baseline["choices"][0]["token_ids"]


def group_metrics(records: dict[int, dict[str, Any]], baseline: dict[int, dict[str, Any]], qids: Sequence[int],
                  greedy: bool = True) -> dict[str, Any] | None:
    """One run's figures for one method over the questions ``qids`` (those both it and the baseline
    answered); None when there is none."""
    qids = [q for q in qids if q in records and q in baseline]
    if not qids:
        return None
    choices = [records[q]["choices"][0] for q in qids]
    tps = statistics.fmean(question_tokens_per_s(records[q]) for q in qids)
    vanilla_tps = statistics.fmean(question_tokens_per_s(baseline[q]) for q in qids)
    new_tokens = sum(sum(c["new_tokens"]) for c in choices)
    steps = sum(sum(c["decoding_steps"]) for c in choices)
    # drafted: per turn, null where a method cannot tell; 0 for methods that do not draft
    drafted_all = [d for c in choices for d in (c.get("drafted") or [None])]
    drafted = None if any(d is None for d in drafted_all) else sum(drafted_all)
    accepted = sum(a or 0 for c in choices for a in c.get("accepted") or [])
    return {
        "speedup": tps / vanilla_tps if vanilla_tps > 0 else None,
        "mat": new_tokens / steps if steps else None,
        "accept_rate": accepted / drafted if drafted else None,
        "tokens_per_s": tps,
        "vanilla_tokens_per_s": vanilla_tps,
        "identical_fraction": statistics.fmean(float(_identical(records[q], baseline[q])) for q in qids)
        if greedy else None,
        "questions": len(qids),
        "new_tokens": new_tokens,
        "decoding_steps": steps,
        "prompts_cut": sum(1 for c in choices for cut in c.get("prompt_cut") or [] if cut),
    }


def groups_of(questions: Sequence[Question]) -> dict[str, list[int]]:
    """``{subtask: question ids}`` for the subtasks present, in Spec-Bench's order, then ``overall``."""
    groups = {s: [q.question_id for q in questions if q.subtask == s] for s in SUBTASKS}
    groups = {s: ids for s, ids in groups.items() if ids}
    groups["overall"] = [q.question_id for q in questions]
    return groups


def summarize(answers: dict[int, dict[str, dict[int, dict[str, Any]]]], questions: Sequence[Question],
              methods: Sequence[str], greedy: bool = True) -> dict[str, Any]:
    """``{"groups": [...], "results": {group: {method: {metric: {"mean", "std", "per_run"} | None, ...}}}}``.

    Args:
        answers: ``{run: {method: {question_id: answer record}}}``; every run needs the baseline
            (``vanilla``).
        questions: the questions to report on (answers to others are ignored).
        methods: the methods, in table order.
        greedy: whether outputs can be compared token by token.
    """
    groups = groups_of(questions)
    results: dict[str, dict[str, Any]] = {}
    for group, qids in groups.items():
        results[group] = {}
        for method in methods:
            per_run = [group_metrics(answers[run].get(method, {}), answers[run].get(BASELINE, {}), qids, greedy)
                       for run in sorted(answers)]
            per_run = [m for m in per_run if m is not None]
            if not per_run:
                continue
            row: dict[str, Any] = {}
            for metric in METRICS:
                values = [m[metric] for m in per_run]
                row[metric] = None if any(v is None for v in values) else {**mean_std(values), "per_run": values}
            row["runs"] = len(per_run)
            for key in ("questions", "new_tokens", "decoding_steps", "prompts_cut"):
                row[key] = per_run[0][key] if key == "questions" else sum(m[key] for m in per_run)
            results[group][method] = row
    return {"groups": list(groups), "methods": list(methods), "results": results}


# --------------------------------------------------------------------------------------------------
# Tables
def fmt(stat: dict[str, float] | None, spec: str = ".2f", runs: int = 1) -> str:
    """``1.23`` (one run) or ``1.23 ± 0.04`` (several); ``-`` when unknown."""
    if stat is None:
        return "-"
    return f"{stat['mean']:{spec}}" + (f" ± {stat['std']:{spec}}" if runs > 1 else "")


def metric_table(summary: dict[str, Any], metric: str, spec: str = ".2f") -> tuple[list[str], list[list[str]]]:
    """One row per method, one column per subtask (then overall)."""
    header = ["method", *summary["groups"]]
    rows = []
    for method in summary["methods"]:
        cells = [method]
        for group in summary["groups"]:
            row = summary["results"][group].get(method)
            cells.append(fmt(row[metric], spec, row["runs"]) if row else "-")
        rows.append(cells)
    return header, rows


OVERALL_HEADER = ["method", "tokens/s", "vanilla tokens/s", "speedup", "MAT", "acceptance", "identical",
                  "decoding steps", "new tokens", "prompts cut"]


def overall_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for method in summary["methods"]:
        r = summary["results"]["overall"].get(method)
        if r is None:
            continue
        n = r["runs"]
        rows.append([method, fmt(r["tokens_per_s"], ".1f", n), fmt(r["vanilla_tokens_per_s"], ".1f", n),
                     fmt(r["speedup"], ".3f", n), fmt(r["mat"], ".2f", n), fmt(r["accept_rate"], ".3f", n),
                     fmt(r["identical_fraction"], ".3f", n), str(r["decoding_steps"]), str(r["new_tokens"]),
                     str(r["prompts_cut"])])
    return rows


def markdown(summary: dict[str, Any], heading: str, descriptions: dict[str, str] | None = None) -> str:
    """``summary.md``: a heading paragraph, speedup, MAT and acceptance per subtask, overall figures, methods."""
    parts = [heading, "", "Speedup over the vanilla loop (mean tokens/s ratio, DESIGN §3):", ""]
    parts.append(markdown_table(*metric_table(summary, "speedup", ".3f"), left=1))
    parts += ["", "MAT (new tokens per full-model pass):", ""]
    parts.append(markdown_table(*metric_table(summary, "mat", ".2f"), left=1))
    parts += ["", "Acceptance (accepted / drafted tokens; `-`: nothing drafted):", ""]
    parts.append(markdown_table(*metric_table(summary, "accept_rate", ".3f"), left=1))
    parts += ["", "Overall:", "", markdown_table(OVERALL_HEADER, overall_rows(summary), left=1)]
    if descriptions:
        parts += ["", "Methods:", ""] + [f"* `{m}`: {descriptions[m]}" for m in summary["methods"] if m in descriptions]
    parts += ["", "HF `generate` methods (`generate`, `pld`, `pld7`, `hf_early_exit`) return no per-pass accept "
              "lengths: "
              "their MAT and acceptance come from counting the model's forward passes and the tokens fed to them. "
              "New tokens are counted as generated (up to and including EOS) for every method; Spec-Bench's "
              "`speed.py` re-tokenizes the baseline's text instead, so compare with its leaderboard with care.",
              ""]
    return "\n".join(parts)


def plot(summary: dict[str, Any], path: Path, title: str = "Spec-Bench") -> bool:
    """Speedup, MAT and acceptance per subtask, one bar per method (error bars: std over runs); False (nothing
    written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    groups, methods = summary["groups"], summary["methods"]
    panels = (("speedup", "speedup over vanilla"), ("mat", "MAT"), ("accept_rate", "acceptance (accepted / drafted)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(15.0, 0.8 * len(groups) * 3 + 3), 4.5))
    width = 0.8 / max(1, len(methods))
    for ax, (metric, label) in zip(axes, panels):
        for j, method in enumerate(methods):
            xs, ys, errs = [], [], []
            for i, group in enumerate(groups):
                row = summary["results"][group].get(method)
                if row and row.get(metric) is not None:  # acceptance: None for vanilla, unknown for HF's methods
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(row[metric]["mean"])
                    errs.append(row[metric]["std"])
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=method)
        if metric == "speedup":
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
        ax.set_ylabel(label)
    legend_outside(axes[-1])  # one legend for every panel, beside them (it covered the bars inside one)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
