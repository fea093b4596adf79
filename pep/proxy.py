"""The sidecar: one loop for every protocol. Request in → action → decision → forward or refuse.

Fail closed throughout: no run, an unmappable request, a PDP that does not answer in
time or answers garbage, an oversized body, an unknown route: each is refused in the
agent's protocol with a reason code and a decision id, and nothing is forwarded.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from pdp.api import ReasonCode, pdp_pb2
from pdp.api.bodies import read_body
from pdp.api.cost import worst_case_tokens
from pdp.api.mapping import RUN_KEY_HEADER, STEP_HEADER, step_action, step_request_id
from pdp.api.requests import unsafe_request
from pep.adapters.anthropic import AnthropicAdapter
from pep.adapters.base import Adapter, Call, MappingError, Probe, refusal_status
from pep.adapters.http import HttpAdapter, upstream_path
from pep.adapters.mcp import McpAdapter
from pep.adapters.openai import OpenAIAdapter
from pep.config import PepConfig
from pep.forward import relay, request_headers
from pep.front import LeanResponse, ModelRequest, Serve
from pep.metrics import PepMetrics
from pep.models_list import GrantedModels, models_list
from pep.pdp_client import PdpClient, Verdict
from pep.runs import RunKeys
from pep.upstream import Lease, ModelUpstream, UpstreamError, UpstreamResponse
from pep.usage import UsageReader

__all__ = ["MODEL_HANDLERS", "SIDECAR", "Sidecar", "build_app", "metrics_app"]

log = logging.getLogger("abc.pep")
T = TypeVar("T")


@dataclass
class Sidecar:
    config: PepConfig
    pdp: PdpClient
    metrics: PepMetrics
    run_id: str | None  # the default run: the grant's (--manifest), or --run
    runs: RunKeys | None = None  # run keys of the grant (--manifest only)
    session: aiohttp.ClientSession | None = None  # upstream for MCP and HTTP tools
    model_upstream: ModelUpstream | None = None  # upstream for model calls
    models: GrantedModels | None = None  # the bound manifest's, for GET .../v1/models
    # Work that outlives a handler whose agent hung up, held until done (the loop holds
    # tasks weakly).
    unfinished: set[asyncio.Task[Any]] = field(default_factory=set)

    def outlive_agent(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """``work`` as a task that finishes even if the handler that started it is
        cancelled (await it through ``asyncio.shield``)."""
        task = asyncio.ensure_future(work)
        self.unfinished.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.unfinished.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("work a request handler left running failed: %r", task.exception())


SIDECAR = web.AppKey("sidecar", Sidecar)
# The model routes' handlers by route, for the lean server (pep.front) to call.
MODEL_HANDLERS = web.AppKey("model_handlers", dict[str, Serve])


_MODEL_ROUTES = frozenset({"openai", "anthropic"})


Request = web.Request | ModelRequest  # read by aiohttp, or by the lean server


def _request_id(request: Request) -> str:
    """A fresh id per request, never one the agent chose: a replayed id gets the stored
    allow again, so an agent naming its own could repeat one paid call as often as it liked.
    (A retry by the agent is then a new, charged decision: fail closed on budget.)
    128 random bits, as a uuid4's 122, for a quarter of its cost."""
    return "pep_" + secrets.token_hex(16)


def _unsafe_request(request: Request, adapter: Adapter) -> str | None:
    """Why this request cannot be judged faithfully, or None (the shared rule)."""
    return unsafe_request(
        request.method,
        request.rel_url.raw_path,
        request.headers.items(),
        model_route=adapter.route in _MODEL_ROUTES,
        raw_query=request.rel_url.raw_query_string,
        body_judged=adapter.reads_body,
    )


def _upstream_url(request: Request, adapter: Adapter, upstreams: dict[str, str]) -> str | None:
    """The upstream URL, its path and query the raw ones the agent sent (what was decided)."""
    query = request.rel_url.raw_query_string
    suffix = f"?{query}" if query else ""
    match adapter.route:
        case "openai" | "anthropic":
            base = upstreams.get(adapter.route)
            tail = request.rel_url.raw_path[len(adapter.route) + 1 :]
            return None if base is None else f"{base}{tail}{suffix}"
        case "mcp":
            return upstreams.get(f"mcp:{request.match_info['server']}")
        case _:
            base = upstreams.get(f"http:{request.match_info['name']}")
            return None if base is None else f"{base}{upstream_path(request)}{suffix}"


def _name(request: Request, route: str) -> str:
    """The ``--upstream`` name a request's route needs: openai, mcp:kb, http:billing..."""
    if route == "mcp":
        return f"mcp:{request.match_info['server']}"
    return f"http:{request.match_info['name']}" if route == "http" else route


