"""The sidecar end to end: official SDKs → real abc-pep → real abc-pdp → fake upstreams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.fakes.serve import FakeUpstreams
from tests.harness import (
    API_KEY,
    INTENT,
    PdpProcess,
    PepProcess,
    Signer,
    sample,
    serve_app,
    start_pep,
)

MODEL = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"


def pep_intent() -> str:
    """The demo intent, with a second MCP server (JSON framing) and Anthropic usable at once."""
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/pep-tests")
    text = text.replace(
        "  - server: kb\n    name: fetch_article",
        "  - server: kbjson\n    name: search\n    args:\n"
        "      query: {type: string, required: true, maxLength: 200}\n"
        "  - server: kb\n    name: fetch_article",
    )
    return text.replace(
        "uses: [model:openai/gpt-4o-mini, tool:kb/search,",
        "uses: [model:openai/gpt-4o-mini, model:anthropic/"
        f"{CLAUDE}, tool:kbjson/search, tool:kb/search,",
    )


def upstream_map(fakes: FakeUpstreams) -> dict[str, str]:
    return {
        "openai": fakes.openai_url.removesuffix("/v1"),
        "anthropic": fakes.anthropic_url,
        "mcp:kb": fakes.mcp_sse_url,
        "mcp:kbjson": fakes.mcp_json_url,
        "http:billing.internal": fakes.http_url,
    }


@pytest.fixture(scope="module")
def envelope_path(signer: Signer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pep") / "envelope.json"
    path.write_bytes(signer.freeze(pep_intent(), "pep"))
    return path


@pytest.fixture(scope="module")
def pep(pdp: PdpProcess, fakes: FakeUpstreams, envelope_path: Path) -> Iterator[PepProcess]:
    process = start_pep(
        pdp.address, upstream_map(fakes), envelope_path.parent, "--manifest", str(envelope_path)
    )
    yield process
    process.stop()


def oai(pep: PepProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pep.url}/openai/v1", api_key=API_KEY, max_retries=0)


# ---- OpenAI -------------------------------------------------------------------------------


def test_openai_allowed_and_capped(pep: PepProcess, fakes: FakeUpstreams) -> None:
    reply = oai(pep).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5000
    )
    assert reply.choices[0].message.content.startswith("Hello from the fake OpenAI")
    received = fakes.recorder.last("openai", path="/v1/chat/completions")
    assert received.body["max_tokens"] == 2048  # the manifest's per-call cap, not 5000
    assert received.header("authorization") == f"Bearer {API_KEY}"


def test_openai_request_under_the_cap_goes_as_sent(pep: PepProcess, fakes: FakeUpstreams) -> None:
    oai(pep).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100
    )
    received = fakes.recorder.last("openai", path="/v1/chat/completions")
    assert received.body["max_tokens"] == 100


def test_openai_without_cap_gets_the_manifest_cap(pep: PepProcess, fakes: FakeUpstreams) -> None:
    oai(pep).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert fakes.recorder.last("openai").body["max_completion_tokens"] == 2048


def test_openai_refused_model_raises_permission_error(pep: PepProcess) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        oai(pep).chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 403
    assert caught.value.code == "model_not_allowed"
    decision_id = caught.value.response.headers["x-abc-decision-id"]
    assert decision_id.startswith("dec_")
    assert caught.value.body["decision_id"] == decision_id  # type: ignore[index]


def test_one_connection_carries_model_calls_and_every_other_route(pep: PepProcess) -> None:
    """Model calls are served by the sidecar's lean server, the rest by aiohttp: a client that
    keeps one connection gets every answer on it, whichever route comes first."""
    with httpx.Client(limits=httpx.Limits(max_connections=1)) as http:
        client = openai.OpenAI(
            base_url=f"{pep.url}/openai/v1", api_key=API_KEY, max_retries=0, http_client=http
        )
        for _ in range(2):
            chat = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
            assert chat.choices[0].message.content
            assert MODEL in [model.id for model in client.models.list()]
        invoice = http.get(f"{pep.url}/http/billing.internal/v1/invoices/1")
        assert invoice.status_code == 200
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        assert chat.choices[0].message.content


def test_a_refusal_reads_the_same_from_either_server(pep: PepProcess) -> None:
    """The same refused call, its body framed by a length (the lean server) and chunked
    (aiohttp's): the same answer but for its decision id and date."""
    body = json.dumps({"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]})
    url = f"{pep.url}/openai/v1/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    lean = httpx.post(url, content=body.encode(), headers=headers)
    chunked = httpx.post(url, content=iter([body.encode()]), headers=headers)
    assert "transfer-encoding" in chunked.request.headers

    def seen(reply: httpx.Response) -> tuple[int, dict[str, str], Any]:
        decision = reply.headers["x-abc-decision-id"]
        kept = {
            name: value.replace(decision, "ID")
            for name, value in reply.headers.items()
            if name not in ("date", "server")
        }
        return reply.status_code, kept, json.loads(reply.text.replace(decision, "ID"))

    assert seen(lean) == seen(chunked)
    assert lean.status_code == 403 and lean.json()["error"]["code"] == "model_not_allowed"


def test_openai_stream_with_usage(pep: PepProcess) -> None:
    chunks = list(
        oai(pep).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "stream"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from the fake OpenAI")
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_openai_responses_api_streams(pep: PepProcess) -> None:
    with oai(pep).responses.stream(model=MODEL, input="hello") as stream:
        final = stream.get_final_response()
    assert final.usage is not None and final.output_text


# ---- Anthropic ----------------------------------------------------------------------------


def claude(pep: PepProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{pep.url}/anthropic", api_key="ak-test", max_retries=0)


def test_anthropic_allowed_streamed_and_refused(pep: PepProcess) -> None:
    message = claude(pep).messages.create(
        model=CLAUDE, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text  # type: ignore[union-attr]
    with claude(pep).messages.stream(
        model=CLAUDE, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        claude(pep).messages.create(
            model="claude-opus-4-1", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.body["abc"]["reason"] == "model_not_allowed"  # type: ignore[index]


# ---- MCP ----------------------------------------------------------------------------------


async def _mcp(url: str, work: Any) -> Any:
    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        return await work(session)


@pytest.mark.parametrize("server", ["kb", "kbjson"], ids=["sse-framing", "json-framing"])
def test_mcp_list_is_filtered_and_calls_are_decided(pep: PepProcess, server: str) -> None:
    url = f"{pep.url}/mcp/{server}"

    async def work(session: ClientSession) -> dict[str, Any]:
        listed = sorted(tool.name for tool in (await session.list_tools()).tools)
        result = await session.call_tool("search", {"query": "refunds"})
        refusals = {}
        for name, args in (("delete_everything", {}), ("search", {"query": "x" * 201})):
            # A refused call is the tool's error result, which the model can read and
            # recover from; the reason and decision id ride in its _meta and its text.
            refused = await session.call_tool(name, args)
            meta = refused.meta or {}
            assert refused.is_error and meta["abc/decision_id"].startswith("dec_")
            assert meta["abc/decision_id"] in refused.content[0].text  # type: ignore[union-attr]
            refusals[name] = meta["abc/reason"]
        return {"listed": listed, "result": result, "refusals": refusals}

    outcome = asyncio.run(_mcp(url, work))
    expected = ["fetch_article", "search"] if server == "kb" else ["search"]
    assert outcome["listed"] == expected  # delete_everything and admin_reset are hidden
    assert not outcome["result"].is_error
    assert outcome["refusals"] == {
        "delete_everything": "tool_not_allowed",
        "search": "tool_args_invalid",
    }


def test_mcp_refused_call_never_reaches_the_server(pep: PepProcess, fakes: FakeUpstreams) -> None:
    before = fakes.recorder.tool_calls("mcp-sse").count("admin_reset")

    async def work(session: ClientSession) -> None:
        assert (await session.call_tool("admin_reset", {"confirm": True})).is_error

    asyncio.run(_mcp(f"{pep.url}/mcp/kb", work))
    assert fakes.recorder.tool_calls("mcp-sse").count("admin_reset") == before


def test_mcp_unparseable_list_is_refused_not_passed(
    pdp: PdpProcess, envelope_path: Path, tmp_path: Path
) -> None:
    """A tools/list answer with one undecodable SSE line must not leak the unfiltered list."""
    from aiohttp import web

    async def broken_server(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        tools = [
            {"name": n, "inputSchema": {"type": "object"}} for n in ("search", "delete_everything")
        ]
        good = {"jsonrpc": "2.0", "id": body["id"], "result": {"tools": tools}}
        if body["id"] == 8:  # an answer under another id must be filtered all the same
            other = {"jsonrpc": "2.0", "id": 999, "result": {"tools": tools}}
            await response.write(f"event: message\ndata: {json.dumps(other)}\n\n".encode())
            await response.write_eof()
            return response
        await response.write(b"event: message\ndata: {not json\n\n")
        await response.write(f"event: message\ndata: {json.dumps(good)}\n\n".encode())
        await response.write_eof()
        return response

    async def scenario() -> tuple[int, str]:
        app = web.Application()
        app.router.add_post("/mcp", broken_server)
        runner, port = await serve_app(app)
        pep = await asyncio.to_thread(
            start_pep,
            pdp.address,
            {"mcp:kb": f"http://127.0.0.1:{port}/mcp"},
            tmp_path,
            "--manifest",
            str(envelope_path),
        )
        try:
            async with httpx.AsyncClient() as client:
                reply = await client.post(
                    f"{pep.url}/mcp/kb",
                    json={"jsonrpc": "2.0", "id": 7, "method": "tools/list"},
                    headers={"Accept": "application/json, text/event-stream"},
                )
                other = await client.post(
                    f"{pep.url}/mcp/kb",
                    json={"jsonrpc": "2.0", "id": 8, "method": "tools/list"},
                    headers={"Accept": "application/json, text/event-stream"},
                )
            assert "delete_everything" not in other.text and '"search"' in other.text
            return reply.status_code, reply.text
        finally:
            pep.stop()
            await runner.cleanup()

    status, text = asyncio.run(scenario())
    assert status == 200
    assert "delete_everything" not in text
    assert '"reason":"bad_request"' in text


# ---- plain HTTP ---------------------------------------------------------------------------


def test_http_allowed_refused_and_headers(pep: PepProcess) -> None:
    base = f"{pep.url}/http/billing.internal"
    ok = httpx.get(f"{base}/v1/invoices/42")
    assert ok.status_code == 200 and ok.json()["invoice"] == "42"
    for method, path, status, reason in (
        ("GET", "/admin/secrets", 403, "http_not_allowed"),
        ("POST", "/v1/invoices", 403, "http_not_allowed"),
        ("GET", "/v1/invoices/../admin/secrets", 403, "http_not_allowed"),
        # Escapes an upstream would decode to another path: refused before the PDP.
        ("GET", "/v1/invoices/..%2f..%2fadmin/secrets", 400, "bad_request"),
        ("GET", "/v1/invoices/%2e%2e/x", 400, "bad_request"),
    ):
        with httpx.Client() as client:
            request = client.build_request(method, f"{base}/x")
            request.url = request.url.copy_with(raw_path=f"/http/billing.internal{path}".encode())
            refused = client.send(request)
        assert refused.status_code == status, (method, path)
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["reason"] == reason
        assert refused.headers["x-abc-decision-id"] == refused.json()["decision_id"]


# ---- bad input, metrics -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "reason"),
    [
        ("/openai/v1/chat/completions", b"{not json", 400, "bad_request"),
        (
            "/openai/v1/chat/completions",
            b'{"model":"gpt-4o-mini","model":"gpt-5"}',
            400,
            "bad_request",
        ),
        (
            "/openai/v1/chat/completions",
            b'{"model":"' + b"x" * 2_000_000 + b'"}',
            413,
            "bad_request",
        ),
        ("/openai/v1/files", b"{}", 400, "bad_request"),
        ("/nowhere", b"{}", 404, "bad_request"),
        ("/http/unknown-upstream/x", b"", 404, "bad_request"),
    ],
    ids=[
        "malformed-json",
        "duplicate-model-key",
        "oversized",
        "ungoverned-endpoint",
        "unknown-route",
        "unknown-upstream",
    ],
)
def test_bad_input_is_refused_and_the_sidecar_keeps_serving(
    pep: PepProcess, path: str, body: bytes, status: int, reason: str
) -> None:
    reply = httpx.post(
        f"{pep.url}{path}", content=body, headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == status
    assert reason in reply.text
    assert httpx.get(f"{pep.url}/http/billing.internal/v1/invoices/1").status_code == 200


def test_metrics_count_decisions_with_closed_labels(pep: PepProcess) -> None:
    # The module's sidecar is shared: count what this test does, from what was there before.
    allowed = ("abc_pep_requests_total", {"decision": "allow", "route": "openai"})
    model_denied = ("abc_pep_denials_total", {"reason": "model_not_allowed", "route": "openai"})
    http_denied = ("abc_pep_denials_total", {"reason": "http_not_allowed", "route": "http"})
    series = (allowed, model_denied, http_denied)
    before = pep.metrics()
    counts = [sample(before, name, **labels) for name, labels in series]
    # This sidecar decides over gRPC, and says so.
    assert sample(before, "abc_pep_pdp_transport", transport="grpc") == 1
    assert sample(before, "abc_pep_pdp_transport", transport="decide_socket") == 0
    oai(pep).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.PermissionDeniedError):
        oai(pep).chat.completions.create(
            model="made-up-model-xyz", messages=[{"role": "user", "content": "x"}]
        )
    assert httpx.get(f"{pep.url}/http/billing.internal/admin/secrets").status_code == 403
    text = pep.metrics()
    assert [sample(text, name, **labels) for name, labels in series] == [c + 1 for c in counts]
    assert "abc_pep_decision_seconds_bucket" in text and "abc_pep_upstream_seconds_bucket" in text
    assert "made-up-model" not in text
    assert API_KEY not in pep.output()  # the provider key is never logged


def bound_run(pdp: PdpProcess, envelope_path: Path) -> tuple[pdp_pb2_grpc.DecisionServiceStub, str]:
    """A stub, and the run the sidecar is bound to (registering its manifest again is a no-op)."""
    stub = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())
    run_id = stub.RegisterManifest(
        pdp_pb2.RegisterManifestRequest(envelope=envelope_path.read_bytes().rstrip(b"\n"))
    ).run_id
    return stub, str(run_id)


def test_usage_is_settled_with_the_pdp(
    pep: PepProcess, pdp: PdpProcess, envelope_path: Path
) -> None:
    import time

    stub, run_id = bound_run(pdp, envelope_path)
    before = stub.GetRun(pdp_pb2.GetRunRequest(run_id=run_id)).spent.tokens
    reply = oai(pep).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count me"}], max_tokens=100
    )
    assert reply.usage is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        run = stub.GetRun(pdp_pb2.GetRunRequest(run_id=run_id))
        if run.spent.tokens == before + reply.usage.total_tokens:
            break
        time.sleep(0.02)
    assert run.spent.tokens == before + reply.usage.total_tokens
    # Nothing is left reserved: every forwarded call has been settled.
    assert run.spent.tokens + run.remaining.tokens == 200000


# ---- attacks found in review: each must be refused, and nothing forwarded ----------------


def test_an_agent_chosen_request_id_never_replays_a_paid_allow(
    pep: PepProcess, pdp: PdpProcess, envelope_path: Path
) -> None:
    stub, run_id = bound_run(pdp, envelope_path)
    before = stub.GetRun(pdp_pb2.GetRunRequest(run_id=run_id)).remaining.requests
    same = {
        "x-request-id": "agent-picked",
        "idempotency-key": "agent-picked",
        "authorization": f"Bearer {API_KEY}",
    }
    ids = set()
    for _ in range(3):
        reply = httpx.post(
            f"{pep.url}/openai/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "again"}]},
            headers=same,
            timeout=10,
        )
        assert reply.status_code == 200
        ids.add(reply.headers["x-abc-decision-id"])
    assert len(ids) == 3  # three decisions, three charges: not one allow replayed
    assert stub.GetRun(pdp_pb2.GetRunRequest(run_id=run_id)).remaining.requests == before - 3


def test_a_bound_sidecar_ignores_no_run_header_but_refuses_another_run(
    pep: PepProcess, fakes: FakeUpstreams
) -> None:
    before = len(fakes.recorder.find("openai"))
    reply = httpx.post(
        f"{pep.url}/openai/v1/chat/completions",
        json={"model": MODEL, "messages": []},
        headers={"x-abc-run": "run_someone_elses"},
    )
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "bad_request"
    assert len(fakes.recorder.find("openai")) == before


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        (
            "/openai/v1/responses",
            {"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]},
            {},
        ),
        (
            "/openai/v1/responses",
            {
                "model": MODEL,
                "input": "x",
                "tools": [{"type": "mcp", "server_url": "https://attacker.example/mcp"}],
            },
            {},
        ),
        (
            "/openai/v1/chat/completions",
            {"model": MODEL, "messages": [], "web_search_options": {"x": 1}},
            {},
        ),
        ("/openai/v1/chat/completions", {"model": MODEL, "messages": [], "n": 8}, {}),
        (
            "/anthropic/v1/messages",
            {
                "model": CLAUDE,
                "max_tokens": 5,
                "messages": [],
                "mcp_servers": [{"type": "url", "url": "https://attacker.example"}],
            },
            {},
        ),
        (
            "/anthropic/v1/messages",
            {
                "model": CLAUDE,
                "max_tokens": 5,
                "messages": [],
                "tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}],
            },
            {},
        ),
        ("/openai/v1/chat%2Fcompletions", {"model": MODEL, "messages": []}, {}),
        (
            "/openai/v1/chat/completions",
            {"model": MODEL, "messages": []},
            {"X-HTTP-Method-Override": "DELETE"},
        ),
        (
            "/openai/v1/chat/completions",
            {"model": MODEL, "messages": []},
            {"Content-Encoding": "gzip"},
        ),
        (
            "/openai/v1/chat/completions",
            {"model": MODEL, "messages": [], "x": "&model=o1-pro&"},
            {"Content-Type": "application/x-www-form-urlencoded"},
        ),
        ("/openai/v1/chat/completions?model=o1-pro", {"model": MODEL, "messages": []}, {}),
        ("/openai/v1/chat/completions", {"model": MODEL, "Model": "o1-pro", "messages": []}, {}),
        ("/openai/v1/completions", {"model": MODEL, "max_tokens": 5, "prompt": ["a", "b"]}, {}),
    ],
    ids=[
        "web-search-tool",
        "remote-mcp-tool",
        "web-search-options",
        "n-completions",
        "anthropic-mcp-servers",
        "anthropic-server-tool",
        "encoded-path",
        "method-override",
        "compressed-body",
        "form-body",
        "query-string",
        "case-variant-key",
        "prompt-batch",
    ],
)
def test_requests_that_cannot_be_judged_faithfully_are_refused(
    pep: PepProcess, fakes: FakeUpstreams, path: str, body: dict[str, Any], headers: dict[str, str]
) -> None:
    before = len(fakes.recorder.requests)
    reply = httpx.post(
        f"{pep.url}{path}",
        content=json.dumps(body),
        headers={"Content-Type": "application/json", "anthropic-version": "2023-06-01", **headers},
    )
    assert reply.status_code == 400, reply.text
    assert "bad_request" in reply.text
    assert len(fakes.recorder.requests) == before


def test_client_side_tools_are_allowed(pep: PepProcess) -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    assert oai(pep).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        tools=[tool],  # type: ignore[list-item]
    )
    assert claude(pep).messages.create(
        model=CLAUDE,
        max_tokens=16,
        messages=[{"role": "user", "content": "hi"}],
        tools=[{"name": "lookup", "input_schema": {"type": "object"}}],
    )


def test_model_routes_take_post_only(pep: PepProcess, fakes: FakeUpstreams) -> None:
    before = len(fakes.recorder.find("openai"))
    for method in ("GET", "DELETE", "PUT"):
        reply = httpx.request(method, f"{pep.url}/openai/v1/chat/completions?limit=100")
        assert reply.status_code == 400, method
    assert len(fakes.recorder.find("openai")) == before


def _mcp_post(pep: PepProcess, message: Any, method: str = "POST") -> httpx.Response:
    return httpx.request(
        method,
        f"{pep.url}/mcp/kbjson",
        content=json.dumps(message),
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        },
    )


@pytest.mark.parametrize(
    ("message", "method"),
    [
        (
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "delete_everything"},
            },
            "PUT",
        ),
        (
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "delete_everything"},
            },
            "GET",
        ),
        (
            {
                "jsonrpc": "2.0",
                "id": 1,
                "Method": "tools/call",
                "params": {"name": "delete_everything"},
            },
            "POST",
        ),
        (
            {"jsonrpc": "2.0", "id": 1, "method": None, "params": {"name": "delete_everything"}},
            "POST",
        ),
        ({"jsonrpc": "2.0", "id": 1, "method": ["tools/call"]}, "POST"),
        ({"jsonrpc": "2.0", "id": 1, "method": "notifications/x", "params": {"name": "d"}}, "POST"),
        ({"jsonrpc": "2.0", "id": 9007199254740993, "method": "tools/list"}, "POST"),
        (
            {
                "jsonrpc": "2.0",
                "id": 2,
                # 2025-11-25's tasks are not governed: default deny.
                "method": "tasks/list",
                "params": {},
            },
            "POST",
        ),
        ([{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}], "POST"),
    ],
    ids=[
        "put",
        "get-with-body",
        "method-casing",
        "method-null",
        "method-not-string",
        "notification-with-id",
        "id-beyond-2^53",
        "ungoverned-method",
        "batch",
    ],
)
def test_mcp_messages_outside_the_protocol_are_refused(
    pep: PepProcess, fakes: FakeUpstreams, message: Any, method: str
) -> None:
    before = len(fakes.recorder.find("mcp-json"))
    reply = _mcp_post(pep, message, method)
    assert reply.status_code in (200, 400), reply.text
    assert "bad_request" in reply.text
    assert len(fakes.recorder.find("mcp-json")) == before


