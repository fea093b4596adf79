"""Envoy ``envoy.service.auth.v3.Authorization/Check`` as a front door to the one decision path.

An Envoy (or Istio) sidecar asks the PDP directly. The run comes from ``x-abc-run``, the
request id from ``x-request-id`` (Envoy sets one on every request). Requests under a
provider's path prefix, on a route tagged with that provider (``abc_route`` context
extension), are model calls mapped from the forwarded body, with the PEP's own mapping
(``pdp.api.mapping``); every other request is an ``http`` action (host, method, path).
Fail closed: no run, an unknown run, a request that cannot be mapped, a model request
whose body was not forwarded whole: each is a logged refusal, never OK.

ext_authz cannot rewrite a request body, so the obligation the PEP writes into a model
request (the manifest's ``max_tokens`` cap) cannot be applied here: a model request must
carry a ``max_tokens`` within the cap. One that asks for more is refused after its
decision, and the reservation that decision made is released (settled at 0).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from pdp.api import pdp_pb2
from pdp.api.mapping import (
    STEP_HEADER,
    cap_to_write,
    http_action,
    model_request,
    step_action,
    step_request_id,
    token_field,
)
from pdp.api.reasons import MappingError, refusal_status
from pdp.api.requests import unsafe_request
from pdp.clock import utc_now
from pdp.errors import ReasonCode
from pdp.server.servicer import MAX_ID_LENGTH, decide_wire
from pdp.service import DecisionOutcome, DecisionService

__all__ = ["SERVICE_NAME", "ExtAuthzServicer", "ModelRoutes"]

log = logging.getLogger("abc.pdp")
SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
# Envoy's marker for a body cut at max_request_bytes (allow_partial_message).
PARTIAL_BODY = "x-envoy-auth-partial-body"


@dataclass(frozen=True)
class ModelRoutes:
    """The path prefix under which each model provider's API is routed (None: no route)."""

    openai: str | None = "/openai/"
    anthropic: str | None = "/anthropic/"

    def provider(self, path: str) -> tuple[str, str] | None:
        """(provider, endpoint after ``/v1/``) for a model route's path; None otherwise."""
        for provider, prefix in (("openai", self.openai), ("anthropic", self.anthropic)):
            if prefix is not None and path.startswith(prefix):
                rest = path[len(prefix) :]
                if not rest.startswith("v1/"):
                    raise MappingError(f"{provider} requests are routed as {prefix}v1/...")
                return provider, rest[len("v1/") :]
        return None


@dataclass(frozen=True)
class _Mapped:
    action: pdp_pb2.Action
    token_field: str | None = None  # model calls: the body field the cap lives in


