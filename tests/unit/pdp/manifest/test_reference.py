"""docs/intent.md is generated from the intent's models: up to date, and every field real."""

from __future__ import annotations

import re
from pathlib import Path

from pdp.manifest.intent import _model_at, parse_intent
from pdp.manifest.reference import example_intent, render_reference

DOC = Path(__file__).resolve().parents[4] / "docs" / "intent.md"


def _loc(where: str) -> tuple[int | str, ...]:
    """``tools[].args.NAME`` -> ("tools", 0, "args", "NAME"): a path into an intent."""
    if where == "(top level)":
        return ()
    loc: list[int | str] = []
    for part in where.split("."):
        loc.append(part.removesuffix("[]"))
        if part.endswith("[]"):
            loc.append(0)
    return tuple(loc)


def _documented() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## ") and line != "## Example":
            current = line[3:]
            sections[current] = []
        elif current and (row := re.match(r"\| `([^`]+)` \|", line)):
            sections[current].append(row.group(1))
    return sections


def test_reference_is_up_to_date() -> None:
    assert DOC.read_text() == render_reference(), (
        "docs/intent.md is stale: python -m pdp.manifest.reference > docs/intent.md"
    )


def test_every_documented_field_exists_and_every_field_is_documented() -> None:
    sections = _documented()
    assert len(sections) == 10 and all(sections.values())
    for where, fields in sections.items():
        # Resolved by walking the Intent model, not by the generator's own table.
        model = _model_at(_loc(where))
        assert model is not None, where
        assert fields == list(model.model_fields), where
    assert "max_tokens_per_call" in sections["models[]"]
    assert "maxLength" in sections["tools[].args.NAME"]


def test_the_documented_example_parses() -> None:
    intent = parse_intent(example_intent(), "docs/intent.md")
    assert intent.lineage_name == "acme/my-agent"
    assert "```yaml\n" + example_intent() in DOC.read_text()
