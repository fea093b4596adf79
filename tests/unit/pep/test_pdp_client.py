"""pep/pdp_client.py: an answer from the PDP is trusted only when it is well formed."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from pdp.api import ReasonCode, pdp_pb2
from pep.pdp_client import Verdict, _verdict

MODEL = pdp_pb2.Action(kind="model", target="model:openai/gpt-4o-mini")
TOOL = pdp_pb2.Action(kind="tool", target="tool:kb/search")


def _reason(code: str = "tool_not_allowed") -> pdp_pb2.Reason:
    return pdp_pb2.Reason(code=code, message="m")


def test_an_allow_with_its_obligations_and_reservation() -> None:
    obligations = struct_pb2.Struct()
    obligations.update({"max_tokens": 512})
    verdict = _verdict(
        pdp_pb2.DecideResponse(
            allow=True, decision_id="dec_1", obligations=obligations, reservation_id="rsv_1"
        ),
        MODEL,
    )
    assert verdict == Verdict(True, None, "", "dec_1", {"max_tokens": 512}, "rsv_1")


def test_a_refusal_names_its_first_reason() -> None:
    verdict = _verdict(
        pdp_pb2.DecideResponse(
            allow=False, decision_id="dec_1", reasons=[_reason(), _reason("budget_exhausted")]
        ),
        TOOL,
    )
    assert not verdict.allow and verdict.reason is ReasonCode.TOOL_NOT_ALLOWED


def test_a_shadow_answer_goes_ahead_with_the_would_be_refusal() -> None:
    verdict = _verdict(
        pdp_pb2.DecideResponse(
            allow=True, shadow=True, would_allow=False, decision_id="dec_1", reasons=[_reason()]
        ),
        TOOL,
    )
    assert verdict.allow and verdict.shadow and verdict.reason is ReasonCode.TOOL_NOT_ALLOWED


@pytest.mark.parametrize(
    "response",
    [
        pdp_pb2.DecideResponse(allow=True),
        pdp_pb2.DecideResponse(allow=True, decision_id="d", reasons=[_reason()]),
        pdp_pb2.DecideResponse(allow=False, decision_id="d"),
        pdp_pb2.DecideResponse(allow=False, shadow=True, decision_id="d", reasons=[_reason()]),
        pdp_pb2.DecideResponse(allow=True, shadow=True, would_allow=False, decision_id="d"),
        pdp_pb2.DecideResponse(allow=False, decision_id="d", reasons=[_reason("made_up")]),
    ],
    ids=[
        "no-decision-id",
        "allow-with-reasons",
        "refusal-without-reason",
        "shadow-that-refuses",
        "shadow-refusal-without-reason",
        "unknown-reason-code",
    ],
)
def test_a_malformed_answer_is_refused(response: pdp_pb2.DecideResponse) -> None:
    with pytest.raises(ValueError):
        _verdict(response, TOOL)
