"""Plain HTTP to a named upstream: decided on host (the upstream's name), method and path."""

from __future__ import annotations

from aiohttp import web

from pdp.api.mapping import http_action
from pdp.api.reasons import MappingError
from pep.adapters.base import AgentRequest, Call
from pep.pdp_client import Verdict

__all__ = ["HttpAdapter", "upstream_path"]


def upstream_path(request: AgentRequest) -> str:
    """The raw path after ``/http/<name>``, as sent (encoded dots stay visible to the policy)."""
    prefix = f"/http/{request.match_info['name']}"
    raw = request.rel_url.raw_path
    if not raw.startswith(prefix):
        raise MappingError("the upstream name must not be percent-encoded")
    return raw[len(prefix) :] or "/"


class HttpAdapter:
    route = "http"
    reads_body = False

    def call(self, request: AgentRequest, body: bytes) -> Call:
        action = http_action(request.match_info["name"], request.method, upstream_path(request))
        return Call(action=action, body=b"")

    def refusal(self, verdict: Verdict, call: Call | None, status: int) -> web.Response:
        code = verdict.reason.value if verdict.reason else "bad_request"
        return web.json_response(
            {
                "type": f"urn:abc:reason:{code}",
                "title": "Refused by the ABC sidecar",
                "status": status,
                "detail": verdict.message,
                "reason": code,
                "decision_id": verdict.decision_id,
            },
            status=status,
            content_type="application/problem+json",
            headers={"x-abc-decision-id": verdict.decision_id, "x-abc-reason": code},
        )