def _headers(http: Any) -> list[tuple[str, str]]:
    """The request's headers as pairs; Envoy sends ``header_map`` with encode_raw_headers."""
    if http.header_map.headers:
        return [
            (h.key, h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
            for h in http.header_map.headers
        ]
    return list(http.headers.items())


def _body(http: Any, headers: dict[str, str]) -> bytes:
    """The whole forwarded body, or ``MappingError``: a model is judged on all of it."""
    body = bytes(http.raw_body) if http.raw_body else http.body.encode("utf-8")
    if headers.get(PARTIAL_BODY, "").lower() == "true":
        raise MappingError("the request body was cut by max_request_bytes: raise the limit")
    if not body:
        raise MappingError("the model request's body was not forwarded: set with_request_body")
    if http.size >= 0 and http.size != len(body):
        raise MappingError("the forwarded body is not the whole request body")
    return body


def map_request(
    http: Any, headers: list[tuple[str, str]], routes: ModelRoutes, route: str = ""
) -> _Mapped:
    """One HTTP request as Envoy describes it → the action the PEP would decide for it.

    ``route`` is the ``abc_route`` context extension of the Envoy route that matched:
    ``openai`` or ``anthropic`` on a model route, ``http`` (or nothing) elsewhere. A path
    under a model prefix is a model call only on a route that says so: the path is the
    client's to write, the route (which upstream gets the request) is Envoy's to choose, and
    a model call judged on a route that sends it elsewhere would pass unjudged there.
    """
    path, _, query = http.path.partition("?")  # the path as sent, query string apart
    named = {name.lower(): value for name, value in headers}
    model = None if route == "http" else routes.provider(path)
    if route not in ("", "http") and (model is None or model[0] != route):
        raise MappingError(f"the route says {route!r}, the path is no {route} API path")
    if model is not None and not route:
        raise MappingError(
            f"a {model[0]} path on a route that is not tagged abc_route: {model[0]}"
            " (Envoy: check_settings.context_extensions): its upstream is not the model's"
        )
    unsafe = unsafe_request(
        http.method,
        path,
        headers,
        model_route=model is not None,
        raw_query=query,
        body_judged=model is not None,  # an HTTP action is decided on method and path
    )
    if unsafe is not None:
        raise MappingError(unsafe)
    if model is None:
        return _Mapped(http_action(http.host.lower(), http.method, path))
    provider, endpoint = model
    action, document = model_request(provider, endpoint, _body(http, named))
    field = token_field(endpoint, document) if provider == "openai" else "max_tokens"
    if field is not None and action.max_tokens == 0:
        # The PEP writes the manifest's cap into such a body; ext_authz cannot.
        raise MappingError(f"through ext_authz a model request must set {field}")
    return _Mapped(action, field)


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        # Overwrite: a client-sent header of the same name must not ride along.
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class ExtAuthzServicer:
    """``Authorization/Check`` over ``DecisionService.decide`` (the gRPC ``Decide``'s path)."""

    def __init__(
        self,
        service: DecisionService,
        routes: ModelRoutes,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._service = service
        self._routes = routes
        self._clock = clock

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            return self._check(request)
        except Exception:
            # A bug here must not become an OK, nor an RPC error that a misconfigured
            # Envoy (failure_mode_allow: true) would wave through.
            log.exception("ext_authz Check failed")
            return _denied(
                ReasonCode.PDP_UNAVAILABLE, "the PDP failed to decide", "authz_" + uuid.uuid4().hex
            )

    def _check(self, request: Any) -> Any:
        http = request.attributes.request.http
        headers = _headers(http)
        named = {name.lower(): value for name, value in headers}
        run_id = named.get("x-abc-run", "")
        request_id = named.get("x-request-id", "")
        if not 0 < len(request_id) <= MAX_ID_LENGTH:
            request_id = "authz_" + uuid.uuid4().hex
        now = self._clock()
        try:
            route = request.attributes.context_extensions.get("abc_route", "")
            mapped = map_request(http, headers, self._routes, route)
        except MappingError as exc:
            # Decided and logged as a refusal, like any other.
            return _refused(self._service.refuse(run_id, request_id, exc, now))
        step = named.get(STEP_HEADER)
        if step:
            # Entering a step is an action of its own, decided before the call (as the PEP does).
            moved = decide_wire(
                self._service, run_id, step_request_id(request_id), step_action(step), now
            )
            if not moved.forward:
                return _refused(moved)
        outcome = decide_wire(self._service, run_id, request_id, mapped.action, now)
        if not outcome.forward:
            return _refused(outcome)
        if mapped.token_field is not None and (
            cap_to_write(mapped.action.max_tokens, outcome.decision.obligations) is not None
        ):
            if outcome.reservation_id:
                # Nothing is forwarded: give the reserved worst case back at once.
                self._service.report_usage(outcome.reservation_id, 0, 0, now)
            cap = outcome.decision.obligations.get("max_tokens")
            return _denied(
                ReasonCode.BAD_REQUEST,
                f"{mapped.token_field} is above the manifest's cap of {cap}, which ext_authz"
                " cannot write into the body: ask for at most that",
                outcome.decision_id,
            )
        # The sidecar's own headers are its business, not the upstream's (the sidecar strips
        # them too): x-abc-run names the run to a model provider otherwise.
        ours = {name.lower() for name, _ in headers if name.lower().startswith("x-abc-")}
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_header("x-abc-decision-id", outcome.decision_id)],
                headers_to_remove=sorted(ours - {"x-abc-decision-id"}),
            ),
        )


def _refused(outcome: DecisionOutcome) -> Any:
    reason = outcome.reason or ReasonCode.BAD_REQUEST
    message = outcome.decision.reasons[0].message if outcome.decision.reasons else ""
    return _denied(reason, message, outcome.decision_id)


def _denied(reason: ReasonCode, message: str, decision_id: str) -> Any:
    """Envoy answers the client with this status, these headers and this body."""
    status = refusal_status(reason)
    body = {
        "type": f"urn:abc:reason:{reason.value}",
        "title": "Refused by ABC",
        "status": status,
        "detail": message,
        "reason": reason.value,
        "decision_id": decision_id,
    }
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=reason.value),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=[
                _header("x-abc-reason", reason.value),
                _header("x-abc-decision-id", decision_id),
                _header("content-type", "application/problem+json"),
            ],
            body=json.dumps(body),
        ),
    )
