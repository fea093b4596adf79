"""A decision's answer, and the form it is kept in per request id so that a retry gets the
same answer (same decision id, same reservation, never a second charge), live or after a
restart. Kept answers are JSON objects, so a shared store (Redis) holds them as they are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdp.api.reasons import ReasonCode
from pdp.engine import Decision, Reason

__all__ = ["DecisionOutcome", "kept_answer", "outcome_of"]


@dataclass(frozen=True)
class DecisionOutcome:
    decision: Decision  # for a shadow run, what enforcing would have answered
    decision_id: str
    reservation_id: str = ""
    enforced: bool = True

    @property
    def forward(self) -> bool:
        """Whether the caller may go ahead: always, in shadow mode."""
        return self.decision.allow or not self.enforced

    @property
    def reason(self) -> ReasonCode | None:
        return self.decision.reasons[0].code if self.decision.reasons else None


def kept_answer(
    action: dict[str, Any],
    decision_id: str,
    reservation_id: str,
    enforced: bool,
    result: dict[str, Any],
) -> dict[str, Any]:
    """The answer kept for a request id. ``action`` is the policy input's action, so a
    request id reused for another action is told apart; ``result`` is ``Decision.as_dict``."""
    return {
        "action": action,
        "decision_id": decision_id,
        "reservation_id": reservation_id,
        "enforced": enforced,
        **result,
    }


def outcome_of(kept: dict[str, Any]) -> DecisionOutcome:
    decision = Decision(
        bool(kept["allow"]),
        tuple(
            Reason(ReasonCode(r["code"]), r["message"], r.get("evidence", {}))
            for r in kept["reasons"]
        ),
        dict(kept["obligations"]),
    )
    return DecisionOutcome(
        decision, kept["decision_id"], kept["reservation_id"], kept.get("enforced", True)
    )
