"""scripts/run_sgp_experiment.py end to end on the embedded default, with tiny settings: fit -> export ->
validate -> Spec-Bench -> sweep -> report, and the report's table equals the numbers underneath it."""

import json
import subprocess
import sys

import pytest

from kangaroo_lit.embedded import ASSETS_DIR
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (ASSETS_DIR / "tiny-llama").is_dir(), reason="embedded model not built")]
QUESTIONS = [{"question_id": 321, "category": "qa", "turns": ["Who wrote Hamlet?"]},
             {"question_id": 401, "category": "summarization", "turns": ["Summarize: the sea is blue and wide."]}]


def table(markdown: str) -> list[dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, [c.strip() for c in line.strip("|").split("|")])) for line in lines[2:]
            if not line.startswith("| threshold") and len(line.split("|")) == len(lines[0].split("|"))]


def csv_last(path, key):
    from scripts.run_sgp_experiment import read_csv, series

    return series(read_csv(path), key)[1][-1]


def test_experiment_end_to_end(tmp_path):
    sys.path.insert(0, str(REPO_ROOT))
    from scripts.run_sgp_experiment import main

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    out = tmp_path / "exp"
    assert main(["--out_dir", str(out), "--max_steps", "2", "--val_check_interval", "1", "--limit_val_batches", "1",
                 "--decode_check_prompts", "1", "--decode_check_tokens", "6", "--question_file", str(questions),
                 "--limit", "1", "--max_new_tokens", "6", "--thresholds", "[0.0, 0.6]", "--max_drafts", "[1, 3]",
                 "--sweep_prompts", "1", "--sweep_tokens", "6", "--device", "cpu"]) == 0
    for name in ("report.md", "report.json", "losses.png", "val_mat.png", "sweep.png", "specbench_sgp.png",
                 "specbench_subtasks.png"):
        assert (out / name).is_file(), name
    run = json.loads((out / "sgp" / "run.json").read_text())
    [row] = table((out / "report.md").read_text())
    assert row["run"] == "sgp" and row["steps"] == "2"
    summary = json.loads((out / "sgp" / "specbench" / "summary.json").read_text())
    overall = summary["results"]["overall"]["kangaroo"]
    assert summary["settings"]["limit"] == 1 and overall["questions"] == 2
    assert row["Spec-Bench speedup"] == f"{overall['speedup']['mean']:.3f}"
    assert row["Spec-Bench MAT"] == f"{overall['mat']['mean']:.3f}"
    assert row["Spec-Bench accept"] == f"{overall['accept_rate']['mean']:.3f}"
    validate_csv = run["validate_csv"]
    for column, key in (("val MAT", "val/mat"), ("ppl full", "val/ppl_full"), ("ppl original", "val/ppl_original"),
                        ("drift agree", "val/drift_agree")):
        assert row[column] == format(csv_last(validate_csv, key), ".2f" if "ppl" in column else ".3f"), column
    assert row["drift agree"] == "1.000"  # lora.scope draft: the verifier is the original
    sweep = [json.loads((out / "sgp" / "sweep" / f"max_draft_{m}" / "decode_speed.json").read_text()) for m in (1, 3)]
    speeds = [(r["speedup_vs_vanilla"]["mean"], r["threshold"], m)
              for rep, m in zip(sweep, (1, 3)) for r in rep["rows"]]
    best = max(speeds)
    assert len(speeds) == 4 and row["best speedup"] == f"{best[0]:.3f}"
    assert (row["best threshold"], row["best max_draft"]) == (f"{best[1]:g}", str(best[2]))
    assert row["peak mem GiB"] == f"{csv_last(run['train']['csv'], 'train/peak_memory_gib'):.2f}"
    # val/mat at each validation of training (the decode check) is in the training log
    assert len([1 for line in open(run["train"]["csv"]) if line]) > 1 and csv_last(run["train"]["csv"], "val/mat") >= 1

    # a finished run directory joins a later report as it is
    again = tmp_path / "again"
    assert main(["--runs", f"[{out / 'sgp'}]", "--out_dir", str(again)]) == 0
    assert table((again / "report.md").read_text()) == [row]


def test_print_config_round_trips(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "run_sgp_experiment.py"), "--max_steps", "7",
                           "--print_config"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 7" in proc.stdout and "thresholds:" in proc.stdout
