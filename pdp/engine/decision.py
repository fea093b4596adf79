"""The decision document the policy returns, checked before anyone trusts it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdp.errors import ReasonCode

__all__ = ["Decision", "EngineError", "Reason", "parse_decision"]


class EngineError(Exception):
    """The policy could not decide (undefined, runtime error, malformed output): deny."""


@dataclass(frozen=True)
class Reason:
    code: ReasonCode
    message: str


@dataclass(frozen=True)
class Decision:
    allow: bool
    reasons: tuple[Reason, ...]
    obligations: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def deny(code: ReasonCode, message: str) -> Decision:
        return Decision(False, (Reason(code, message),), {})

    def as_dict(self) -> dict[str, Any]:
        """The decision as the policy writes it (and the decision log records it)."""
        return {
            "allow": self.allow,
            "reasons": [{"code": r.code.value, "message": r.message} for r in self.reasons],
            "obligations": self.obligations,
        }


def parse_decision(raw: Any) -> Decision:
    """Accept only ``{"allow": bool, "reasons": [{code, message}], "obligations": {}}``.

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
        if not isinstance(reason, dict) or set(reason) != {"code", "message"}:
            raise EngineError("a reason must be {code, message}")
        code, message = reason["code"], reason["message"]
        if not isinstance(code, str) or not isinstance(message, str):
            raise EngineError("a reason's code and message are strings")
        try:
            parsed.append(Reason(ReasonCode(code), message))
        except ValueError as exc:
            raise EngineError(f"reason code {code!r} is not in the closed set") from exc
    if allow and parsed:
        raise EngineError("an allow carries no reasons")
    if not allow and not parsed:
        raise EngineError("a denial carries at least one reason")
    return Decision(allow, tuple(parsed), obligations)
