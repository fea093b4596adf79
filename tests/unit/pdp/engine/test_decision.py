"""The policy's output is checked before it is trusted."""

from __future__ import annotations

import pytest

from pdp.engine.decision import EngineError, parse_decision
from pdp.errors import ReasonCode


def test_valid_denial() -> None:
    decision = parse_decision(
        {
            "allow": False,
            "reasons": [{"code": "tool_not_allowed", "message": "m"}],
            "obligations": {},
        }
    )
    assert not decision.allow
    assert decision.reasons[0].code is ReasonCode.TOOL_NOT_ALLOWED


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {"allow": True},
        {"allow": "yes", "reasons": [], "obligations": {}},
        {"allow": False, "reasons": [], "obligations": {}},
        {"allow": True, "reasons": [{"code": "bad_request", "message": "m"}], "obligations": {}},
        {"allow": False, "reasons": [{"code": "made_up_code", "message": "m"}], "obligations": {}},
        {"allow": False, "reasons": [{"code": "bad_request"}], "obligations": {}},
        {"allow": True, "reasons": [], "obligations": []},
        {"allow": True, "reasons": [], "obligations": {}, "extra": 1},
    ],
    ids=[
        "undefined",
        "missing-fields",
        "allow-not-bool",
        "denial-without-reason",
        "allow-with-reason",
        "unknown-code",
        "reason-without-message",
        "obligations-not-object",
        "extra-field",
    ],
)
def test_malformed_decisions_are_engine_errors(raw: object) -> None:
    with pytest.raises(EngineError):
        parse_decision(raw)
