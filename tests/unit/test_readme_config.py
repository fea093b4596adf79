"""The README's configuration tables say what ``abc-pdp --help`` and ``abc-pep --help`` say.

Every flag is in its table with its environment variable and its default, and the tables
name no flag that does not exist, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import re

import pytest

from pdp.server.config import build_parser as pdp_parser
from pep.config import build_parser as pep_parser
from tests.harness import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def table_rows(program: str) -> list[list[str]]:
    """The cells of the table that follows the "`program` (" line under ### Configuration."""
    section = README.split("### Configuration", 1)[1]
    after = section.split(f"\n`{program}` (", 1)[1]
    rows = []
    for line in after.split("\n\n", 2)[1].splitlines():
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] not in ("flag", "---"):
            rows.append(cells)
    return rows


def flags_in(cell: str) -> set[str]:
    return set(re.findall(r"`(--[a-z][a-z-]*)[` ]", cell))


def documented(action: argparse.Action) -> tuple[str, str, str | None]:
    """(flag, env, default) as --help shows them."""
    text = action.help or ""
    env = re.search(r"\(env (ABC_[A-Z_]+)", text)
    default = re.search(r"\(env ABC_[A-Z_]+, default ([^)]+)\)", text)
    assert env, f"{action.option_strings}: --help names no environment variable"
    return max(action.option_strings, key=len), env.group(1), default and default.group(1)


@pytest.mark.parametrize(
    ("program", "parser"),
    [("abc-pdp", pdp_parser({})), ("abc-pep", pep_parser({}))],
    ids=["abc-pdp", "abc-pep"],
)
def test_every_flag_is_in_the_readme_with_its_env_and_default(
    program: str, parser: argparse.ArgumentParser
) -> None:
    rows = table_rows(program)
    assert rows, f"no configuration table for {program}"
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    for flag, env, default in map(documented, actions):
        matching = [row for row in rows if flag in flags_in(row[0])]
        assert len(matching) == 1, f"{program} {flag}: {len(matching)} README rows"
        row = matching[0]
        assert f"`{env}`" in row[1], f"{program} {flag}: README env {row[1]!r}, --help {env}"
        if default is not None:
            assert f"`{default}`" in row[2], (
                f"{program} {flag}: README default {row[2]!r}, --help {default}"
            )
    listed = set().union(*(flags_in(row[0]) for row in rows))
    assert listed == {documented(a)[0] for a in actions}, "README rows for flags that do not exist"
