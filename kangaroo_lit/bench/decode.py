"""``kangaroo-lit bench decode``: decoding speed of self-speculative decoding against two baselines.

Greedy, batch 1, in one process, interleaved per prompt (the order of the methods rotates from
prompt to prompt): the self-speculative decoder at each (exit layer, threshold), the vanilla loop
(:class:`~kangaroo_lit.decoding.VanillaDecoder`) and HF ``generate(do_sample=False)`` of the verifying
model. Aggregation as DESIGN §3: a prompt's tokens/s = its new tokens / wall time; per run, a method's
speedup = mean over prompts of its tokens/s / the same mean of the vanilla loop; mean and standard
deviation over ``--runs``::

    kangaroo-lit bench decode --base_model ../shared/models/stories260k-hf --exit_layer '[1,2]' \\
        --stories_prompts runs/stories/data/heldout.jsonl --max_new_tokens 200 --thresholds '[0,0.3,0.6]'
    kangaroo-lit bench decode --artifact runs/tiny/artifact --prompts prompts.jsonl --out_dir /tmp/bench

Outputs under ``--out_dir`` (default: a fresh ``runs/bench/decode-<date>-<time>``; ``--out_dir null``: none):
``decode_speed.json`` (every number, the machine, the versions), ``decode_speed.md`` (the table) and
``decode_speed.png`` (tokens/s per method; needs matplotlib). The last lines say where they went.
"""


from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from kangaroo_lit.bench.common import (
    DType,
    fresh_run_dir,
    legend_outside,
    machine_info,
    markdown_table,
    mean_std,
    plus_minus,
    print_table,
    pyplot,
    resolve_device,
    rotated,
    timed,
    torch_threads,
    write_outputs,
)
from kangaroo_lit.errors import ConfigError, DataError
from kangaroo_lit.settings import DecodingSettings

# ``--out_dir`` left at its default: a new directory under this root for each run.
DEFAULT_OUT_ROOT = "runs/bench"

# Default prompts follow the kind of data the draft was trained on (an artifact records it): a draft
# trained on instructions is measured on instructions, rendered as in training; on text, on text.
DEFAULT_TEXT_PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "Tom and Lily went to the park. They saw",
    "def fibonacci(n):",
]
DEFAULT_INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "List five fruits that are red.",
]
# Data whose held-out rows ship beside it: measured on those instead.
HELD_OUT = {"embedded:tiny-instruct.jsonl": "embedded:tiny-instruct-heldout.jsonl"}
METHODS = ("speculative", "vanilla", "generate")
SPEED_HEADER = ["exit layer", "threshold", "speculative tok/s", "vanilla tok/s", "generate tok/s",
                "speedup vs vanilla", "speedup vs generate", "vanilla / generate", "MAT", "acceptance",
                "identical"]


