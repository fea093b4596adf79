"""``GET /openai/v1/models`` and ``GET /anthropic/v1/models``, answered from the manifest.

Agent frameworks list models at start-up to check the name they were configured with. The
answer is the models the bound manifest grants on that route: what the agent may call,
never what the provider would list. Nothing goes upstream and nothing is charged: a list
of names the signed manifest already holds is no action to decide. Only a sidecar bound
with ``--manifest`` knows them; any other sidecar refuses the request as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from aiohttp import web

from pdp.manifest.envelope import parse_envelope
from pdp.manifest.model import Manifest, format_timestamp, parse_timestamp

__all__ = ["GrantedModels", "granted_models", "models_list"]

# route -> the model names the manifest grants there, and when it was issued
GrantedModels = dict[str, tuple[tuple[str, ...], datetime]]


def granted_models(envelope: bytes) -> GrantedModels:
    """The models of an envelope the PDP has just accepted (so its payload is the verified one)."""
    manifest = Manifest.model_validate_json(parse_envelope(envelope).unverified_payload)
    issued = parse_timestamp(manifest.metadata.issued_at)
    return {
        route: (
            tuple(m.model for m in manifest.capabilities.models if m.provider == route),
            issued,
        )
        for route in ("openai", "anthropic")
    }


def _openai(names: tuple[str, ...], issued: datetime) -> dict[str, object]:
    created = int(issued.timestamp())
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "abc-manifest"}
            for name in names
        ],
    }


def _anthropic(names: tuple[str, ...], issued: datetime) -> dict[str, object]:
    created = format_timestamp(issued)
    return {
        "data": [
            {"type": "model", "id": name, "display_name": name, "created_at": created}
            for name in names
        ],
        "has_more": False,
        "first_id": names[0] if names else None,
        "last_id": names[-1] if names else None,
    }


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def models_list(
    route: str,
    granted: GrantedModels | None,
    otherwise: Handler,
    count: Callable[[str, str], None],
) -> Handler:
    """The handler of ``GET /<route>/v1/models``; ``otherwise`` when no manifest is bound.

    Counted as ``pass`` (answered without a decision), like MCP session traffic."""
    render = _openai if route == "openai" else _anthropic

    async def handle(request: web.Request) -> web.StreamResponse:
        # Any query (Anthropic's limit, after_id) gets the whole list: it is one short page.
        if granted is None or request.method != "GET":
            return await otherwise(request)
        names, issued = granted[route]
        count(route, "pass")
        return web.json_response(render(names, issued))

    return handle
