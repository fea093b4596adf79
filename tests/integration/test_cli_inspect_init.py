"""``abcctl inspect`` shows all a manifest grants; ``abcctl init`` writes an intent that freezes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.integration.test_cli import INTENT, POLICIES, Setup, abcctl, setup

__all__ = ["setup"]  # the fixture, shared with test_cli


def _signed_manifest(envelope: Path) -> dict[str, object]:
    document = json.loads(envelope.read_text())
    manifest: dict[str, object] = json.loads(base64.b64decode(document["payload"]))
    return manifest


def test_inspect_text_shows_caps_constraints_methods_prefixes(setup: Setup) -> None:
    shown = abcctl("inspect", setup.envelope)
    assert shown.code == 0, shown.err
    out = shown.out
    assert "model:openai/gpt-4o-mini max_tokens_per_call=2048" in out
    assert "model:anthropic/claude-haiku-4-5 max_tokens_per_call=1024" in out
    assert "query: string required maxLength=200" in out
    assert "top_k: integer minimum=1 maximum=20" in out
    assert 'article_id: string required pattern="^KB-[0-9]{1,8}$"' in out
    assert "http:billing.internal GET /v1/invoices/*" in out
    assert "step         answer after research: model:openai/gpt-4o-mini" in out
    assert "tokens=200000 usd_micros=5000000 tool_calls=100 requests=500" in out


def test_inspect_json_holds_every_signed_grant(setup: Setup) -> None:
    summary = json.loads(abcctl("inspect", setup.envelope, "--json").out)
    signed = _signed_manifest(setup.envelope)
    capabilities = signed["capabilities"]
    assert isinstance(capabilities, dict)
    for kind in ("models", "tools", "http"):
        # Every field of every capability, as signed, plus its target name.
        shown = [{k: v for k, v in c.items() if k != "target"} for c in summary[kind]]
        assert shown == capabilities[kind], kind
    assert summary["steps"] == signed["assembly"]["steps"]  # type: ignore[index]
    assert summary["budgets"] == signed["budgets"]
    search = next(t for t in summary["tools"] if t["target"] == "tool:kb/search")
    assert search["args"]["query"] == {"type": "string", "required": True, "maxLength": 200}
    assert summary["http"][0]["methods"] == ["GET"]
    assert summary["http"][0]["path_prefix"] == "/v1/invoices/"


def test_init_writes_a_commented_intent_that_freezes_as_is(setup: Setup) -> None:
    intent = setup.dir / "mine.yaml"
    written = abcctl("init", intent, "--tenant", "acme", "--agent", "helper")
    assert written.code == 0, written.err
    text = intent.read_text()
    assert text.count("\n#") >= 5, "the starting intent explains its fields"
    assert "docs/intent.md" in text
    envelope = setup.dir / "mine.json"
    frozen = abcctl("freeze", intent, "--key", setup.key, "--policies", POLICIES, "-o", envelope)
    assert frozen.code == 0, frozen.err
    assert "acme/helper v1" in frozen.out
    assert abcctl("verify", envelope, "--trust", setup.trust).code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "exists; pass --force"),
        (("--force", "--tenant", "bad tenant"), "tenant"),
    ],
    ids=["no-overwrite", "bad-name"],
)
def test_init_mistakes_are_one_line(setup: Setup, args: tuple[str, ...], message: str) -> None:
    target = setup.dir / "intent.yaml"
    target.write_text(INTENT.read_text())
    result = abcctl("init", target, *args)
    assert result.code == 1
    assert result.err.startswith("abcctl: error:") and message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1
    assert target.read_text() == INTENT.read_text(), "nothing replaced"
