"""The README and the command line agree: every command is documented and has help."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from casstore.cli import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


COMMANDS = _commands(cli)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_is_in_the_readme_and_has_help_with_an_example(command):
    assert f"`{' '.join(command)}" in README or f"casstore {' '.join(command)}" in README, (
        f"README does not document `casstore {' '.join(command)}`"
    )
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output


def test_readme_names_no_command_that_does_not_exist():
    known = {c[0] for c in COMMANDS}
    pattern = re.compile(r"(?:^|`|; )casstore ((?:--?[\w-]+(?:[ =][^\s`-]\S*)? )*)([a-z]+)\b")
    mentioned = {m.group(2) for line in README.splitlines() for m in pattern.finditer(line)}
    assert mentioned, "the README shows no command at all"
    assert mentioned <= known, f"README mentions unknown commands: {mentioned - known}"


def test_readme_setup_commands_match_ci():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest" in README and ".venv/bin/python -m pytest" in ci
    assert "pip install -e '.[test]'" in README and "pip install -q -e '.[test]'" in ci
