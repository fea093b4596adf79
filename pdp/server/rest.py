"""OPA's REST Data API, the part a decision client uses, as a front door to the one decision path.

- ``POST /v1/data/abc/authz/decision`` with ``{"input": {"run_id", "request_id", "action"}}``
  answers what ``Decide`` answers, as ``{"result": {...}, "decision_id": ...}``;
  ``/v1/data/abc/authz/allow`` answers the boolean alone. Both call
  ``DecisionService.decide``: the same decision, budget charge, log record and metrics
  as the gRPC door. Any other data path is an undefined document (``{}``), as in OPA.
- ``GET /health``: 200 only while the PDP is SERVING (the gRPC health status's twin).
- ``GET /v1/policies[/ID]``: the loaded bundle's ``.rego`` files and its digest, read-only.
- Writes (``PUT``/``PATCH``/``DELETE`` of policies or data, ``POST`` of policies) are
  refused: a policy changes only through a new bundle digest pinned by a signed manifest.

Errors have OPA's shape, ``{"code", "message"}``, plus ABC's ``reason`` (and the
``decision_id`` when a decision was made and logged). The server is aiohttp on its own
thread and event loop beside the threaded gRPC server; ``decide`` blocks (it waits for
its log record's fsync), so it runs on a thread pool, never on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from aiohttp import web

from pdp.action import action_from_json
from pdp.api.bodies import read_body
from pdp.api.reasons import MappingError, refusal_status
from pdp.api.requests import parse_json_object
from pdp.clock import utc_now
from pdp.errors import AbcError, BadRequest, ConfigError, ReasonCode
from pdp.manifest.canonical import digest
from pdp.server.servicer import MAX_ID_LENGTH
from pdp.service import DecisionOutcome, DecisionService

__all__ = ["MAX_BODY_BYTES", "RestServer", "build_app"]

log = logging.getLogger("abc.pdp")

# A decision input is small: 64 KiB of tool arguments at most, plus ids and framing.
MAX_BODY_BYTES = 256 * 1024
DECISION = "/v1/data/abc/authz/decision"
ALLOW = "/v1/data/abc/authz/allow"
_INPUT_FIELDS = frozenset({"run_id", "request_id", "action"})
_PACKAGE = re.compile(rb"^package\s+([A-Za-z_][A-Za-z0-9_.]*)", re.MULTILINE)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(
    status: int,
    code: str,
    message: str,
    reason: ReasonCode | None = None,
    decision_id: str = "",
) -> web.Response:
    """OPA's error document; ABC's reason code (and decision id) alongside."""
    body: dict[str, Any] = {"code": code, "message": message}
    if reason is not None:
        body["message"] = f"{reason.value}: {message}"
        body["reason"] = reason.value
    if decision_id:
        body["decision_id"] = decision_id
    return web.json_response(body, status=status)


def _bad_input(message: str, status: int = 400) -> web.Response:
    return _error(status, "invalid_parameter", message, ReasonCode.BAD_REQUEST)


class _Door:
    """The handlers, over one ``DecisionService``."""

    def __init__(
        self,
        service: DecisionService,
        serving: threading.Event,
        executor: ThreadPoolExecutor,
        clock: Callable[[], datetime],
    ) -> None:
        self.service = service
        self.serving = serving
        self.executor = executor
        self.clock = clock
        self.in_flight = 0
        self.policies = self._policy_documents()

    def _policy_documents(self) -> dict[str, dict[str, Any]]:
        documents = {}
        for path, content in sorted(self.service.bundle.files.items()):
            if not path.endswith(".rego"):
                continue
            document: dict[str, Any] = {
                "id": path,
                "raw": content.decode(),
                "digest": digest(content),
            }
            package = _PACKAGE.search(content)
            if package:
                # Enough of OPA's AST for clients that build a data URL from the package.
                names = package.group(1).decode().split(".")
                document["ast"] = {
                    "package": {
                        "path": [{"type": "var", "value": "data"}]
                        + [{"type": "string", "value": name} for name in names]
                    }
                }
            documents[path] = document
        return documents

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await handler(request)
        except web.HTTPException as exc:
            # The router's own 404 and 405, in OPA's shape like everything else.
            code = "resource_not_found" if exc.status == 404 else "invalid_parameter"
            return _error(exc.status, code, exc.reason)
        except Exception:
            log.exception("REST %s failed", request.method)
            return _error(
                500, "internal_error", "the PDP failed to answer", ReasonCode.PDP_UNAVAILABLE
            )
        finally:
            self.in_flight -= 1

    async def health(self, request: web.Request) -> web.Response:
        if self.serving.is_set():
            return web.json_response({})
        return _error(500, "internal_error", "the PDP is not serving")

    async def list_policies(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"result": list(self.policies.values()), "bundle_digest": self.service.bundle.digest}
        )

    async def get_policy(self, request: web.Request) -> web.Response:
        document = self.policies.get(request.match_info["id"])
        if document is None:
            return _error(404, "resource_not_found", "no policy with this id in the bundle")
        return web.json_response({"result": document, "bundle_digest": self.service.bundle.digest})

    async def refuse_write(self, request: web.Request) -> web.Response:
        # OPA's own answer to a write under a path a bundle owns: 400 invalid_parameter.
        return _error(
            400,
            "invalid_parameter",
            f"policies and data are owned by bundle {self.service.bundle.digest} and are"
            " read-only: a policy changes only through a new bundle digest pinned by a"
            " signed manifest",
            ReasonCode.BAD_REQUEST,
        )

    def _decide(
        self, run_id: str, request_id: str, given: dict[str, Any], now: datetime
    ) -> DecisionOutcome:
        try:
            if given.keys() - _INPUT_FIELDS:
                raise BadRequest("input takes only run_id, request_id and action")
            if not 0 < len(request_id) <= MAX_ID_LENGTH:
                raise BadRequest("request_id must be 1 to 128 characters")
            if "action" not in given:
                raise BadRequest("input.action is required")
            action = action_from_json(given["action"])
        except AbcError as exc:
            return self.service.refuse(run_id, request_id, exc, now)
        return self.service.decide(run_id, request_id, action, now)

    async def data(self, request: web.Request) -> web.Response:
        if request.method in ("PUT", "PATCH", "DELETE"):
            return await self.refuse_write(request)
        if request.method not in ("GET", "POST"):
            return _error(405, "invalid_parameter", f"{request.method} is not allowed here")
        # The raw path, exactly: an encoded variant of a rule's path is another document.
        path = request.rel_url.raw_path.rstrip("/")
        if path not in (DECISION, ALLOW):
            return web.json_response({})  # an undefined document, as OPA answers it
        if not self.serving.is_set():
            return _error(
                503, "internal_error", "the PDP is not serving", ReasonCode.PDP_UNAVAILABLE
            )
        encodings = request.headers.getall("Content-Encoding", [])
        if any(value.strip().lower() != "identity" for value in encodings):
            return _bad_input("compressed request bodies are refused")
        body = await read_body(request, MAX_BODY_BYTES)
        if body is None:
            return _bad_input(f"request body over {MAX_BODY_BYTES} bytes", 413)
        try:
            document = parse_json_object(body) if body.strip() else {}
        except MappingError as exc:
            return _bad_input(f"body contains malformed input document: {exc}")
        if document.keys() - {"input"}:
            return _bad_input('the body takes only "input"')
        given = document.get("input", {})
        if not isinstance(given, dict):
            return _bad_input("input must be an object")
        run_id, request_id = given.get("run_id", ""), given.get("request_id")
        if not isinstance(run_id, str) or not isinstance(request_id, str | None):
            return _bad_input("run_id and request_id must be strings")
        if request_id is None:
            # No idempotency key given: a fresh one, so a retry is a second decision.
            request_id = "rest_" + uuid.uuid4().hex

        now = self.clock()
        outcome = await asyncio.get_running_loop().run_in_executor(
            self.executor, self._decide, run_id, request_id, given, now
        )
        return _answer(outcome, allow_only=path == ALLOW)


def _answer(outcome: DecisionOutcome, *, allow_only: bool) -> web.Response:
    decision = outcome.decision
    if refusal_status(outcome.reason) == 400:
        # The caller's mistake, not a policy's answer: an error, as the PEP answers it.
        return _error(
            400,
            "invalid_parameter",
            decision.reasons[0].message,
            outcome.reason,
            outcome.decision_id,
        )
    if allow_only:
        return web.json_response({"result": outcome.forward, "decision_id": outcome.decision_id})
    return web.json_response(
        {
            "result": {
                # As Decide answers: a shadow run goes ahead, with the would-be verdict.
                "allow": outcome.forward,
                "shadow": not outcome.enforced,
                "would_allow": decision.allow,
                "reasons": [r.as_dict() for r in decision.reasons],
                "obligations": decision.obligations,
                "decision_id": outcome.decision_id,
                "reservation_id": outcome.reservation_id,
            },
            "decision_id": outcome.decision_id,
        }
    )


async def _not_found(request: web.Request) -> web.Response:
    return _error(404, "resource_not_found", "no such API on the ABC PDP")


def build_app(door: _Door) -> web.Application:
    # client_max_size is a backstop; the data handler reads with its own limit first.
    app = web.Application(middlewares=[door.middleware], client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/health", door.health)
    app.router.add_get("/v1/policies", door.list_policies)
    app.router.add_get("/v1/policies/", door.list_policies)  # what opa-python-client asks
    app.router.add_get("/v1/policies/{id:.+}", door.get_policy)
    app.router.add_route("*", "/v1/policies", door.refuse_write)
    app.router.add_route("*", "/v1/policies/{id:.+}", door.refuse_write)
    app.router.add_route("*", "/v1/data", door.data)
    app.router.add_route("*", "/v1/data/{path:.*}", door.data)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


class RestServer:
    """The REST door on its own thread and event loop, serving ``sock`` (bound by abc-pdp
    before it made any state; ``address`` names it in messages); ``start`` raises
    ``ConfigError`` when it cannot serve, ``stop`` drains in-flight requests first."""

    def __init__(
        self,
        service: DecisionService,
        address: str,
        serving: threading.Event,
        *,
        sock: socket.socket,
        workers: int,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.address = address
        self._ssl = ssl_context
        self._sock = sock
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pdp-rest")
        self._door = _Door(service, serving, self._executor, clock)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="pdp-rest", daemon=True)

    def start(self) -> None:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            started.result(timeout=30)
        except OSError as exc:
            self._shutdown()
            raise ConfigError(f"cannot serve REST on {self.address}: {exc.strerror}") from exc

    async def _start(self) -> None:
        # Drained by stop() first; what is still running after that is cut short.
        self._runner = web.AppRunner(build_app(self._door), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock, ssl_context=self._ssl).start()

    def stop(self, deadline: float) -> None:
        """Answer what is in flight until ``deadline`` (``time.monotonic``), then close."""
        drained = asyncio.run_coroutine_threadsafe(self._drain(deadline), self._loop)
        drained.result(timeout=max(0.0, deadline - time.monotonic()) + 10)
        self._shutdown()

    async def _drain(self, deadline: float) -> None:
        while self._door.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._runner is not None:
            await self._runner.cleanup()

    def _shutdown(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        # Decisions already handed to the pool finish (and are logged) before the log closes.
        self._executor.shutdown(wait=True)
