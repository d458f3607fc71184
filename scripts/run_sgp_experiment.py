"""The end-to-end SGP experiment: fit -> export -> validate (perplexity, drift, decode check) -> Spec-Bench
(a subset) -> a threshold x max_draft sweep, for one or several runs, and one report directory.

    python scripts/run_sgp_experiment.py                                   # the embedded default (configs/tiny.yaml)
    python scripts/run_sgp_experiment.py \
        --runs '[sgp=configs/tiny.yaml, joint=configs/tiny.yaml+configs/joint.yaml]'
    python scripts/run_sgp_experiment.py --runs '[runs/sgp_experiment/sgp, runs/other/sgp]'  # report only
    python scripts/run_sgp_experiment.py --print_config > experiment.yaml; ... --config experiment.yaml

A run is ``NAME=CONFIG[+CONFIG...]`` (LightningCLI configs, stacked in order) or the directory of a run this
script finished before (it holds ``run.json``). Each new run goes to ``<out_dir>/<NAME>/``: ``train/`` (checkpoints,
CSV logs), ``artifact/``, ``validate/``, ``specbench/``, ``sweep/`` and ``run.json`` (every number the report
shows). The report, ``<out_dir>/report.md`` with its PNGs and ``report.json``, compares all runs in one table.

A thin orchestrator: training and validation are ``kangaroo-lit fit/validate`` (with the decode-check and
throughput callbacks, callbacks/*.yaml), the artifact is :func:`kangaroo_lit.artifact.export_checkpoint`,
Spec-Bench is :func:`kangaroo_lit.specbench.cli.specbench` and the sweep :func:`kangaroo_lit.bench.decode.decode`.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_QUESTIONS = str(REPO.parent / "shared" / "data" / "spec_bench_question.jsonl")
# (column, run.json path, format) of the comparison table
TABLE = [
    ("steps", ("train", "global_step"), "d"),
    ("val loss", ("validate", "val/loss"), ".3f"),
    ("ppl full", ("validate", "val/ppl_full"), ".2f"),
    ("ppl original", ("validate", "val/ppl_original"), ".2f"),
    ("drift agree", ("validate", "val/drift_agree"), ".3f"),
    ("expected accept", ("validate", "val/expected_accept"), ".3f"),
    ("val MAT", ("validate", "val/mat"), ".3f"),
    ("Spec-Bench speedup", ("specbench", "speedup"), ".3f"),
    ("Spec-Bench MAT", ("specbench", "mat"), ".3f"),
    ("Spec-Bench accept", ("specbench", "accept_rate"), ".3f"),
    ("identical", ("specbench", "identical"), ".2f"),
    ("best threshold", ("sweep", "best", "threshold"), "g"),
    ("best max_draft", ("sweep", "best", "max_draft"), "d"),
    ("best speedup", ("sweep", "best", "speedup"), ".3f"),
    ("train tokens/s", ("train", "tokens_per_s"), ".0f"),
    ("peak mem GiB", ("train", "peak_memory_gib"), ".2f"),
]


def experiment(
    runs: list[str] | None = None,
    out_dir: str = "runs/sgp_experiment",
    max_steps: int = 60,
    val_check_interval: int | float | None = None,
    limit_val_batches: float | None = None,
    log_every_n_steps: int = 1,
    fit_args: list[str] | None = None,
    decode_check_prompts: int = 4,
    decode_check_tokens: int = 32,
    question_file: str = DEFAULT_QUESTIONS,
    subtasks: list[str] | None = None,
    limit: int | None = 2,
    max_new_tokens: int = 64,
    template: str = "instruction",
    thresholds: list[float] | None = None,
    max_drafts: list[int] | None = None,
    sweep_prompts: int = 4,
    sweep_tokens: int = 64,
    sweep_runs: int = 1,
    device: str = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or collect) every run, write the report; returns ``report.json``'s content.

    Args:
        runs: ``NAME=CONFIG[+CONFIG...]`` to train, or directories of finished runs (holding run.json);
            default ``sgp=configs/tiny.yaml``, the embedded default.
        out_dir: where new runs and the report go.
        max_steps: optimizer steps per new run.
        val_check_interval: validate every this many training batches (int) or fraction of an epoch
            (default the config's).
        limit_val_batches: validation batches per validation (default the config's).
        log_every_n_steps: CSV logging interval (1: every step, for the loss plot).
        fit_args: more ``kangaroo-lit fit`` arguments for every new run (e.g. ``[--model.exit_layer, 2]``).
        decode_check_prompts: held-out prompts of the decode check at each validation (0: none).
        decode_check_tokens: new tokens per decode-check prompt.
        question_file: Spec-Bench question file.
        subtasks: Spec-Bench subtasks (default all six).
        limit: first N questions of each subtask (None: all 80).
        max_new_tokens: Spec-Bench tokens per answer.
        template: Spec-Bench prompt template (instruction: the embedded model's training template; auto, chat, vicuna).
        thresholds: sweep thresholds (default 0, 0.3, 0.6, 0.9).
        max_drafts: sweep max_draft values (default 1, 2, 4, 6).
        sweep_prompts: prompts of the sweep (the artifact's held-out rows for the embedded data).
        sweep_tokens: new tokens per sweep prompt.
        sweep_runs: repeats of the sweep (mean over runs).
        device: torch device of Spec-Bench and the sweep (auto: cuda when available).
        overwrite: replace an existing run directory of the same name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in locals().items() if k not in ("out",)}
    results = []
    for spec in runs or ["sgp=configs/tiny.yaml"]:
        if "=" not in spec:
            run_json = Path(spec) / "run.json"
            if not run_json.is_file():
                raise SystemExit(f"error: {spec} is neither NAME=CONFIG[+CONFIG...] nor a run directory with run.json")
            results.append(json.loads(run_json.read_text()))
            continue
        name, configs = spec.split("=", 1)
        results.append(run_one(name, [resolve(c) for c in configs.split("+")], out / name, settings))
    return write_report(results, out, settings)


def resolve(path: str) -> str:
    """A config path as given, else relative to the repository."""
    p = Path(path)
    return str(p if p.exists() or p.is_absolute() else REPO / p)


def run_one(name: str, configs: list[str], run_dir: Path, s: dict[str, Any]) -> dict[str, Any]:
    from kangaroo_lit.artifact import export_checkpoint
    from kangaroo_lit.cli import run_lightning

    if run_dir.exists():
        if not s["overwrite"]:
            raise SystemExit(f"error: {run_dir} exists; pass --overwrite or another --out_dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    base = [a for c in configs for a in ("--config", c)]
    callbacks = ["--config", str(REPO / "callbacks" / "throughput.yaml")]
    if s["decode_check_prompts"]:
        callbacks += ["--trainer.callbacks+=kangaroo_lit.callbacks.DecodeEvalCallback",
                      "--trainer.callbacks.num_prompts", str(s["decode_check_prompts"]),
                      "--trainer.callbacks.max_new_tokens", str(s["decode_check_tokens"])]
    trainer_args = ["--trainer.max_steps", str(s["max_steps"]),
                    "--trainer.log_every_n_steps", str(s["log_every_n_steps"])]
    if s["val_check_interval"] is not None:
        trainer_args += ["--trainer.val_check_interval", str(s["val_check_interval"])]
        if isinstance(s["val_check_interval"], int):  # every N batches, across epochs
            trainer_args += ["--trainer.check_val_every_n_epoch", "null"]
    if s["limit_val_batches"] is not None:
        trainer_args += ["--trainer.limit_val_batches", str(s["limit_val_batches"])]
    print(f"== {name}: fit ({' + '.join(configs)})", file=sys.stderr)
    cli = run_lightning(["fit", *base, *callbacks, *trainer_args, *(s["fit_args"] or []),
                         "--trainer.default_root_dir", str(run_dir / "train")])
    train_csv = Path(cli.trainer.logger.log_dir) / "metrics.csv"
    ckpt = run_dir / "train" / "checkpoints" / "last.ckpt"
    global_step = cli.trainer.global_step
    del cli

    print(f"== {name}: export", file=sys.stderr)
    artifact = export_checkpoint(ckpt, run_dir / "artifact")

    print(f"== {name}: validate", file=sys.stderr)
    validate_args = ["validate", *base, *(s["fit_args"] or []), "--ckpt_path", str(ckpt),
                     "--trainer.default_root_dir", str(run_dir / "validate")]
    if s["limit_val_batches"] is not None:
        validate_args += ["--trainer.limit_val_batches", str(s["limit_val_batches"])]
    if s["decode_check_prompts"]:
        validate_args += callbacks[2:]
    cli = run_lightning(validate_args)
    validate = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
    validate_csv = Path(cli.trainer.logger.log_dir) / "metrics.csv" if cli.trainer.logger else None
    del cli

    print(f"== {name}: Spec-Bench", file=sys.stderr)
    from kangaroo_lit.specbench.cli import specbench

    bench = specbench(question_file=s["question_file"], artifact=str(artifact), subtasks=s["subtasks"],
                      limit=s["limit"], methods=["vanilla", "kangaroo"], max_new_tokens=s["max_new_tokens"],
                      format=s["template"], device=s["device"], warmup=1, out_dir=str(run_dir / "specbench"),
                      overwrite=True, progress=False)
    overall = bench["results"]["overall"]["kangaroo"]
    spec = {key: (overall[key] or {}).get("mean") for key in ("speedup", "mat", "accept_rate", "tokens_per_s",
                                                              "vanilla_tokens_per_s", "identical_fraction")}
    spec["identical"] = spec.pop("identical_fraction")
    spec["per_subtask"] = {g: {k: (bench["results"][g]["kangaroo"][k] or {}).get("mean") for k in ("speedup", "mat")}
                           for g in bench["groups"] if g != "overall"}

    print(f"== {name}: sweep", file=sys.stderr)
    sweep = run_sweep(str(artifact), s, run_dir / "sweep")

    record = {
        "name": name,
        "configs": configs,
        "dir": str(run_dir),
        "artifact": str(artifact),
        "train": {"global_step": global_step, "csv": str(train_csv), **train_summary(train_csv)},
        "validate": validate,
        "validate_csv": str(validate_csv) if validate_csv else None,
        "specbench": {**spec, "summary": str(run_dir / "specbench" / "summary.json"),
                      "png": str(run_dir / "specbench" / "summary.png")},
        "sweep": sweep,
    }
    (run_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_sweep(artifact: str, s: dict[str, Any], out: Path) -> dict[str, Any]:
    """``bench decode`` on the artifact for every max_draft (all thresholds in one call each)."""
    from kangaroo_lit.bench.decode import decode

    rows = []
    for max_draft in s["max_drafts"] or [1, 2, 4, 6]:
        report = decode(artifact=artifact, thresholds=tuple(s["thresholds"] or (0.0, 0.3, 0.6, 0.9)),
                        max_draft=max_draft, num_prompts=s["sweep_prompts"], max_new_tokens=s["sweep_tokens"],
                        runs=s["sweep_runs"], warmup=1, device=s["device"], out_dir=str(out / f"max_draft_{max_draft}"))
        for row in report["rows"]:
            rows.append({"threshold": row["threshold"], "max_draft": max_draft, "mat": row["mat"],
                         "accept_rate": row["accept_rate"], "speedup": row["speedup_vs_vanilla"]["mean"],
                         "identical": row["identical_spec_vanilla"]})
    best = max(rows, key=lambda r: r["speedup"])
    return {"rows": rows, "best": best}


def read_csv(path: str | Path | None) -> list[dict[str, float]]:
    """Rows of a Lightning CSV log, numbers only (empty cells dropped)."""
    if not path or not Path(path).is_file():
        return []
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            vals = {}
            for k, v in row.items():
                try:
                    vals[k] = float(v)
                except (TypeError, ValueError):
                    pass
            out.append(vals)
    return out


def series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def throughput_key(rows: list[dict[str, float]]) -> str | None:
    keys = sorted({k for r in rows for k in r if k.startswith("train") and k.endswith("items_per_sec")})
    return keys[0] if keys else None


def train_summary(csv_path: Path) -> dict[str, Any]:
    """The last logged training tokens/s (ThroughputMonitor's items/s = real tokens/s) and the peak memory."""
    rows = read_csv(csv_path)
    key = throughput_key(rows)
    tps = series(rows, key)[1] if key else []
    mem = series(rows, "train/peak_memory_gib")[1]
    return {"tokens_per_s": tps[-1] if tps else None, "tokens_per_s_key": key,
            "peak_memory_gib": max(mem) if mem else None}


# --------------------------------------------------------------------------------------------------
# The report
def lookup(record: dict[str, Any], path: tuple[str, ...]):
    value: Any = record
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    return format(int(value) if spec == "d" else float(value), spec)


def comparison_table(results: list[dict[str, Any]]) -> str:
    from kangaroo_lit.bench.common import markdown_table

    header = ["run", *[c for c, _, _ in TABLE]]
    rows = [[r["name"], *[fmt(lookup(r, path), spec) for _, path, spec in TABLE]] for r in results]
    return markdown_table(header, rows, left=1)


# Training losses in the order they are plotted: the draft's own loss first (every run with a draft path
# logs it), then the full objective and the full path's loss (absent where training skips the full path).
TRAIN_LOSS_KEYS = ("train/loss_exit", "train/loss", "train/loss_main")


def common_loss_keys(rows_by_run: list[list[dict[str, float]]]) -> list[str]:
    """The training losses every run logged, in :data:`TRAIN_LOSS_KEYS` order.

    Under SGP with a ce exit loss training skips the full path and logs ``train/loss_exit`` only; a joint
    run logs all three. Plotting each run's ``train/loss`` side by side compared ``beta_exit * loss_exit``
    with the full objective; only a quantity that every run logged is drawn.
    """
    logged = [{key for row in rows for key in row} for rows in rows_by_run]
    return [key for key in TRAIN_LOSS_KEYS if logged and all(key in keys for keys in logged)]


def loss_curves(results: list[dict[str, Any]]) -> list[tuple[str, list[float], list[float], str]]:
    """``(label, steps, values, line style)`` of the losses plot: each common training loss of every run,
    then every run's ``val/loss`` (validation computes the full objective for every run)."""
    rows_by_run = [read_csv(r["train"]["csv"]) for r in results]
    curves = []
    for key in common_loss_keys(rows_by_run):
        for r, rows in zip(results, rows_by_run):
            x, y = series(rows, key)
            if x:
                curves.append((f"{r['name']} {key}", x, y, "-"))
    for r, rows in zip(results, rows_by_run):
        x, y = series(rows, "val/loss")
        if x:
            curves.append((f"{r['name']} val/loss", x, y, "o--"))
    return curves


def plots(results: list[dict[str, Any]], out: Path) -> dict[str, str]:
    """PNGs of the report (those with something to show); {caption: file name}."""
    from kangaroo_lit.bench.common import legend_outside, pyplot

    plt = pyplot()
    if plt is None:
        return {}
    made = {}

    def figure(fname: str, caption: str, draw) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        if draw(ax):
            if ax.get_legend_handles_labels()[0]:
                legend_outside(ax, fontsize=7)  # beside the axes: inside it covered the subtask bars
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / fname, dpi=110, bbox_inches="tight")
            made[caption] = fname
        plt.close(fig)

    def losses(ax) -> bool:
        curves = loss_curves(results)
        for label, x, y, style in curves:
            ax.plot(x, y, style, label=label)
        ax.set(xlabel="step", ylabel="loss", title="Losses (the same quantities for every run)")
        return bool(curves)

    def val_mat(ax) -> bool:
        any_line = False
        for r in results:
            x, y = series(read_csv(r["train"]["csv"]), "val/mat")
            if x:
                ax.plot(x, y, marker="o", label=r["name"])
                any_line = True
        ax.set(xlabel="step", ylabel="MAT", title="Decode check: val/mat per validation")
        return any_line

    def throughput(ax) -> bool:
        any_line = False
        for r in results:
            rows = read_csv(r["train"]["csv"])
            key = throughput_key(rows)
            if key:
                x, y = series(rows, key)
                ax.plot(x, y, label=f"{r['name']} tokens/s")
                any_line = True
            x, y = series(rows, "train/peak_memory_gib")
            if x:
                ax2 = ax.twinx()
                ax2.plot(x, y, linestyle="--", color="gray", label=f"{r['name']} peak GiB")
                ax2.set_ylabel("peak memory (GiB)")
                any_line = True
        ax.set(xlabel="step", ylabel="training tokens/s", title="Training throughput and peak memory")
        return any_line

    def sweep(ax) -> bool:
        for r in results:
            for md in sorted({row["max_draft"] for row in r["sweep"]["rows"]}):
                pts = sorted((row["threshold"], row["speedup"]) for row in r["sweep"]["rows"] if row["max_draft"] == md)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{r['name']} max_draft {md}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xlabel="threshold", ylabel="speedup vs vanilla loop", title="Sweep: threshold x max_draft")
        return any(r["sweep"]["rows"] for r in results)

    def subtasks(ax) -> bool:
        width = 0.8 / max(1, len(results))
        groups: list[str] = []
        for r in results:
            groups += [g for g in r["specbench"].get("per_subtask", {}) if g not in groups]
        for i, r in enumerate(results):
            per = r["specbench"].get("per_subtask", {})
            xs = [j + i * width for j in range(len(groups))]
            ax.bar(xs, [(per.get(g) or {}).get("speedup") or 0 for g in groups], width, label=f"{r['name']} speedup")
            ax.plot(xs, [(per.get(g) or {}).get("mat") or 0 for g in groups], "k^", label=f"{r['name']} MAT")
        ax.set_xticks(range(len(groups)), groups, rotation=20, fontsize=8)
        ax.set(title="Spec-Bench per subtask: speedup (bars), MAT (triangles)")
        return bool(groups)

    figure("losses.png", "Training losses", losses)
    figure("val_mat.png", "val/mat per validation (decode check)", val_mat)
    figure("throughput.png", "Training tokens/s and peak memory", throughput)
    figure("specbench_subtasks.png", "Spec-Bench speedup and MAT per subtask", subtasks)
    figure("sweep.png", "threshold x max_draft sweep", sweep)
    return made