def test_mcp_arguments_json_cannot_carry_are_refused_not_crashed(pep: PepProcess) -> None:
    raw = (
        b'{"jsonrpc":"2.0","id":3,"method":"tools/call",'
        b'"params":{"name":"search","arguments":{"query":1e999}}}'
    )
    reply = httpx.post(
        f"{pep.url}/mcp/kbjson", content=raw, headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 200 and reply.json()["error"]["data"]["reason"] == "bad_request"


def test_a_body_arriving_in_pieces_is_read_whole(pep: PepProcess) -> None:
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x" * 100_000}]}
    ).encode()

    def pieces() -> Any:
        yield body[:1000]
        import time

        time.sleep(0.05)
        yield body[1000:]

    reply = httpx.post(
        f"{pep.url}/openai/v1/chat/completions",
        content=pieces(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    assert reply.status_code == 200, reply.text


def test_paths_are_not_logged(pep: PepProcess) -> None:
    reply = httpx.get(f"{pep.url}/http/billing.internal/v1/token/sk-live-SECRET123")
    assert reply.status_code == 403
    assert "sk-live-SECRET123" not in pep.output()


def test_x_abc_step_moves_the_run_before_the_call_and_repeats_as_a_no_op(
    pdp: PdpProcess, fakes: FakeUpstreams, signer: Signer, tmp_path: Path
) -> None:
    """In the demo intent, claude is used in step 'answer' only, which comes after 'research'."""
    envelope = tmp_path / "steps.json"
    envelope.write_bytes(
        signer.freeze(INTENT.read_text().replace("acme/support-bot", "acme/steps"), "steps")
    )
    own = start_pep(pdp.address, upstream_map(fakes), tmp_path, "--manifest", str(envelope))
    ask = {"model": CLAUDE, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    try:
        with pytest.raises(anthropic.PermissionDeniedError) as early:
            claude(own).messages.create(**ask)  # type: ignore[arg-type]
        assert early.value.body["abc"]["reason"] == "step_out_of_order"  # type: ignore[index]
        with pytest.raises(anthropic.PermissionDeniedError) as skipped:
            claude(own).messages.create(**ask, extra_headers={"x-abc-step": "nowhere"})  # type: ignore[arg-type]
        assert skipped.value.body["abc"]["reason"] == "step_out_of_order"  # type: ignore[index]
        # The header on every call of the phase: the first enters the step, the rest are no-ops.
        for _ in range(3):
            assert claude(own).messages.create(**ask, extra_headers={"x-abc-step": "answer"})  # type: ignore[arg-type]
        with pytest.raises(openai.PermissionDeniedError) as back:
            oai(own).chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-abc-step": "research"},
            )
        assert back.value.code == "step_out_of_order"
    finally:
        own.stop()
