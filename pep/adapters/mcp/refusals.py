"""How the sidecar refuses an MCP request, in each revision.

- A ``tools/call`` the decision refused (policy, budget, run state, no decision to be had)
  answers as the tool's result with ``isError: true``: the current spec's channel for an
  error the model should see and recover from. Its text names the reason and the decision
  id, which ``_meta`` carries too (``abc/reason``, ``abc/decision_id``). A 2026-07-28
  request gets ``resultType: "complete"`` as that revision requires.
- Anything else is a JSON-RPC error, with ``data.reason`` and ``data.decision_id``: a
  protocol problem keeps the standard code that names it, a refused list, resource or
  prompt has ``REFUSED``. No code is one an SDK reads as retryable (-32000 connection
  closed, -32001 request timeout): a refusal sent again is refused again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdp.api import ReasonCode
from pep.pdp_client import Verdict

__all__ = [
    "HEADER_MISMATCH",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "REFUSED",
    "UNSUPPORTED_VERSION",
    "McpRequest",
    "refusal_message",
]

INVALID_REQUEST = -32600  # not a JSON-RPC request the sidecar can read
METHOD_NOT_FOUND = -32601  # a method the sidecar does not govern (so never forwards)
INVALID_PARAMS = -32602  # a governed method whose params cannot be judged as sent
INTERNAL_ERROR = -32603  # no decision could be had (the PDP is unavailable)
HEADER_MISMATCH = -32020  # 2026-07-28: a routing header disagrees with the body
UNSUPPORTED_VERSION = -32022  # 2026-07-28: a protocol version the sidecar does not speak
REFUSED = -32003  # refused by policy (server-defined; no SDK gives it a meaning)


@dataclass(frozen=True)
class McpRequest:
    """What a refusal must know of the request it answers."""

    id: Any  # None: no request to answer (a notification, a client's response, a GET)
    method: str = ""
    modern: bool = False  # 2026-07-28 envelope
    code: int | None = None  # a protocol problem found before any decision
    data: dict[str, Any] | None = None  # what that code's error data must carry besides


def _text(verdict: Verdict) -> tuple[str, str]:
    reason = verdict.reason.value if verdict.reason else ReasonCode.BAD_REQUEST.value
    return reason, f"{reason}: {verdict.message} (decision {verdict.decision_id})"


def _code(verdict: Verdict, request: McpRequest) -> int:
    if request.code is not None:
        return request.code
    if verdict.reason is ReasonCode.PDP_UNAVAILABLE:
        return INTERNAL_ERROR
    if verdict.reason in (ReasonCode.BAD_REQUEST, None):
        return INVALID_REQUEST
    return REFUSED


def refusal_message(verdict: Verdict, request: McpRequest) -> dict[str, Any]:
    """The JSON-RPC message that refuses ``request``."""
    reason, text = _text(verdict)
    ids = {"reason": reason, "decision_id": verdict.decision_id}
    if request.method == "tools/call" and request.code is None:
        result: dict[str, Any] = {
            "content": [{"type": "text", "text": f"Refused by policy: {text}"}],
            "isError": True,
            "_meta": {"abc/reason": reason, "abc/decision_id": verdict.decision_id},
        }
        if request.modern:
            result["resultType"] = "complete"
        return {"jsonrpc": "2.0", "id": request.id, "result": result}
    error: dict[str, Any] = {"code": _code(verdict, request), "message": text, "data": ids}
    if request.data:
        error["data"] = {**ids, **request.data}
    return {"jsonrpc": "2.0", "id": request.id, "error": error}
