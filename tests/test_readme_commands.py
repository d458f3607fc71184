"""Every command the README shows names something that exists: its ``kangaroo-lit`` subcommands and their
options (checked against each subcommand's own ``--help``), and the scripts it runs."""

import contextlib
import io
import re
import shlex
from functools import cache

import pytest

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
LIGHTNING = ("fit", "validate", "test", "predict")
ENTRY_POINTS = ("kangaroo-lit", ".venv/bin/kangaroo-lit")


def bash_commands(text: str) -> list[list[str]]:
    """The commands of the README's ```bash blocks: continuation lines joined, comments dropped, split
    at ``&&``, ``||``, ``;`` and ``|``; each as its shell words."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            current: list[str] = []
            for word in words:
                if word in ("&&", "||", ";", "|"):
                    commands.append(current)
                    current = []
                else:
                    current.append(word)
            commands.append(current)
    return [c for c in commands if c]


def kangaroo_commands() -> list[tuple[str, list[str]]]:
    """``(subcommand, its options)`` per ``kangaroo-lit`` command (``bench X`` counts as one subcommand)."""
    found = []
    for words in bash_commands(README.read_text()):
        while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
            words = words[1:]
        if not words or words[0] not in ENTRY_POINTS or len(words) < 2:
            continue
        sub = words[1]
        if sub == "bench" and len(words) > 2:
            sub = f"bench {words[2]}"
        options = sorted({w.split("=", 1)[0] for w in words[2:] if w.startswith("--")})
        found.append((sub, options))
    return found


@cache
def help_text(sub: str) -> str:
    from kangaroo_lit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*sub.split(), "--help"])
    return out.getvalue()


def test_the_readme_shows_commands():
    subs = {sub for sub, _ in kangaroo_commands()}
    assert {"fit", "export", "generate", "specbench", "pull", "self_instruct"} <= subs, subs


@pytest.mark.parametrize("sub", sorted({sub for sub, _ in kangaroo_commands()}))
def test_every_readme_command_names_a_real_subcommand_and_options(sub):
    from kangaroo_lit.cli import OWN_SUBCOMMANDS

    assert sub.split()[0] in (*LIGHTNING, *OWN_SUBCOMMANDS), f"README runs unknown subcommand {sub!r}"
    text = help_text(sub)
    assert text, f"kangaroo-lit {sub} --help printed nothing"
    options = {o for s, opts in kangaroo_commands() if s == sub for o in opts}
    missing = [o for o in sorted(options) if not re.search(re.escape(o) + r"(?![\w.])", text)
               and not (o.startswith("--no_") and f"--{o[5:]}" in text)]
    assert not missing, f"README passes options that kangaroo-lit {sub} does not have: {missing}"


def test_scripts_the_readme_runs_exist():
    for words in bash_commands(README.read_text()):
        for word in words:
            if re.fullmatch(r"(scripts|\.ci)/[\w./-]+\.(sh|py)", word) or word == ".ci/run":
                assert (REPO_ROOT / word).is_file(), f"README runs {word}, which does not exist"
