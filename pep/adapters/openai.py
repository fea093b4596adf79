"""OpenAI API (chat completions, completions, responses, embeddings; streaming included)."""

from __future__ import annotations

from aiohttp import web

from pdp.api.mapping import model_request, token_fields
from pep.adapters.base import AgentRequest, Call, model_call
from pep.pdp_client import Verdict

__all__ = ["OpenAIAdapter"]

_ERROR_TYPES = {400: "invalid_request_error", 403: "permission_error", 503: "service_unavailable"}


class OpenAIAdapter:
    route = "openai"
    reads_body = True

    def call(self, request: AgentRequest, body: bytes) -> Call:
        endpoint = request.match_info["tail"]
        action, document = model_request("openai", endpoint, body)
        return model_call(body, document, action, token_fields("openai", endpoint))

    def refusal(self, verdict: Verdict, call: Call | None, status: int) -> web.Response:
        code = verdict.reason.value if verdict.reason else "bad_request"
        return web.json_response(
            {
                "error": {
                    "message": f"{code}: {verdict.message} (decision {verdict.decision_id})",
                    "type": _ERROR_TYPES.get(status, "permission_error"),
                    "code": code,
                    "param": None,
                    "decision_id": verdict.decision_id,
                }
            },
            status=status,
            headers={"x-abc-decision-id": verdict.decision_id, "x-abc-reason": code},
        )
