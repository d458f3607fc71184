"""The own subcommands' scaffold: a parser from a signature or a dataclass, and errors.py's contract.

Every ``KangarooError`` is one ``error:`` line and exit code 2 (its traceback too with ``KANGAROO_DEBUG``
set, not ``0``); every other exception is a bug and propagates with its traceback.
"""

from dataclasses import dataclass

import pytest

from kangaroo_lit import cli_scaffold
from kangaroo_lit.errors import ConfigError


def command(name: str, count: int = 2, note: str | None = None, verbose: bool = False, color: bool = True) -> int:
    """A command.

    Args:
        name: what to greet.
        count: how often.
        note: free text.
        verbose: say more.
        color: colour the output.
    """
    return 0


@dataclass(frozen=True)
class Options:
    """Options.

    Args:
        name: what to greet.
        quiet: say less.
    """

    name: str = "x"
    quiet: bool = False


def test_a_function_signature_becomes_the_parser(capsys):
    parser = cli_scaffold.build_parser(command, "kangaroo-lit demo", text=("note",))
    parse = lambda *argv: cli_scaffold.parse(parser, list(argv))  # noqa: E731
    assert parse("--name", "a") == {"name": "a", "count": 2, "note": None, "verbose": False, "color": True}
    # switches: bare, with a value, or negated
    assert parse("--name", "a", "--verbose")["verbose"] is True
    assert parse("--name", "a", "--verbose", "false")["verbose"] is False
    assert parse("--name", "a", "--no_color")["color"] is False
    # text options are never YAML, and empty differs from absent
    assert parse("--name", "a", "--note", "null")["note"] == "null"
    assert parse("--name", "a", "--note", "")["note"] == ""
    with pytest.raises(SystemExit):
        parse("--name", "a", "--help")
    help_text = capsys.readouterr().out
    assert "colour the output" in help_text and "--print_config" in help_text and "--no_verbose" in help_text


def test_a_dataclass_becomes_the_parser():
    parser = cli_scaffold.build_parser(Options, "kangaroo-lit demo")
    assert cli_scaffold.parse(parser, ["--quiet"]) == {"name": "x", "quiet": True}


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    def refuse():
        raise ConfigError("--count must be >= 1")

    monkeypatch.delenv("KANGAROO_DEBUG", raising=False)
    assert cli_scaffold.run_reporting(refuse) == 2
    assert capsys.readouterr().err == "error: --count must be >= 1\n"
    monkeypatch.setenv("KANGAROO_DEBUG", "0")  # off, as unset
    assert cli_scaffold.run_reporting(refuse) == 2
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("KANGAROO_DEBUG", "1")
    assert cli_scaffold.run_reporting(refuse) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: --count must be >= 1\n")
    with pytest.raises(ValueError, match="a bug"):  # not a KangarooError: not the user's to fix
        cli_scaffold.run_reporting(lambda: int("a bug"))
    assert cli_scaffold.run_reporting(lambda: {"rows": 3}) == 0  # a benchmark's summary is not an exit code
    assert cli_scaffold.run_reporting(lambda: 3) == 3
