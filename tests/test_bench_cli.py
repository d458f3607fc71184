"""``kangaroo-lit bench``: jsonargparse arguments (``--config``, ``--print_config``), errors, and no
import-time side effects in the bench package or the scripts."""

import importlib.util
import os
import sys
import warnings

import pytest

from kangaroo_lit.bench.cli import BENCHMARKS, main, parse
from tests.conftest import REPO_ROOT

# Every module whose top level must leave the process alone (environment, warning filters, sys.path).
MODULE_FILES = [
    *sorted(p for p in (REPO_ROOT / "kangaroo_lit" / "bench").glob("*.py") if p.name != "__main__.py"),
    REPO_ROOT / "scripts" / "build_tiny_model.py",
    REPO_ROOT / "scripts" / "sample_stories.py",
    REPO_ROOT / "scripts" / "bench" / "stories_drafts.py",
]
ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM",
            "OMP_WAIT_POLICY")


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_print_config_round_trips(name, tmp_path, capsys):
    required = {"threshold_curve": ["--artifact", "a", "--data_path", "d.jsonl"]}.get(name, [])
    args = required + {
        "decode": ["--base_model", "m", "--exit_layer", "[1,2]", "--thresholds", "[0.3]", "--runs", "5"],
        "cost_model": ["--shape", "tiny", "--exit_layer", "[1,2]", "--ks", "[2,3]", "--no_forced"],
        "train_step": ["--shape", "small", "--modes", "[sgp,lora]", "--in_process", "--steps", "4"],
        "tree_vs_chain": ["--shape", "tiny", "--profile", "[0.3,0.4]", "--thresholds", "[0.5]", "--tree_nodes", "5"],
        "threshold_curve": ["--max_drafts", "[1,3]", "--skip_below", "[0,0.3]", "--record"],
    }[name]
    with pytest.raises(SystemExit) as exit_info:
        main([name, *args, "--print_config"])
    assert exit_info.value.code == 0
    config = tmp_path / "bench.yaml"
    config.write_text(capsys.readouterr().out)
    expected = parse(name, args)
    assert parse(name, ["--config", str(config)]) == expected
    assert expected != parse(name, required)  # the arguments did change something
    # A flag after --config wins over the file.
    assert parse(name, ["--config", str(config), "--out_dir", "elsewhere"]) == {**expected, "out_dir": "elsewhere"}


def test_errors_are_messages_and_exit_codes(tmp_path, capsys):
    assert main(["decode"]) == 2
    assert "give --artifact, or --base_model with --exit_layer" in capsys.readouterr().err
    assert main(["decode", "--artifact", str(tmp_path)]) == 2
    assert "kangaroo.json is missing" in capsys.readouterr().err
    assert main(["no_such_bench"]) == 2 and "usage: kangaroo-lit bench" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "train_step" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # jsonargparse refuses a value of the wrong type
        main(["train_step", "--modes", "[fast]"])


def test_importing_bench_and_scripts_has_no_side_effects(monkeypatch):
    def load(path, tag):
        spec = importlib.util.spec_from_file_location(f"_side_effects_{tag}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)

    for path in MODULE_FILES:  # first: import what they import, whose own top level is not under test
        load(path, "deps")
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    environ, path = dict(os.environ), list(sys.path)
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for module_path in MODULE_FILES:  # again: only their own top-level code runs now
            load(module_path, "fresh")
        assert warnings.filters == [], warnings.filters
    assert dict(os.environ) == environ
    assert sys.path == path



def test_only_user_errors_are_one_line(monkeypatch):
    """A ValueError that is not a KangarooError is a bug: it keeps its traceback (errors.py)."""
    import kangaroo_lit.bench.decode

    def broken(base_model: str | None = None) -> dict:
        """A benchmark with a bug."""
        raise ValueError("a bug")

    monkeypatch.setattr(kangaroo_lit.bench.decode, "decode", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["decode"])