def as_list(value: Any) -> list:
    """A scalar or a sequence as a list (``--exit_layer 1`` and ``--exit_layer '[1,2]'`` alike)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def decode(
    artifact: str | None = None,
    base_model: str | None = None,
    exit_layer: int | tuple[int, ...] | None = None,
    prompts: str | None = None,
    stories_prompts: str | None = None,
    prompt_tokens: int = 8,
    num_prompts: int | None = None,
    max_new_tokens: int = 128,
    thresholds: float | tuple[float, ...] = (0.0, 0.3, 0.6),
    max_draft: int = 6,
    drafter: Literal["adapter", "tree"] = "adapter",
    tree_width: int = 4,
    tree_nodes: int = 7,
    tree_depth: int = 6,
    cost_model: str | None = None,
    dtype: DType = "float32",
    device: str = "auto",
    runs: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    out_dir: str | None = "auto",
) -> dict[str, Any]:
    """Speculative vs vanilla loop vs HF generate on the same prompts; returns the report.

    Args:
        artifact: directory written by ``kangaroo-lit export`` (its trained draft).
        base_model: without ``artifact``: HF model name or directory, decoded with an untrained adapter
            at each ``exit_layer``; with ``artifact``: overrides the artifact's base model.
        exit_layer: exit layer(s) L for ``base_model``, e.g. 1 or [1,2].
        prompts: .txt (one prompt per line) or JSONL/JSON with prompt/instruction; default: prompts of the
            kind the artifact's draft was trained on (its held-out rows for the embedded data,
            instructions for Dolly-format data, text openings otherwise).
        stories_prompts: JSONL of {"text": ...}: the first ``prompt_tokens`` tokens of each are a prompt.
        prompt_tokens: prompt length for ``stories_prompts``.
        num_prompts: use the first N prompts (default: all; 10 for ``stories_prompts``).
        max_new_tokens: most tokens generated per prompt (fewer at EOS, for every method alike).
        thresholds: draft-confidence thresholds, one table row each (per exit layer).
        max_draft: most drafts per round.
        drafter: adapter (a chain of drafts) or tree (a tree of candidates sized by the cost model; the
            thresholds do not apply to it).
        tree_width, tree_nodes, tree_depth: the tree drafter's candidates per node, most nodes, most levels.
        cost_model: a ``bench cost_model`` JSON report to size trees by (default: the built-in table).
        dtype: dtype of the whole model.
        device: torch device; auto = cuda when available, else cpu.
        runs: repeats of the whole comparison (mean and std over runs).
        warmup: prompts decoded by every method first, not recorded.
        threads: torch CPU threads for the run (default on CPU: 1), restored afterwards.
        out_dir: write decode_speed.json, .md and .png here; ``auto``: a fresh
            ``runs/bench/decode-<date>-<time>``; null: write no files.
    """
    config = dict(locals())
    settings = [  # the project's one set of decoding rules, one per threshold
        DecodingSettings.for_options("--", max_new_tokens=max_new_tokens, threshold=float(threshold),
                                     max_draft=max_draft, drafter=drafter, tree_width=tree_width,
                                     tree_nodes=tree_nodes, tree_depth=tree_depth, cost_model=cost_model)
        for threshold in as_list(thresholds)]
    config["device"] = str(resolve_device(device))
    if prompts and stories_prompts:
        raise ConfigError("give --prompts or --stories_prompts, not both")
    with torch_threads(threads or (1 if config["device"] == "cpu" else None)):
        models, tokenizer, base = load_models(artifact, base_model, as_list(exit_layer), dtype, config["device"])
        trained_on = artifact_training_data(artifact) if artifact else {}
        prompt_ids = load_prompt_ids(tokenizer, prompts, stories_prompts, prompt_tokens, num_prompts, trained_on)
        keys = [(layer, float(t)) for layer in models for t in as_list(thresholds)]
        by_threshold = {s.threshold: s for s in settings}
        drafters = {key: by_threshold[key[1]].make_drafter(models[key[0]]) for key in keys}
        records = compare(models, keys, prompt_ids, tokenizer.eos_token_id, max_new_tokens, drafters, runs, warmup)
        report = {
            "mode": "speed",
            "model": base,
            "artifact": artifact,
            "config": config,
            "machine": machine_info(config["device"]),
            "num_prompts": len(prompt_ids),
            "rows": [aggregate(records, layer, t, runs) for layer, t in keys],
            "records": records,
        }
    print_table("Decoding speed (mean ± std over runs)", SPEED_HEADER, speed_rows(report))
    if out_dir == "auto":
        out_dir = config["out_dir"] = str(fresh_run_dir(DEFAULT_OUT_ROOT, "decode"))
    if out_dir:
        write_outputs(out_dir, "decode_speed", report, speed_markdown(report), plot=speed_plot)
        print(f"bench decode: results in {out_dir}", file=sys.stderr)
    return report


# --------------------------------------------------------------------------------------------------
# Models and prompts
def load_models(artifact: str | None, base_model: str | None, exit_layers: list[int], dtype: str,
                device: str) -> tuple[dict[int, Any], Any, str]:
    """``({exit_layer: KangarooModel}, tokenizer, base model path)``: an artifact's draft, or one untrained
    adapter per exit layer over the same frozen base (the project's one loader,
    :func:`~kangaroo_lit.decoding.session.load_for_decoding`; further exit layers share the loaded base)."""
    from kangaroo_lit.decoding.session import load_for_decoding

    if artifact:
        loaded = load_for_decoding(artifact=artifact, base_model=base_model, dtype=dtype, device=device)
        return {loaded.model.exit_layer: loaded.model}, loaded.tokenizer, loaded.base_path
    if not base_model or not exit_layers:
        raise ConfigError("give --artifact, or --base_model with --exit_layer")
    first = load_for_decoding(base_model=base_model, exit_layer=exit_layers[0], dtype=dtype, device=device)
    models = {exit_layers[0]: first.model}
    for layer in exit_layers[1:]:
        models[layer] = load_for_decoding(base_model=first.model.causal_lm, exit_layer=layer).model
    return models, first.tokenizer, first.base_path


def artifact_training_data(artifact: str) -> dict[str, Any]:
    """The data module settings an artifact was trained with (empty when it does not record them)."""
    from kangaroo_lit.artifact import read_manifest

    return (read_manifest(artifact).get("training") or {}).get("data") or {}


def default_prompt_texts(tokenizer, trained_on: dict[str, Any]) -> list[str]:
    """Prompts of the kind the draft was trained on: held-out rows when they ship with the data,
    instructions rendered as in training for Dolly-format data, else short text openings."""
    from kangaroo_lit.data.prompt_file import render_prompt

    chat = bool(trained_on.get("use_chat_template"))
    held_out = HELD_OUT.get(str(trained_on.get("data_path")))
    if held_out:
        from kangaroo_lit.data.rows import load_file_rows
        from kangaroo_lit.embedded import resolve_path

        rows = load_file_rows(resolve_path(held_out), "dolly", "error")[:12]
        return [render_prompt({"instruction": r["instruction"], "context": r.get("context", "")}, tokenizer, chat)
                for r in rows]
    if trained_on.get("format", "dolly") == "dolly" and trained_on:
        return [render_prompt({"instruction": text, "context": ""}, tokenizer, chat) for text in DEFAULT_INSTRUCTIONS]
    return list(DEFAULT_TEXT_PROMPTS)


def load_prompt_ids(tokenizer, prompts: str | None, stories_prompts: str | None, prompt_tokens: int,
                    num_prompts: int | None, trained_on: dict[str, Any] | None = None) -> list[torch.Tensor]:
    """The prompts as (1, T) id tensors on CPU (default: :func:`default_prompt_texts`)."""
    if stories_prompts:
        from kangaroo_lit.data.rows import load_file_rows

        rows = load_file_rows(stories_prompts, "text")[: num_prompts or 10]
        if not rows:
            raise DataError(f"{stories_prompts} holds no story")
        return [torch.tensor([tokenizer(row["text"]).input_ids[:prompt_tokens]]) for row in rows]
    if prompts:
        from kangaroo_lit.data.prompt_file import load_prompts, render_prompt

        texts = [render_prompt(entry, tokenizer) for entry in load_prompts(prompts)]
    else:
        texts = default_prompt_texts(tokenizer, trained_on or {})
    return [tokenizer(t, return_tensors="pt").input_ids for t in texts[: num_prompts or None]]


def hf_generate(lm, ids: torch.Tensor, max_new_tokens: int, eos: int | None) -> tuple[list[int], float]:
    """HF ``generate(do_sample=False)`` under the plain generation config Spec-Bench's baseline uses too (a
    checkpoint's repetition penalty or sampling defaults would change one baseline and not the other)."""
    from kangaroo_lit.specbench.methods import plain_generation_config

    pad = eos if eos is not None else 0
    with torch.inference_mode(), plain_generation_config(lm, [] if eos is None else [eos], pad):
        out, wall = timed(lambda: lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                              max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                              eos_token_id=eos, pad_token_id=pad), ids.device)
    return out[0, ids.shape[1]:].tolist(), wall


