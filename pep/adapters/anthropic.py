"""Anthropic Messages API (streaming included)."""

from __future__ import annotations

from aiohttp import web

from pdp.api.mapping import model_request, token_fields
from pep.adapters.base import AgentRequest, Call, model_call
from pep.pdp_client import Verdict

__all__ = ["AnthropicAdapter"]

# Anthropic's own error types for the statuses a refusal takes, so that its SDK raises the
# matching exception (NotFoundError for a route without --upstream, and so on).
_ERROR_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    502: "api_error",
    503: "api_error",
}


class AnthropicAdapter:
    route = "anthropic"
    reads_body = True

    def call(self, request: AgentRequest, body: bytes) -> Call:
        endpoint = request.match_info["tail"]
        action, document = model_request("anthropic", endpoint, body)
        return model_call(body, document, action, token_fields("anthropic", endpoint))

    def refusal(self, verdict: Verdict, call: Call | None, status: int) -> web.Response:
        code = verdict.reason.value if verdict.reason else "bad_request"
        return web.json_response(
            {
                "type": "error",
                "error": {
                    "type": _ERROR_TYPES.get(status, "permission_error"),
                    "message": f"{code}: {verdict.message} (decision {verdict.decision_id})",
                },
                "abc": {"reason": code, "decision_id": verdict.decision_id},
            },
            status=status,
            headers={"x-abc-decision-id": verdict.decision_id, "x-abc-reason": code},
        )
