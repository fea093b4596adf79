"""The README a newcomer follows: every section that shows a bare `abcctl`, `abc-pdp` or
`abc-pep` says how they get on PATH (`.venv/bin`), and the adoption section is one screen."""

from __future__ import annotations

import re

from tests.harness import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
BARE = re.compile(r"^(?:\$ )?(?:abcctl|abc-pdp|abc-pep) ", re.M)


def _sections() -> list[tuple[str, str]]:
    parts = re.split(r"^(## .*)$", README, flags=re.M)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def test_every_section_with_bare_commands_says_where_they_are() -> None:
    unexplained = [
        title
        for title, body in _sections()
        if any(
            BARE.search(block) for block in re.findall(r"```(?:sh|console)\n(.*?)```", body, re.S)
        )
        and ".venv/bin" not in body
    ]
    assert not unexplained, f"bare commands without .venv/bin in: {unexplained}"


def test_the_quick_start_says_to_activate_the_venv() -> None:
    quick_start = README.split("## ", 1)[0]
    assert ". .venv/bin/activate" in quick_start


def test_adopt_section_is_one_screen_and_covers_the_path() -> None:
    section = README.split("## Adopt it for your own agent", 1)[1].split("\n## ", 1)[0]
    assert len(section.strip().splitlines()) <= 50
    for step in (
        ".venv/bin/activate",
        "abcctl init",
        "abcctl freeze",
        "abcctl trust add",
        "abc-pdp ",
        "abc-pep ",
        'base_url="http://127.0.0.1:15001/openai/v1"',
        "abcctl audit verify",
        "abcctl explain",
        "docs/intent.md",
    ):
        assert step in section, step
