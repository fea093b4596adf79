"""The decision document the policy returns, checked before anyone trusts it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdp.errors import ReasonCode

__all__ = ["Decision", "EngineError", "Reason", "parse_decision"]


_REASON_KEYS = {"code", "message", "evidence"}


class EngineError(Exception):
    """The policy could not decide (undefined, runtime error, malformed output): deny."""


@dataclass(frozen=True)
class Reason:
    code: ReasonCode
    message: str
    # What the reason was checked against (capability, step, argument and constraint, or
    # the closest names for an unknown one), as the policy wrote it. Never a label.
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        reason: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.evidence:
            reason["evidence"] = self.evidence
        return reason


@dataclass(frozen=True)
class Decision:
    allow: bool
    reasons: tuple[Reason, ...]
    obligations: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def deny(code: ReasonCode, message: str, evidence: dict[str, Any] | None = None) -> Decision:
        return Decision(False, (Reason(code, message, evidence or {}),), {})

    def as_dict(self) -> dict[str, Any]:
        """The decision as the policy writes it (and the decision log records it)."""
        return {
            "allow": self.allow,
            "reasons": [r.as_dict() for r in self.reasons],
            "obligations": self.obligations,
        }


def parse_decision(raw: Any) -> Decision:
    """Accept only ``{"allow": bool, "reasons": [{code, message, evidence?}], "obligations": {}}``.

    A reason code outside the closed set, or an allow that carries reasons, is an
    engine error: a policy bug must not become a label value or an allow.
    """
    if not isinstance(raw, dict) or set(raw) != {"allow", "reasons", "obligations"}:
        raise EngineError("decision is not {allow, reasons, obligations}")
    allow, reasons, obligations = raw["allow"], raw["reasons"], raw["obligations"]
    if not isinstance(allow, bool) or not isinstance(reasons, list):
        raise EngineError("decision.allow must be a boolean and decision.reasons a list")
    if not isinstance(obligations, dict):
        raise EngineError("decision.obligations must be an object")
    parsed: list[Reason] = []
    for reason in reasons:
        if not isinstance(reason, dict) or not {"code", "message"} <= set(reason) <= _REASON_KEYS:
            raise EngineError("a reason must be {code, message} with an optional evidence")
        code, message = reason["code"], reason["message"]
        evidence = reason.get("evidence", {})
        if not isinstance(code, str) or not isinstance(message, str):
            raise EngineError("a reason's code and message are strings")
        if not isinstance(evidence, dict):
            raise EngineError("a reason's evidence is an object")
        try:
            parsed.append(Reason(ReasonCode(code), message, evidence))
        except ValueError as exc:
            raise EngineError(f"reason code {code!r} is not in the closed set") from exc
    if allow and parsed:
        raise EngineError("an allow carries no reasons")
    if not allow and not parsed:
        raise EngineError("a denial carries at least one reason")
    return Decision(allow, tuple(parsed), obligations)