def write_report(results: list[dict[str, Any]], out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    made = plots(results, out)
    for r in results:  # Spec-Bench's own plot, as it drew it
        png = Path(r["specbench"].get("png") or "")
        if png.is_file():
            shutil.copy(png, out / f"specbench_{r['name']}.png")
            made[f"Spec-Bench ({r['name']}), as `kangaroo-lit specbench` drew it"] = f"specbench_{r['name']}.png"
    lines = ["# SGP experiment", "",
             "One row per run: validation figures of the final checkpoint (`kangaroo-lit validate`: perplexity of "
             "the fine-tuned full path and of the original model, their greedy agreement, the decode check's MAT), "
             "Spec-Bench overall (the trained draft `kangaroo` vs the vanilla loop), the best setting of the "
             "threshold x max_draft sweep (`bench decode`), and training throughput (last logged real tokens/s) "
             "and peak memory.", "", comparison_table(results), ""]
    for r in results:
        best = r["sweep"]["best"]
        lines += [f"## {r['name']}", "", f"configs: {', '.join(f'`{c}`' for c in r['configs'])}; artifact "
                  f"`{r['artifact']}`; best sweep setting threshold {best['threshold']:g}, "
                  f"max_draft {best['max_draft']} "
                  f"(speedup {best['speedup']:.3f}, MAT {best['mat']:.3f}).", "",
                  "| threshold | max_draft | MAT | accept | speedup | identical |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {row['threshold']:g} | {row['max_draft']} | {row['mat']:.3f} | {row['accept_rate']:.3f} | "
                  f"{row['speedup']:.3f} | {row['identical']:.2f} |" for row in r["sweep"]["rows"]]
        lines.append("")
    lines += ["## Figures", ""] + [f"![{caption}]({fname})\n" for caption, fname in made.items()]
    (out / "report.md").write_text("\n".join(lines))
    report = {"settings": settings, "runs": results, "figures": made}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(comparison_table(results))
    print(f"wrote {out / 'report.md'}", file=sys.stderr)
    return report


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="run_sgp_experiment.py", description=__doc__, allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of these arguments (repeatable)")
    parser.add_function_arguments(experiment, as_group=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv).as_dict()
    cfg.pop("config", None)
    experiment(**cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
