"""``export`` and ``generate`` parse like LightningCLI's ``fit``: --config, --print_config, underscore names.

Parsing only (no model is loaded): ``--print_config`` exits before anything runs.
"""

import typing

import pytest
import yaml

from kangaroo_lit import cli_export, cli_generate
from kangaroo_lit.architectures import DTYPES
from kangaroo_lit.cli import main

EXPORT_ARGS = ["--ckpt_path", "runs/x/checkpoints/last.ckpt", "--out_dir", "runs/x/artifact", "--base_model", "m",
               "--overwrite"]
GENERATE_ARGS = [
    "--base_model", "some/model", "--exit_layer", "2", "--prompt", "null",  # YAML-looking text stays text
    "--format", "instruction", "--max_new_tokens", "9", "--temperature", "0.7", "--top_p", "0.9", "--top_k", "5",
    "--threshold", "0.3", "--max_draft", "4", "--compare_vanilla", "--dtype", "float64", "--device", "cpu",
    "--seed", "3", "--json",
]
CASES = [("export", cli_export, EXPORT_ARGS), ("generate", cli_generate, GENERATE_ARGS)]


def printed_config(subcommand, argv, capsys) -> str:
    """What ``kangaroo-lit <subcommand> <argv> --print_config`` prints (through the real dispatcher)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *argv, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize(("subcommand", "module", "argv"), CASES, ids=[c[0] for c in CASES])
def test_print_config_round_trips_through_config(subcommand, module, argv, tmp_path, capsys):
    printed = printed_config(subcommand, argv, capsys)
    assert set(yaml.safe_load(printed)) == set(module.parse(argv))  # every argument, nothing else
    config = tmp_path / f"{subcommand}.yaml"
    config.write_text(printed)
    assert module.parse(["--config", str(config)]) == module.parse(argv)
    assert printed_config(subcommand, ["--config", str(config)], capsys) == printed


def test_export_flags_after_a_config_win(tmp_path):
    config = tmp_path / "export.yaml"
    config.write_text("ckpt_path: a.ckpt\nout_dir: from_config\n")
    parsed = cli_export.parse(["--config", str(config), "--out_dir", "from_flag"])
    assert parsed == {"ckpt_path": "a.ckpt", "out_dir": "from_flag", "base_model": None, "overwrite": False}
    # arguments apply in order, as in LightningCLI: a config given after a flag overrides it
    assert cli_export.parse(["--out_dir", "from_flag", "--config", str(config)])["out_dir"] == "from_config"


def test_generate_flags_after_a_config_win(tmp_path):
    config = tmp_path / "generate.yaml"
    config.write_text("base_model: m\nexit_layer: 1\nprompt: hi\nmax_new_tokens: 9\n"
                      "json: true\ncompare_vanilla: true\n")
    from_config = cli_generate.parse(["--config", str(config)])
    assert from_config["max_new_tokens"] == 9 and from_config["json"] is True
    parsed = cli_generate.parse(["--config", str(config), "--max_new_tokens", "3", "--no_json",
                                 "--compare_vanilla", "false"])
    assert parsed == {**from_config, "max_new_tokens": 3, "json": False, "compare_vanilla": False}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], False),
        (["--json"], True),
        (["--json", "--prompt", "x"], True),  # a bare switch before another option
        (["--json", "true"], True),
        (["--json=false"], False),
        (["--json", "no"], False),
        (["--no_json"], False),
    ],
)
def test_generate_switches_work_bare_or_with_a_value(argv, expected):
    assert cli_generate.parse(argv)["json"] is expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], False), (["--overwrite"], True), (["--overwrite", "false"], False), (["--no_overwrite"], False)],
)
def test_export_overwrite_is_a_switch(argv, expected):
    assert cli_export.parse(["--ckpt_path", "a.ckpt", "--out_dir", "b", *argv])["overwrite"] is expected


def test_generate_keeps_prompt_text_literally():
    for text in ["# Title", "null", "true", "123", "x: y", "[1, 2]"]:
        assert cli_generate.parse(["--prompt", text])["prompt"] == text


@pytest.mark.parametrize(
    ("subcommand", "argv"),
    [
        ("generate", ["--max-new-tokens", "8"]),  # the old hyphen spelling
        ("generate", ["--model", "m"]),  # now --base_model
        ("export", ["--ckpt", "a", "--out", "b"]),  # now --ckpt_path / --out_dir
        ("generate", ["--dtype", "float8"]),
    ],
)
def test_unknown_or_renamed_arguments_are_usage_errors(subcommand, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_unknown_config_keys_are_usage_errors(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("max_new_token: 8\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_generate.parse(["--config", str(config)])
    assert exit_info.value.code == 2
    assert "max_new_token" in capsys.readouterr().err


def test_generate_dtype_choices_are_the_supported_dtypes():
    hints = typing.get_type_hints(cli_generate.GenerateOptions)
    assert set(typing.get_args(hints["dtype"])) == set(DTYPES)


def test_help_names_every_argument(capsys):
    for subcommand, _, argv in CASES:
        with pytest.raises(SystemExit):
            main([subcommand, "--help"])
        out = capsys.readouterr().out
        assert "--config" in out and "--print_config" in out
        assert all(arg in out for arg in argv if arg.startswith("--"))