def decode_record(result) -> dict[str, Any]:
    """What a report keeps of a :class:`~kangaroo_lit.decoding.DecodeResult` (its tokens for comparison)."""
    return {"tokens": result.tokens, "wall_time_s": result.wall_time_s, "tokens_per_s": result.tokens_per_s,
            "full_passes": result.full_passes, "drafted": result.drafted, "accepted": result.accepted,
            "accept_lengths": result.accept_lengths}


# --------------------------------------------------------------------------------------------------
# The comparison
def compare(models: dict[int, Any], keys: list[tuple[int, float]], prompts: list[torch.Tensor], eos: int | None,
            max_new_tokens: int, drafters: dict[tuple[int, float], Any], runs: int,
            warmup: int) -> list[dict[str, Any]]:
    """Decode every prompt with every method, ``runs`` times: one record per (run, prompt, method).

    Each (exit layer, threshold) in ``keys`` is its own speculative method, drafting with ``drafters[key]``;
    the vanilla loop and HF ``generate`` run once per prompt, with the first model's verifier (the same in
    all of them).
    """
    from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder, reference_model

    first = next(iter(models.values()))
    device = first.causal_lm.device
    prompts = [p.to(device) for p in prompts]
    decoders = {key: SelfSpeculativeDecoder(models[key[0]], drafter=drafters[key]) for key in keys}
    vanilla = VanillaDecoder(first)
    methods: list[Any] = ["vanilla", "generate", *keys]

    def run_one(method, ids) -> dict[str, Any]:
        if method == "generate":
            with reference_model(first) as lm:
                tokens, wall = hf_generate(lm, ids, max_new_tokens, eos)
            return {"tokens": tokens, "wall_time_s": wall, "tokens_per_s": len(tokens) / wall}
        decoder = vanilla if method == "vanilla" else decoders[method]
        return decode_record(decoder.generate(ids, max_new_tokens, eos))

    for ids in prompts[:warmup]:
        for m in methods:
            run_one(m, ids)
    records: list[dict[str, Any]] = []
    for run in range(runs):
        for i, ids in enumerate(prompts):
            results = {m: run_one(m, ids) for m in rotated(methods, run * len(prompts) + i)}
            same_vg = results["vanilla"]["tokens"] == results["generate"]["tokens"]
            for m, r in results.items():
                rec = {"run": run, "prompt": i, "prompt_tokens": ids.shape[1], "new_tokens": len(r["tokens"]),
                       **{k: v for k, v in r.items() if k != "tokens"}}
                if isinstance(m, tuple):
                    same_v = r["tokens"] == results["vanilla"]["tokens"]
                    rec.update(method="speculative", exit_layer=m[0], threshold=m[1], identical=same_vg and same_v,
                               identical_to_vanilla=same_v)
                else:
                    rec.update(method=m, identical=same_vg)
                records.append(rec)
            print(f"run {run + 1}/{runs} prompt {i + 1}/{len(prompts)}: "
                  + ", ".join(f"{_name(m)} {results[m]['tokens_per_s']:.1f}" for m in methods) + " tokens/s",
                  file=sys.stderr)
    return records


