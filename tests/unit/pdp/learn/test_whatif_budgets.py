"""A what-if reserves a model call as the PDP does: one formula (``worst_case_tokens``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pdp.api.cost import worst_case_tokens
from pdp.decisionlog import DecisionRecord
from pdp.learn.whatif_budgets import reservation

NOW = datetime(2026, 12, 3, 12, tzinfo=UTC)
ALLOW: dict[str, Any] = {"allow": True, "reasons": []}


def _model_call(asked: int, prompt: int, answer: dict[str, Any], enforced: bool) -> DecisionRecord:
    """A logged model call, its cost reserved as the PDP reserves it."""
    tokens = worst_case_tokens(answer.get("obligations") or {}, asked, prompt)
    return DecisionRecord(
        time=NOW,
        decision_id="dec_1",
        request_id="r-1",
        run_id="run_1",
        manifest_digest="sha256:m",
        policy_digest="sha256:p",
        input={"action": {"kind": "model", "target": "model:openai/gpt-4o", "max_tokens": asked}},
        result=answer,
        policy_result=answer,
        reservation_id="res_1",
        cost={"tokens": tokens, "usd_micros": 0, "tool_calls": 0, "requests": 1},
        expires=NOW,
        enforced=enforced,
    )


def test_a_shadow_call_refused_then_is_reserved_once_when_allowed_now() -> None:
    refused = {
        "allow": False,
        "reasons": [{"code": "model_not_allowed", "message": "not declared"}],
        "obligations": {},
    }
    record = _model_call(300, 128, refused, enforced=False)
    assert record.cost is not None and record.cost["tokens"] == 428
    # The candidate declares the model with a cap of 300: the same 428, not 300 counted twice.
    now = {**ALLOW, "obligations": {"max_tokens": 300}}
    assert reservation(record, now).tokens == 428


def test_a_candidate_cap_replaces_the_logged_one() -> None:
    capped = {**ALLOW, "obligations": {"max_tokens": 300}}
    record = _model_call(500, 128, capped, enforced=True)
    assert record.cost is not None and record.cost["tokens"] == 428
    assert reservation(record, {**ALLOW, "obligations": {"max_tokens": 100}}).tokens == 228
    # No cap obliged now: the call reserves what it asked for, as the PDP would.
    assert reservation(record, {**ALLOW, "obligations": {}}).tokens == 628


def test_other_calls_reserve_what_they_reserved() -> None:
    record = _model_call(10, 5, {**ALLOW, "obligations": {}}, enforced=True)
    tool = record.model_copy(
        update={"input": {"action": {"kind": "tool", "target": "tool:kb/search", "args": {}}}}
    )
    assert reservation(tool, ALLOW).as_dict() == tool.cost
