"""The intent suggest writes keeps what it does not learn: MCP resources and prompts."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from pdp.learn.write import as_intent, check_round_trip, render_intent
from pdp.manifest.freeze import freeze
from pdp.manifest.intent import parse_intent
from tests.factories import with_resources_and_prompts

INTENT = Path(__file__).resolve().parents[4] / "deploy" / "demo" / "intent.yaml"


def test_resources_and_prompts_are_written_back_as_granted() -> None:
    text = with_resources_and_prompts(INTENT.read_text())
    manifest = freeze(parse_intent(text), "sha256:" + "0" * 64, datetime(2026, 1, 1, tzinfo=UTC))
    intent = as_intent(manifest)
    written = render_intent(intent, None, [])
    check_round_trip(written, intent)  # raises if anything was lost or changed
    parsed = parse_intent(written)
    assert [r.target for r in parsed.resources] == ["resource:kb/file:///docs/"]
    assert [p.target for p in parsed.prompts] == ["prompt:kb/summarize"]


def test_an_intent_without_them_is_written_as_before() -> None:
    manifest = freeze(
        parse_intent(INTENT.read_text()), "sha256:" + "0" * 64, datetime(2026, 1, 1, tzinfo=UTC)
    )
    written = render_intent(as_intent(manifest), None, [])
    assert "resources:" not in written and "prompts:" not in written