def _name(method) -> str:
    return f"L{method[0]}/t{method[1]:g}" if isinstance(method, tuple) else method


def aggregate(records: list[dict], layer: int, threshold: float, runs: int) -> dict[str, Any]:
    """One row (exit layer, threshold): DESIGN §3 aggregation, mean and std over runs."""
    def pick(rec) -> str | None:
        if rec["method"] == "speculative":
            return "speculative" if (rec["exit_layer"], rec["threshold"]) == (layer, threshold) else None
        return rec["method"]

    per_run: dict[str, list[float]] = {k: [] for k in (*METHODS, "speedup_vs_vanilla", "speedup_vs_generate",
                                                        "vanilla_over_generate")}
    for run in range(runs):
        tps: dict[str, list[float]] = {m: [] for m in METHODS}
        for rec in records:
            m = pick(rec)
            if m is not None and rec["run"] == run:
                tps[m].append(rec["tokens_per_s"])
        means = {m: statistics.fmean(v) for m, v in tps.items()}
        for m in METHODS:
            per_run[m].append(means[m])
        per_run["speedup_vs_vanilla"].append(means["speculative"] / means["vanilla"])
        per_run["speedup_vs_generate"].append(means["speculative"] / means["generate"])
        per_run["vanilla_over_generate"].append(means["vanilla"] / means["generate"])
    spec = [r for r in records if pick(r) == "speculative"]
    vg = [r for r in records if r["method"] == "vanilla"]
    lengths = [n for r in spec for n in r["accept_lengths"]]
    drafted = sum(r["drafted"] for r in spec)
    return {
        "exit_layer": layer,
        "threshold": threshold,
        "tokens_per_s": {m: mean_std(per_run[m]) for m in METHODS},
        "speedup_vs_vanilla": mean_std(per_run["speedup_vs_vanilla"]),
        "speedup_vs_generate": mean_std(per_run["speedup_vs_generate"]),
        "vanilla_over_generate": mean_std(per_run["vanilla_over_generate"]),
        "mat": statistics.fmean(lengths) if lengths else 0.0,  # every round of every prompt pooled
        "accept_rate": sum(r["accepted"] for r in spec) / drafted if drafted else 0.0,
        "identical_fraction": statistics.fmean(float(r["identical"]) for r in spec),
        "identical_spec_vanilla": statistics.fmean(float(r["identical_to_vanilla"]) for r in spec),
        "identical_vanilla_generate": statistics.fmean(float(r["identical"]) for r in vg),
        "new_tokens_mean": statistics.fmean(r["new_tokens"] for r in spec),
    }


