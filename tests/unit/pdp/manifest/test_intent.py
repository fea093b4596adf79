"""Intent YAML: the demo intent loads; mistakes are reported at their line and column."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pdp.manifest import Manifest
from pdp.manifest.freeze import freeze
from pdp.manifest.intent import IntentError, load_intent, parse_intent
from tests.factories import with_resources_and_prompts

DEMO = Path(__file__).resolve().parents[4] / "deploy" / "demo" / "intent.yaml"
TEXT = DEMO.read_text()


def test_demo_intent_loads() -> None:
    intent = load_intent(DEMO)
    assert intent.lineage_name == "acme/support-bot"
    assert intent.capabilities.targets() >= {"tool:kb/search", "model:openai/gpt-4o-mini"}
    assert [step.id for step in intent.steps] == ["research", "answer"]


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    ("old", "new", "needle", "message"),
    [
        ("maxLength: 200", "maxLength: 2.5", "maxLength: 2.5", "tools[0].args.query.maxLength"),
        ("tokens: 200000", "tokens: many", "tokens: many", "budgets.tokens"),
        ("usd_micros: 5000000", "usd_micros: 5.0", "usd_micros: 5.0", "budgets.usd_micros"),
        ("lifetime: 8h", "lifetime: 90d", "lifetime: 90d", "over the maximum"),
        ("lifetime: 8h", "lifetime: forever", "lifetime: forever", "lifetime"),
        ("after: [research]", "after: [answer]", "after: [answer]", "not an earlier step"),
        (
            "uses: [model:openai/gpt-4o-mini, model:anthropic",
            "uses: [model:openai/gpt-5, model:anthropic",
            "model:openai/gpt-5",
            "not a declared capability",
        ),
        ("path_prefix: /v1/invoices/", "path_prefix: /v1/../admin", "/v1/../admin", "'..'"),
        ("methods: [GET]", "methods: [YEET]", "methods: [YEET]", "http[0].methods[0]"),
        ('pattern: "^KB-[0-9]{1,8}$"', 'pattern: "(["', 'pattern: "(["', "does not compile"),
        ("version: 1", "version: 0", "version: 0", "version"),
        ("version: 1", "version: [1", "goal:", "flow sequence at line 8"),
        ("tokens: 200000", "tokens: 200000\n  tokens: 1", "tokens: 1", "duplicate key"),
        ("agent: support-bot", "agent: support-bot\nsurprise: 1", "surprise: 1", "surprise"),
        ("lineage: acme/support-bot", "lineage: globex/support-bot", "lineage: globex", "tenant"),
    ],
    ids=[
        "float-constraint",
        "string-budget",
        "float-money",
        "lifetime-too-long",
        "lifetime-format",
        "step-after-itself",
        "undeclared-capability",
        "dot-dot-prefix",
        "bad-method",
        "bad-pattern",
        "version-zero",
        "broken-yaml",
        "duplicate-key",
        "unknown-field",
        "lineage-of-another-tenant",
    ],
)
def test_errors_point_at_the_line(old: str, new: str, needle: str, message: str) -> None:
    text = TEXT.replace(old, new, 1)
    assert text != TEXT
    with pytest.raises(IntentError) as caught:
        parse_intent(text, "intent.yaml")
    error = str(caught.value)
    assert error.startswith(f"intent.yaml:{_line_of(text, needle)}:"), error
    assert message in error


def test_timestamps_stay_strings_and_are_checked() -> None:
    text = TEXT.replace("lifetime: 8h", "lifetime: 8h\nnot_before: 2026-11-22")
    with pytest.raises(IntentError, match="not_before"):
        parse_intent(text, "intent.yaml")
    ok = parse_intent(
        TEXT.replace("lifetime: 8h", "lifetime: 8h\nnot_before: 2026-11-22T10:00:00Z")
    )
    assert ok.not_before == "2026-11-22T10:00:00Z"


def test_duplicate_capability_refused() -> None:
    text = TEXT.replace("name: fetch_article", "name: search")
    with pytest.raises(IntentError, match="declared twice"):
        parse_intent(text, "intent.yaml")


@pytest.mark.parametrize("text", ["", "- a list", "just a string"], ids=["empty", "list", "scalar"])
def test_not_a_mapping(text: str) -> None:
    with pytest.raises(IntentError):
        parse_intent(text, "intent.yaml")


def test_no_steps_means_nothing_to_do() -> None:
    head = TEXT[: TEXT.index("steps:")]
    with pytest.raises(IntentError, match="steps"):
        parse_intent(head + "steps: []\n", "intent.yaml")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(IntentError, match="cannot read"):
        load_intent(tmp_path / "missing.yaml")


def test_every_error_reported_typos_named_with_the_closest_key() -> None:
    text = (
        TEXT.replace("max_tokens_per_call: 2048", "max_token_per_call: 2048")
        .replace("maxLength: 200", "maxLenght: 200")
        .replace("tool_calls: 100", "tool_calls: many")
    )
    with pytest.raises(IntentError) as caught:
        parse_intent(text, "intent.yaml")
    lines = str(caught.value).splitlines()
    assert "more)" not in str(caught.value)
    # The unknown keys come first (they explain the "Field required" that follows), each at
    # its own line and with the field it most likely meant.
    line = _line_of(text, "max_token_per_call")
    assert lines[0].startswith(f"intent.yaml:{line}:"), lines
    assert lines[0].endswith(
        "models[0].max_token_per_call: unknown key 'max_token_per_call'"
        " (did you mean max_tokens_per_call?)"
    )
    assert (
        "tools[0].args.query.maxLenght: unknown key 'maxLenght' (did you mean maxLength?)"
        in (lines[1])
    )
    rest = "\n".join(lines[2:])
    assert "models[0].max_tokens_per_call: Field required" in rest
    assert f"intent.yaml:{_line_of(text, 'tool_calls: many')}:" in rest
    assert "budgets.tool_calls" in rest
    assert len(lines) == 4


def test_unknown_top_level_key_without_a_close_match_lists_the_known_ones() -> None:
    with pytest.raises(IntentError) as caught:
        parse_intent(TEXT + "zzz: 1\n", "intent.yaml")
    assert "zzz: unknown key 'zzz' (known: apiVersion, kind, tenant," in str(caught.value)


def test_resources_and_prompts_are_capabilities_a_step_may_use() -> None:
    from datetime import UTC, datetime

    from pdp.manifest.freeze import freeze

    text = with_resources_and_prompts(TEXT)
    manifest = freeze(parse_intent(text), "sha256:" + "0" * 64, datetime(2026, 1, 1, tzinfo=UTC))
    granted = manifest.document()["capabilities"]
    assert granted["resources"] == [{"server": "kb", "uri_prefix": "file:///docs/"}]
    assert granted["prompts"] == [{"server": "kb", "name": "summarize"}]
    # A manifest that grants none reads, and so signs, exactly as before they existed.
    plain = freeze(parse_intent(TEXT), "sha256:" + "0" * 64, datetime(2026, 1, 1, tzinfo=UTC))
    assert {"resources", "prompts"}.isdisjoint(plain.document()["capabilities"])


def test_a_step_cannot_use_a_resource_the_manifest_does_not_grant() -> None:
    text = TEXT.replace(
        "uses: [model:openai/gpt-4o-mini, tool:kb/search,",
        "uses: [model:openai/gpt-4o-mini, resource:kb/file:///, tool:kb/search,",
    )
    with pytest.raises(IntentError, match="not a declared capability"):
        parse_intent(text)


def test_fleet_limits_are_optional_and_a_manifest_without_them_reads_as_before() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    plain = freeze(parse_intent(TEXT, "intent.yaml"), "sha256:" + "0" * 64, now)
    assert plain.fleet is None and "fleet" not in plain.document()
    text = TEXT + "fleet:\n  requests: 4000\n  runs: 100\n"
    limited = freeze(parse_intent(text, "intent.yaml"), "sha256:" + "0" * 64, now)
    assert limited.document()["fleet"] == {"requests": 4000, "runs": 100}
    assert Manifest.model_validate_json(json.dumps(limited.document())) == limited  # reads back
    with pytest.raises(IntentError, match=r"fleet\.runs"):
        parse_intent(TEXT + "fleet:\n  runs: 0\n", "intent.yaml")
    with pytest.raises(IntentError, match=r"fleet\.seats"):
        parse_intent(TEXT + "fleet:\n  seats: 3\n", "intent.yaml")
