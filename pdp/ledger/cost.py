"""What an allowed action may spend at worst: reserved before it is forwarded, settled with
real usage (or at this worst case when usage is never reported)."""

from __future__ import annotations

from pdp.action import Action
from pdp.api.cost import worst_case_tokens
from pdp.engine import Decision
from pdp.ledger.store import Usage

__all__ = ["cost_of"]


def cost_of(action: Action, decision: Decision) -> Usage:
    """The worst case an allowed action may spend, reserved before it is forwarded."""
    if action.kind == "model":
        # Settled with real usage; the PEP settles unread usage with the same formula.
        tokens = worst_case_tokens(decision.obligations, action.max_tokens, action.input_bytes)
        return Usage(tokens=tokens, requests=1)
    if action.kind == "tool":
        return Usage(tool_calls=1, requests=1)
    if action.kind in ("http", "resource", "prompt"):
        return Usage(requests=1)
    return Usage()