# --------------------------------------------------------------------------------------------------
# Tables and plot
def speed_rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in report["rows"]:
        t = r["tokens_per_s"]
        out.append([str(r["exit_layer"]), f"{r['threshold']:g}", plus_minus(t["speculative"]),
                    plus_minus(t["vanilla"]), plus_minus(t["generate"]), plus_minus(r["speedup_vs_vanilla"], ".3f"),
                    plus_minus(r["speedup_vs_generate"], ".3f"), plus_minus(r["vanilla_over_generate"], ".3f"),
                    f"{r['mat']:.2f}", f"{r['accept_rate']:.3f}", f"{r['identical_fraction']:.3f}"])
    return out


def speed_markdown(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    head = (f"Model `{report['artifact'] or report['model']}`, {report['num_prompts']} prompts, "
            f"{c['max_new_tokens']} new tokens max, max_draft {c['max_draft']}, {c['dtype']} on {m['device']} "
            f"({m['gpu'] or m['cpu']}, {m['torch_threads']} torch threads), {c['runs']} runs (mean ± std over runs), "
            f"torch {m['torch']}, transformers {m['transformers']}, {m['date']}.")
    return head + "\n\n" + markdown_table(SPEED_HEADER, speed_rows(report)) + "\n"


def speed_plot(report: dict[str, Any], path: Path) -> bool:
    """Bars of tokens/s per method for each (exit layer, threshold), with the std over runs."""
    plt = pyplot()
    if plt is None:
        return False
    rows = report["rows"]
    labels = [f"L{r['exit_layer']}\nt={r['threshold']:g}" for r in rows]
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) + 2), 4.5))
    for j, m in enumerate(METHODS):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r["tokens_per_s"][m]["mean"] for r in rows], width,
               yerr=[r["tokens_per_s"][m]["std"] for r in rows], capsize=3, label=m)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"decoding speed: {Path(str(report['artifact'] or report['model'])).name}")
    legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
