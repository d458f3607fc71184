"""What ``kangaroo-lit`` tells a user: a closing summary after fit, one-line usage errors with the nearest
key, subcommands that name themselves, a refused run that leaves no log folder (issue 18, points 3-5, 8, 10).
"""

import logging
import subprocess
import sys
import warnings

import pytest

from kangaroo_lit.cli import DESCRIPTIONS, OWN_SUBCOMMANDS, main
from kangaroo_lit.cli_support import nearest_key
from tests.conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny.yaml")


def fit_args(root, *extra):
    """``fit`` on the embedded model and data, one step, no validation, everything under ``root``."""
    return ["fit", "--config", TINY, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(root), "--data.cache_dir", str(root / "cache"), *extra]


# --------------------------------------------------------------------------------------------------
# 3: fit ends with where the outputs are and what to run next, without Lightning's noise


def test_fit_ends_with_a_summary_and_without_lightnings_tips(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kangaroo_lit", *fit_args(tmp_path)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    summary = err[err.index("done: run directory"):]
    assert f"last checkpoint: {last}" in summary
    assert f"kangaroo-lit export --ckpt_path {last} --out_dir {tmp_path / 'artifact'}" in summary
    assert f"kangaroo-lit generate --artifact {tmp_path / 'artifact'} --format instruction" in summary
    assert "litlogger" not in err and "LeafSpec" not in err


def test_the_cli_leaves_no_warning_filter_or_log_filter_behind(capsys):
    filters = list(warnings.filters)
    tip_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log_filters = list(tip_logger.filters)
    with pytest.raises(SystemExit):
        main(["fit", "--model.exit_layr", "3"])
    capsys.readouterr()
    assert warnings.filters == filters
    assert tip_logger.filters == log_filters


# --------------------------------------------------------------------------------------------------
# 4: a mistyped key is one line with the nearest valid key


def test_a_mistyped_flag_is_one_line_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", TINY, "--model.exit_layr", "3"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model.exit_layr" in err and "did you mean model.exit_layer?" in err


def test_a_mistyped_yaml_key_is_one_line_with_a_suggestion(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  lora:\n    rnk: 4\n")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", TINY, "--config", str(typo)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "did you mean model.lora.rank?" in err


def test_nearest_key_stays_in_the_group_and_suggests_nothing_far():
    keys = ["trainer", "trainer.max_epochs", "model", "model.exit_layer", "model.lora.rank"]
    assert nearest_key("trainer.max_epoch", keys) == "trainer.max_epochs"
    assert nearest_key("modle.exit_layer", keys) == "model.exit_layer"
    assert nearest_key("trainer.foo", keys) is None  # never the group itself


# --------------------------------------------------------------------------------------------------
# 5: subcommands that name themselves; pull --list bare; a top-level help that says what each does


def test_pull_list_works_bare(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KANGAROO_MODELS", str(tmp_path / "models"))
    assert main(["pull", "--list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


@pytest.mark.parametrize("subcommand", ["pull", "distill"])
def test_usage_lines_name_the_subcommand(subcommand, capsys):
    with pytest.raises(SystemExit) as info:
        main([subcommand, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: kangaroo-lit {subcommand} ")
    with pytest.raises(SystemExit):
        main([subcommand, "--no_such_option", "1"])
    err = capsys.readouterr().err
    assert f"kangaroo-lit {subcommand} --help" in err
    assert sys.argv[0] != f"kangaroo-lit {subcommand}"  # restored


def test_top_level_help_describes_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ["fit", "validate", "test", "predict", *OWN_SUBCOMMANDS]:
        assert DESCRIPTIONS.get(name), f"{name} has no description"
        assert any(line.split()[:1] == [name] and DESCRIPTIONS[name] in line for line in out.splitlines()), name


# --------------------------------------------------------------------------------------------------
# 8 and 10: a refused run leaves no log folder; no data path means one line, not a Hub traceback


@pytest.mark.parametrize("case", ["exit-layer", "bad-data"])
def test_a_refused_run_leaves_no_log_folder(case, tmp_path, capsys):
    extra = ["--model.exit_layer", "9"]
    if case == "bad-data":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"bad": 1}\n')
        extra = ["--data.data_path", str(bad)]
    assert main(fit_args(tmp_path / "run", *extra)) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "run" / "lightning_logs").exists()


def test_fit_without_a_data_path_offline_is_one_line(tmp_path, capsys):
    # the default data is Dolly from the Hub; the tests run offline (conftest.py)
    assert main(fit_args(tmp_path / "run", "--data.data_path", "null")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert "--data.data_path" in err[0] and "embedded:tiny-instruct.jsonl" in err[0]
    assert not (tmp_path / "run" / "lightning_logs").exists()