class Handler:
    """The loop, written once; each route binds it to its adapter."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        response = await self.handle(request)
        assert isinstance(response, web.StreamResponse)  # what aiohttp's requests are answered by
        return response

    async def handle(self, request: Request) -> web.StreamResponse | LeanResponse:
        sidecar = request.app[SIDECAR]
        adapter, route = self.adapter, self.adapter.route

        async def refuse(
            verdict: Verdict, call: Call | None = None, status: int | None = None
        ) -> web.Response:
            sidecar.metrics.count(route, "deny", verdict.reason)
            if verdict.decision_id.startswith("pep_") and verdict.reason is not (
                ReasonCode.PDP_UNAVAILABLE
            ):
                # The sidecar's own refusal: logged in the PDP's decision log too, so no
                # attempt goes unseen there (the local id stays if the PDP cannot log it);
                # shielded, so an agent that hangs up at once is logged all the same.
                named = request.headers.get("x-abc-run", "")
                verdict = await asyncio.shield(
                    sidecar.outlive_agent(
                        sidecar.pdp.record_refusal(
                            sidecar.run_id or named[:128], _request_id(request), route, verdict
                        )
                    )
                )
            # Route and method only: paths and bodies may carry the agent's secrets.
            log.info(
                "refused %s %s: %s (%s)", route, request.method, verdict.reason, verdict.decision_id
            )
            return adapter.refusal(verdict, call, status or refusal_status(verdict.reason))

        try:
            upstream_url = _upstream_url(request, adapter, sidecar.config.upstreams)
        except MappingError as exc:
            return await refuse(Verdict.refuse(exc.reason, str(exc)))
        if upstream_url is None:
            return await refuse(
                Verdict.refuse(
                    ReasonCode.BAD_REQUEST,
                    f"this sidecar has no --upstream {_name(request, route)}=URL",
                ),
                status=404,
            )
        unsafe = _unsafe_request(request, adapter)
        if unsafe is not None:
            return await refuse(Verdict.refuse(ReasonCode.BAD_REQUEST, unsafe))
        chosen = await _run_id(request, sidecar)
        if isinstance(chosen, Verdict):
            return await refuse(chosen)
        run_id = chosen
        body = b""
        if adapter.reads_body:
            if isinstance(request, ModelRequest):
                read = request.body  # read by the lean server, with the same limit
            else:
                read = await read_body(request, sidecar.config.max_body_bytes)
            if read is None:
                return await refuse(
                    Verdict.refuse(ReasonCode.BAD_REQUEST, "request body over the size limit"),
                    status=413,
                )
            body = read
        try:
            call = adapter.call(request, body)
        except MappingError as exc:
            refused = Call(action=None, body=b"", mcp=getattr(exc, "mcp", None))
            return await refuse(Verdict.refuse(exc.reason, str(exc)), refused)

        step = request.headers.get(STEP_HEADER)
        if step:
            # Entering a step is an action of its own, decided (and logged) before the call.
            moved = await sidecar.pdp.decide(
                run_id, step_request_id(_request_id(request)), step_action(step)
            )
            if not moved.allow:
                return await refuse(moved, call)
            sidecar.metrics.count_shadow(route, moved.reason)

        verdict: Verdict | None = None
        if call.action is not None:
            started = time.perf_counter()
            request_id = _request_id(request)
            try:
                verdict = await sidecar.pdp.decide(run_id, request_id, call.action)
            except asyncio.CancelledError:
                sidecar.outlive_agent(
                    _release_unforwarded(sidecar, run_id, request_id, call.action)
                )
                raise
            sidecar.metrics.decision_seconds.observe(time.perf_counter() - started)
            if not verdict.allow:
                return await refuse(verdict, call)
            sidecar.metrics.count_shadow(route, verdict.reason)
            if call.apply_obligations is not None:
                body = call.apply_obligations(verdict.obligations)
            if call.action.input_bytes and len(body) > call.action.input_bytes:
                # The reservation bounds what is forwarded; a body past it is never sent.
                if verdict.reservation_id:
                    sidecar.pdp.report_usage(verdict.reservation_id, 0)
                return await refuse(
                    Verdict.refuse(ReasonCode.BAD_REQUEST, "the body outgrew its reservation"),
                    call,
                )
        sidecar.metrics.count(route, "allow" if verdict or call.lists_tools else "pass")
        return await self._forward(request, sidecar, call, body, upstream_url, run_id, verdict)

    async def _forward(
        self,
        request: Request,
        sidecar: Sidecar,
        call: Call,
        body: bytes,
        url: str,
        run_id: str,
        verdict: Verdict | None,
    ) -> web.StreamResponse | LeanResponse:
        assert sidecar.session is not None and sidecar.model_upstream is not None
        route = self.adapter.route
        # The sidecar must read model responses (usage) and tool lists: ask for identity.
        headers = request_headers(request, identity=call.reads_usage or call.respond is not None)
        data: bytes | aiohttp.StreamReader | None = body
        if not self.adapter.reads_body:
            assert isinstance(request, web.Request)  # the lean server reads every body
            data = request.content if request.body_exists else None
            if request.content_length is not None:
                headers.append(("Content-Length", str(request.content_length)))
        extra = {"x-abc-decision-id": verdict.decision_id} if verdict else {}
        reader = UsageReader(call.streaming) if call.reads_usage else None
        started = time.perf_counter()
        status = 0
        sent = False  # failed unanswered, but the upstream may have received the call
        cut = False  # the answer failed part way
        tap = reader.feed if reader else None
        lease: Lease | None = None  # a model call's connection, on which it is sent at once
        answer: UpstreamResponse | None = None
        try:
            if route in _MODEL_ROUTES:
                assert isinstance(data, bytes)
                lease = await sidecar.model_upstream.connect(URL(url, encoded=True), headers, data)
                # Nothing may be awaited between the two: a cancellation there would leave
                # the lease's slot and connection held.
                answer = await lease.send()
                async with answer:
                    status = answer.status
                    return await relay(request, answer, extra, tap)
            async with sidecar.session.request(
                request.method,
                # encoded: sent byte for byte; a re-quoted URL turns ..%3b into ..; after
                # the decision was made on the first.
                URL(url, encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
            ) as upstream:
                status = upstream.status
                if call.respond is not None:
                    assert isinstance(request, web.Request)  # MCP: never lean
                    return await call.respond(request, upstream, _prober(sidecar, run_id))
                return await relay(request, upstream, extra, tap)
        except asyncio.CancelledError:
            # The agent hung up. The call may have reached the upstream and run, unless it
            # was a model call still waiting for its connection.
            log.info("agent gone: upstream %s call abandoned", route)
            sent = lease is not None or route not in _MODEL_ROUTES
            cut = answer is None or not answer.complete
            raise
        except (aiohttp.ClientError, UpstreamError, TimeoutError) as exc:
            # The id the agent's 502 carries, so that the two can be matched.
            traced = verdict.decision_id if verdict else _request_id(request)
            log.warning("upstream %s failed (%s): %s", route, traced, exc)
            sent, cut = isinstance(exc, UpstreamError) and exc.sent, bool(status)
            if request.writer.output_size:
                raise  # the answer had started: the agent's connection carries the failure
            failed = Verdict(False, ReasonCode.BAD_REQUEST, "the upstream did not answer", traced)
            return self.adapter.refusal(failed, call, 502)
        finally:
            sidecar.metrics.observe_upstream(route, time.perf_counter() - started)
            if verdict is not None and verdict.reservation_id:
                received = sent or status > 0
                _settle(sidecar, verdict, call, reader, status, received, cut)


async def _release_unforwarded(
    sidecar: Sidecar, run_id: str, request_id: str, action: pdp_pb2.Action
) -> None:
    """The agent hung up while its call was decided: the PDP may have allowed it and
    reserved all the same. Asked again under the same request id (answered as before, never
    charged twice), an allow is settled at 0, since nothing was forwarded; else its
    reservation would be held, and charged, at the worst case until it expired."""
    verdict = await sidecar.pdp.decide(run_id, request_id, action)
    if verdict.allow and verdict.reservation_id:
        sidecar.pdp.report_usage(verdict.reservation_id, 0)


def _settle(
    sidecar: Sidecar,
    verdict: Verdict,
    call: Call,
    reader: UsageReader | None,
    status: int,
    received: bool,
    cut: bool,
) -> None:
    """Report real usage. Unknown usage settles at the reserved worst case; at 0 only a call
    the upstream never received, or answered with an error status: one it received and
    never answered may have been carried out and billed. An answer ``cut`` part way (by
    either end) reported less than the whole, unless its stream had ended as its protocol
    ends one (an SDK may hang up on [DONE], before the chunked body's end)."""
    tokens = None
    if reader is not None and (not cut or reader.stream_ended):
        tokens = reader.tokens()
    if tokens is None:
        action = call.action or pdp_pb2.Action()
        worst = worst_case_tokens(verdict.obligations, action.max_tokens, action.input_bytes)
        refused = not received or (status and not 200 <= status < 300)
        tokens = 0 if refused else worst
    sidecar.pdp.report_usage(verdict.reservation_id, tokens)


async def _run_id(request: Request, sidecar: Sidecar) -> str | Verdict:
    """The run a request is decided under: its run key's (a run of the sidecar's grant),
    else the default run, else the run it names; or the refusal to answer with."""
    named = request.headers.get("x-abc-run")
    run_keys = request.headers.getall(RUN_KEY_HEADER, [])
    if len(run_keys) > 1:
        return Verdict.refuse(ReasonCode.BAD_REQUEST, f"{RUN_KEY_HEADER} sent more than once")
    if run_keys:
        run_key = run_keys[0]
        if sidecar.runs is None:
            problem = f"{RUN_KEY_HEADER} needs a sidecar started with --manifest"
            return Verdict.refuse(ReasonCode.BAD_REQUEST, problem)
        if named:
            problem = f"x-abc-run and {RUN_KEY_HEADER} name a run two ways"
            return Verdict.refuse(ReasonCode.BAD_REQUEST, problem)
        return await sidecar.runs.run_id(run_key)
    if sidecar.runs is not None and sidecar.runs.narrower:
        # The default run is the grant as signed: a narrowing sidecar never uses it.
        problem = f"this sidecar starts narrowed runs only: send {RUN_KEY_HEADER}"
        return Verdict.refuse(ReasonCode.BAD_REQUEST, problem)
    if sidecar.run_id and named and named != sidecar.run_id:
        # A bound sidecar decides under its own runs only: a header cannot switch grants.
        return Verdict.refuse(ReasonCode.BAD_REQUEST, "this sidecar is bound to another run")
    run_id = sidecar.run_id or named
    if not run_id:
        problem = "no run is bound (x-abc-run, or --run / --manifest)"
        return Verdict.refuse(ReasonCode.MANIFEST_UNKNOWN, problem)
    return run_id


def _prober(sidecar: Sidecar, run_id: str) -> Probe:
    async def probe(action: pdp_pb2.Action) -> Verdict:
        started = time.perf_counter()
        verdict = await sidecar.pdp.decide(run_id, "probe_" + secrets.token_hex(16), action)
        sidecar.metrics.decision_seconds.observe(time.perf_counter() - started)
        sidecar.metrics.count_probe(verdict.allow)
        return verdict

    return probe


async def _unknown_route(request: web.Request) -> web.Response:
    request.app[SIDECAR].metrics.count("unknown", "deny", ReasonCode.BAD_REQUEST)
    return web.json_response(
        {
            "type": "urn:abc:reason:bad_request",
            "title": "No such route on the ABC sidecar",
            "status": 404,
            "detail": "routes: /openai/v1/*, /anthropic/v1/*, /mcp/<server>, /http/<name>/*",
            "reason": "bad_request",
        },
        status=404,
        content_type="application/problem+json",
    )


def build_app(sidecar: Sidecar) -> web.Application:
    app = web.Application(client_max_size=sidecar.config.max_body_bytes)
    app[SIDECAR] = sidecar

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        sidecar.session = aiohttp.ClientSession(
            auto_decompress=False,  # bytes, not our reading of them
            # One session serves every agent: a cookie one upstream answer set must never
            # ride on another agent's request (nor rewrite the Cookie header an agent sent).
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Accept"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
            connector=aiohttp.TCPConnector(limit=256),
        )
        sidecar.model_upstream = ModelUpstream(limit=256)
        yield
        await sidecar.session.close()
        await sidecar.model_upstream.close()

    app.cleanup_ctx.append(session_ctx)
    models = {"openai": Handler(OpenAIAdapter()), "anthropic": Handler(AnthropicAdapter())}
    handlers: dict[str, Serve] = {route: handler.handle for route, handler in models.items()}
    app[MODEL_HANDLERS] = handlers
    for route, handler in models.items():
        listing = models_list(route, sidecar.models, handler, sidecar.metrics.count)
        app.router.add_route("*", f"/{route}/v1/models", listing)  # before the tail's route
        app.router.add_route("*", f"/{route}/v1/{{tail:.*}}", handler)
    app.router.add_route("*", "/mcp/{server}", Handler(McpAdapter()))
    app.router.add_route("*", "/http/{name}/{tail:.*}", Handler(HttpAdapter()))
    app.router.add_route("*", "/http/{name}", Handler(HttpAdapter()))
    app.router.add_route("*", "/{tail:.*}", _unknown_route)
    return app


def metrics_app(metrics: PepMetrics) -> web.Application:
    async def serve_metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    return app
