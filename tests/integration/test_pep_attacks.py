"""Issue 19, held-out attacks on the sidecar: requests judged on one thing and forwarded as
another, and answers in the wrong shape. Official SDKs (or raw HTTP where an SDK cannot send
the attack) → real abc-pep → real abc-pdp → upstreams on loopback that record the exact bytes
they received. Each case is refused in the agent's protocol and nothing is forwarded, or it is
forwarded exactly as decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.fakes.serve import AiohttpThread, FakeUpstreams
from tests.harness import API_KEY, INTENT, PdpProcess, PepProcess, Signer, sample, start_pep

MODEL = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
BILLING = "/http/billing.internal"


@dataclass
class Seen:
    """What the raw upstream received: the request line's target and the body, as bytes."""

    method: str
    raw_path: str
    raw_query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class RawUpstream:
    """Answers anything; a chat completion reports the bytes it got as its prompt tokens, the
    way an upstream's own count bills what was forwarded, not what the agent sent."""

    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        async def record(request: web.Request) -> web.Response:
            body = await request.read()
            self.seen.append(
                Seen(
                    request.method,
                    request.raw_path.split("?", 1)[0],
                    request.raw_path.split("?", 1)[1] if "?" in request.raw_path else "",
                    {k.lower(): v for k, v in request.headers.items()},
                    body,
                )
            )
            if request.path.endswith("/chat/completions"):
                sent = json.loads(body)
                completion = sent.get("max_completion_tokens") or sent.get("max_tokens") or 0
                return web.json_response(
                    {
                        "id": "c",
                        "object": "chat.completion",
                        "created": 1,
                        "model": MODEL,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "ok"},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": len(body),
                            "completion_tokens": completion,
                            "total_tokens": len(body) + completion,
                        },
                    }
                )
            return web.json_response({"ok": True})

        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", record)
        return app


def attack_intent(lineage: str, tokens: int = 300000) -> str:
    text = INTENT.read_text().replace("acme/support-bot", f"acme/{lineage}")
    text = text.replace("tokens: 200000", f"tokens: {tokens}")
    # Claude is usable in the first step too, so one step serves every provider.
    return text.replace(
        "uses: [model:openai/gpt-4o-mini, tool:kb/search,",
        f"uses: [model:openai/gpt-4o-mini, model:anthropic/{CLAUDE}, tool:kb/search,",
    )


@pytest.fixture(scope="module")
def raw() -> Iterator[tuple[RawUpstream, str]]:
    upstream = RawUpstream()
    thread = AiohttpThread({"raw": (upstream.app(), 0)})
    thread.start(10)
    yield upstream, f"http://127.0.0.1:{thread.ports['raw']}"
    thread.stop(5)


def _start(
    pdp: PdpProcess, signer: Signer, tmp: Path, lineage: str, upstreams: dict[str, str], **kw: int
) -> PepProcess:
    envelope = tmp / f"{lineage}.json"
    envelope.write_bytes(signer.freeze(attack_intent(lineage, **kw), lineage))
    return start_pep(pdp.address, upstreams, tmp, "--manifest", str(envelope))


@pytest.fixture(scope="module")
def pep(
    pdp: PdpProcess,
    signer: Signer,
    fakes: FakeUpstreams,
    raw: tuple[RawUpstream, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PepProcess]:
    """OpenAI and Anthropic go to the recording fakes; plain HTTP to the raw upstream."""
    process = _start(
        pdp,
        signer,
        tmp_path_factory.mktemp("attacks"),
        "attacks",
        {
            "openai": fakes.openai_url.removesuffix("/v1"),
            "anthropic": fakes.anthropic_url,
            "mcp:kb": fakes.mcp_json_url,
            "http:billing.internal": raw[1],
        },
        tokens=10_000_000,
    )
    yield process
    process.stop()


def oai(pep: PepProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pep.url}/openai/v1", api_key=API_KEY, max_retries=0)


def claude(pep: PepProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{pep.url}/anthropic", api_key=API_KEY, max_retries=0)


def post_raw(pep: PepProcess, path: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{pep.url}{path}",
        content=body,
        headers={
            "Content-Type": "application/json",
            "anthropic-version": "2023-06-01",
            "Authorization": f"Bearer {API_KEY}",
            **headers,
        },
        timeout=10,
    )


def refused(reply: httpx.Response, status: int, reason: str) -> None:
    """A refusal in the agent's protocol: status, reason code and the decision id, both ways."""
    assert reply.status_code == status, reply.text
    assert reply.headers["x-abc-reason"] == reason
    decision_id = reply.headers["x-abc-decision-id"]
    assert decision_id and decision_id in reply.text


# ---- plain HTTP: forwarded byte for byte as decided ---------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/invoices/42",
        "/v1/invoices/caf%C3%A9",
        "/v1/invoices/caf%c3%a9",
        "/v1/invoices/a%3Bb;v=1",
        "/v1/invoices/a%20b%2Bc",
        "/v1/invoices/x@y:z!$&'()*+,=",
    ],
    ids=["plain", "upper-escape", "lower-escape", "escaped-semicolon", "space-plus", "sub-delims"],
)
def test_http_path_and_query_reach_the_upstream_exactly_as_sent(
    pep: PepProcess, raw: tuple[RawUpstream, str], path: str
) -> None:
    upstream, _ = raw
    query = "q=a%3Bb&r=%2F&s=caf%C3%A9&t"
    reply = httpx.get(f"{pep.url}{BILLING}{path}?{query}", timeout=10)
    assert reply.status_code == 200, reply.text
    assert upstream.seen[-1].raw_path == path
    assert upstream.seen[-1].raw_query == query


@pytest.mark.parametrize(
    "path",
    [
        "/v1/invoices/..%3b/..%3b/admin/secrets",
        "/v1/invoices/..%3B/admin",
        "/v1/invoices/.%3b/x",
        "/v1/invoices/%e0%80%ae%e0%80%ae/admin",
        "/v1/invoices/%f0%80%80%ae%f0%80%80%ae/admin",
        "/v1/invoices/%c0%ae%c0%ae/admin",
        "/v1/invoices/%ed%a0%80",
        "/v1/invoices/%ff",
        "/v1/invoices/%c3",
        "/v1/invoices/%41dmin",
        "/v1/invoices/%7e",
        "/v1/invoices/%2e%2e/admin",
        "/v1/invoices/%2F..%2Fadmin",
        "/v1/invoices/%5c..%5cadmin",
        "/v1/invoices/%252e%252e/admin",
        "/v1/invoices/%zz",
        "/v1/invoices/%4",
        "/v1/invoices/%00",
        "/v1/invoices/%ef%bc%8e%ef%bc%8e/admin",
        "/v1/invoices/%e2%80%a5/admin",
        "/v1/invoices/..",
    ],
    ids=[
        "dot-dot-escaped-semicolon",
        "dot-dot-escaped-semicolon-upper",
        "dot-escaped-semicolon",
        "overlong-3-byte-dot",
        "overlong-4-byte-dot",
        "overlong-2-byte-dot",
        "utf8-surrogate",
        "invalid-byte",
        "truncated-sequence",
        "escaped-letter",
        "escaped-tilde",
        "escaped-dots",
        "escaped-slash",
        "escaped-backslash",
        "double-escaped-dots",
        "not-hex",
        "short-escape",
        "nul",
        "fullwidth-dots",
        "two-dot-leader",
        "raw-dot-dot",
    ],
)
def test_http_paths_an_upstream_could_read_otherwise_are_refused(
    pep: PepProcess, raw: tuple[RawUpstream, str], path: str
) -> None:
    upstream, _ = raw
    before = len(upstream.seen)
    with httpx.Client() as client:
        # Sent as typed: httpx would normalise the path otherwise.
        request = client.build_request("GET", f"{pep.url}{BILLING}/x")
        request.url = request.url.copy_with(raw_path=f"{BILLING}{path}".encode())
        reply = client.send(request)
    assert reply.status_code in (400, 403), reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    assert reply.json()["reason"] in ("http_not_allowed", "bad_request")
    assert reply.headers["x-abc-decision-id"] == reply.json()["decision_id"]
    assert len(upstream.seen) == before


@pytest.mark.parametrize(
    "header",
    [
        "X_HTTP_Method_Override",
        "X_HTTP_METHOD",
        "X_Method_Override",
        "X_Original_URL",
        "X_Rewrite_URL",
        "x_original_method",
        "X-Original-URI",
        "X-Forwarded-Method",
        "X-Forwarded-Uri",
        "X-Forwarded-Prefix",
        "X_Forwarded_Prefix",
        "Content_Encoding",
        "Transfer_Encoding",
        "Content_Length",
    ],
)
def test_override_headers_in_any_spelling_are_refused(
    pep: PepProcess, raw: tuple[RawUpstream, str], fakes: FakeUpstreams, header: str
) -> None:
    upstream, _ = raw
    before, models_before = len(upstream.seen), len(fakes.recorder.find("openai"))
    value = "/admin/secrets" if "ur" in header.lower() or "prefix" in header.lower() else "DELETE"
    if "encoding" in header.lower():
        value = "gzip" if "content" in header.lower() else "chunked"
    if "length" in header.lower():
        value = "0"
    reply = httpx.get(f"{pep.url}{BILLING}/v1/invoices/1", headers={header: value})
    refused(reply, 400, "bad_request")
    with pytest.raises(openai.BadRequestError) as caught:
        oai(pep).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], extra_headers={header: value}
        )
    assert caught.value.code == "bad_request"
    assert len(upstream.seen) == before
    assert len(fakes.recorder.find("openai")) == models_before


@pytest.mark.parametrize("query", ["_method=DELETE", "_METHOD=delete", "x=1&%5Fmethod=PUT"])
def test_method_override_in_the_query_is_refused(
    pep: PepProcess, raw: tuple[RawUpstream, str], query: str
) -> None:
    upstream, _ = raw
    before = len(upstream.seen)
    reply = httpx.get(f"{pep.url}{BILLING}/v1/invoices/1?{query}")
    refused(reply, 400, "bad_request")
    assert len(upstream.seen) == before


# ---- model requests: provider-side tools, token fields, the forwarded bytes ----------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/openai/v1/chat/completions", {"model": MODEL, "messages": [], "web_search_options": {}}),
        (
            "/openai/v1/chat/completions",
            {"model": MODEL, "messages": [], "web_search_options": None},
        ),
        (
            "/anthropic/v1/messages",
            {"model": CLAUDE, "max_tokens": 5, "messages": [], "mcp_servers": []},
        ),
        (
            "/anthropic/v1/messages",
            {"model": CLAUDE, "max_tokens": 5, "messages": [], "container": "c_1"},
        ),
        (
            "/openai/v1/responses",
            {"model": MODEL, "input": "x", "prompt": {"id": "pmpt_1"}},
        ),
        ("/openai/v1/chat/completions", {"model": MODEL, "messages": [], "n": True}),
        ("/openai/v1/chat/completions", {"model": MODEL, "messages": [], "n": 1.0}),
        ("/openai/v1/completions", {"model": MODEL, "prompt": "x", "best_of": "2"}),
    ],
    ids=[
        "web-search-empty",
        "web-search-null",
        "anthropic-mcp-servers-empty",
        "anthropic-container",
        "responses-stored-prompt",
        "n-true",
        "n-float",
        "best-of-string",
    ],
)
def test_provider_side_fields_are_refused_by_presence(
    pep: PepProcess, fakes: FakeUpstreams, path: str, body: dict[str, Any]
) -> None:
    before = len(fakes.recorder.requests)
    refused(post_raw(pep, path, json.dumps(body).encode()), 400, "bad_request")
    assert len(fakes.recorder.requests) == before


def test_every_token_field_is_capped(pep: PepProcess, fakes: FakeUpstreams) -> None:
    oai(pep).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_completion_tokens=10,
        max_tokens=100000,
    )
    sent = fakes.recorder.last("openai", path="/v1/chat/completions").body
    assert sent["max_completion_tokens"] == 10 and sent["max_tokens"] == 2048
    reply = post_raw(
        pep,
        "/openai/v1/chat/completions",
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],'
        b'"max_tokens":null,"max_completion_tokens":7}',
    )
    assert reply.status_code == 200, reply.text
    sent = fakes.recorder.last("openai", path="/v1/chat/completions").body
    assert sent["max_completion_tokens"] == 7 and sent["max_tokens"] == 7


def test_responses_and_anthropic_caps_are_written(pep: PepProcess, fakes: FakeUpstreams) -> None:
    oai(pep).responses.create(model=MODEL, input="x", max_output_tokens=100000)
    assert fakes.recorder.last("openai", path="/v1/responses").body["max_output_tokens"] == 2048
    claude(pep).messages.create(
        model=CLAUDE, max_tokens=8192, messages=[{"role": "user", "content": "x"}]
    )
    assert fakes.recorder.last("anthropic").body["max_tokens"] == 1024


def test_a_capped_body_keeps_the_agents_bytes(pep: PepProcess, fakes: FakeUpstreams) -> None:
    numbers = ",".join(["1e9"] * 2000)
    sent = (
        '{"model" : "gpt-4o-mini",\n "messages":[{"role":"user","content":"caf\\u00e9 \u00e9"}],'
        f' "metadata":{{"n":[{numbers}]}}, "max_tokens" :  100000 , "temperature":1.0E0}}'
    ).encode()
    reply = post_raw(pep, "/openai/v1/chat/completions", sent)
    assert reply.status_code == 200, reply.text
    received = fakes.recorder.last("openai", path="/v1/chat/completions").raw_body
    assert received == sent.replace(b'"max_tokens" :  100000 ', b'"max_tokens" :  2048 ')


def test_a_cap_inserted_into_a_body_keeps_the_rest(pep: PepProcess, fakes: FakeUpstreams) -> None:
    sent = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],"temperature":1E0}'
    assert post_raw(pep, "/openai/v1/chat/completions", sent).status_code == 200
    received = fakes.recorder.last("openai", path="/v1/chat/completions").raw_body
    assert received.endswith(sent[1:])  # the agent's bytes, after the cap put in front
    assert json.loads(received)["max_completion_tokens"] == 2048


def test_forwarded_bytes_never_spend_past_the_budget(
    pdp: PdpProcess, signer: Signer, raw: tuple[RawUpstream, str], tmp_path: Path
) -> None:
    """Four concurrent 80 KB calls whose numbers would grow if re-serialised, on a budget of
    300,000 tokens: what the upstream counts (bytes received + completion cap) stays within."""
    upstream, url = raw
    own = _start(pdp, signer, tmp_path, "budget-bytes", {"openai": url})
    numbers = ",".join(["1e9"] * 20000)
    body = (
        f'{{"model":"gpt-4o-mini","messages":[],"metadata":{{"n":[{numbers}]}},'
        f'"max_tokens":100000}}'
    ).encode()
    before = len(upstream.seen)

    async def one(client: httpx.AsyncClient) -> int:
        reply = await client.post(
            f"{own.url}/openai/v1/chat/completions",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        return reply.status_code

    async def all_four() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            return list(await asyncio.gather(*(one(client) for _ in range(4))))

    try:
        statuses = asyncio.run(all_four())
    finally:
        own.stop()
    forwarded = upstream.seen[before:]
    assert statuses.count(200) == len(forwarded) >= 1, (statuses, pdp.output()[-3000:])
    counted = sum(len(s.body) + json.loads(s.body)["max_tokens"] for s in forwarded)
    assert counted <= 300000, (statuses, counted)
    assert all(len(s.body) <= len(body) for s in forwarded)


# ---- answers in the wrong shape: the agent's bad input is its own 400 ---------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/openai/v1/chat/completions", b'{"model":"gpt-4o-mini\\ud800","messages":[]}'),
        ("/openai/v1/chat/completions", b'{"model":"gpt-4o-mini\\n","messages":[]}'),
        ("/openai/v1/chat/completions", b'{"model":"gpt-4o-mini\\u0000","messages":[]}'),
        ("/openai/v1/chat/completions", b'{"model":"gpt-4o-mini","max_tokens":%d}' % 2**63),
        (
            "/openai/v1/chat/completions",
            b'{"model":"gpt-4o-mini","max_tokens":18446744073709551617}',
        ),
        ("/openai/v1/chat/completions", b'{"model":"gpt-4o-mini","max_tokens":-1}'),
        ("/openai/v1/chat/completions", b'{"model":"gpt-4o-mini","max_tokens":10.5}'),
        ("/openai/v1/chat/completions", b'{"model":"gpt-4o-mini","max_completion_tokens":"9"}'),
        ("/openai/v1/responses", b'{"model":"gpt-4o-mini","max_output_tokens":1e999}'),
        ("/anthropic/v1/messages", b'{"model":"claude-haiku-4-5\\ud800","max_tokens":5}'),
        ("/anthropic/v1/messages", b'{"model":"claude-haiku-4-5","max_tokens":%d}' % (2**64 + 1)),
        ("/openai/v1/chat/completions", b"\xff\xfe{\x00}\x00"),
        ("/openai/v1/chat/completions", '{"model":"gpt-4o-mini"}'.encode("utf-16")),
        ("/openai/v1/chat/completions", b'\xef\xbb\xbf{"model":"gpt-4o-mini"}'),
        ("/openai/v1/chat/completions", b'{"model":"gpt-4o-mini\xff"}'),
    ],
    ids=[
        "lone-surrogate",
        "trailing-newline",
        "nul",
        "2^63",
        "2^64+1",
        "negative",
        "fraction",
        "string",
        "infinite",
        "anthropic-surrogate",
        "anthropic-2^64+1",
        "utf16-bom",
        "utf16",
        "utf8-bom",
        "invalid-utf8",
    ],
)
def test_bad_model_requests_are_the_agents_400(
    pep: PepProcess, fakes: FakeUpstreams, path: str, body: bytes
) -> None:
    before = len(fakes.recorder.requests)
    reply = post_raw(pep, path, body)
    refused(reply, 400, "bad_request")
    if path.startswith("/openai"):
        assert reply.json()["error"]["code"] == "bad_request"
    else:
        assert reply.json()["type"] == "error"
    assert len(fakes.recorder.requests) == before


def test_sdks_raise_their_bad_request_error(pep: PepProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai(pep).chat.completions.create(model=MODEL + "\n", messages=[])
    assert caught.value.code == "bad_request"
    with pytest.raises(anthropic.BadRequestError) as refused_claude:
        claude(pep).messages.create(model=CLAUDE + "\n", max_tokens=5, messages=[])
    assert refused_claude.value.body["abc"]["reason"] == "bad_request"  # type: ignore[index]


def _call(pep: PepProcess, name: str, args: dict[str, Any]) -> dict[str, Any]:
    async def work() -> dict[str, Any]:
        async with (
            streamable_http_client(f"{pep.url}/mcp/kb") as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            try:
                result = await session.call_tool(name, args)
            except MCPError as exc:  # a call that cannot be judged: a protocol error
                return {"reason": (exc.error.data or {}).get("reason")}
            if result.is_error and result.meta:  # a call judged and refused: a tool result
                return {"reason": result.meta["abc/reason"]}
            return {"ok": not result.is_error}

    return asyncio.run(work())


@pytest.mark.parametrize(
    ("name", "args", "reason"),
    [
        ("search\n", {"query": "x"}, "bad_request"),
        # A fraction is judged like any number (type: number may take one): not an integer.
        ("search", {"query": "x", "top_k": 5.5}, "tool_args_invalid"),
        ("search", {"query": "x", "top_k": 2**64 + 1}, "bad_request"),
        ("delete_everything", {}, "tool_not_allowed"),
    ],
    ids=["trailing-newline", "fractional-integer", "huge-integer", "control-not-granted"],
)
def test_mcp_bad_tool_calls_are_refused_as_the_agents_fault(
    pep: PepProcess, fakes: FakeUpstreams, name: str, args: dict[str, Any], reason: str
) -> None:
    before = len(fakes.recorder.tool_calls("mcp-json"))
    assert _call(pep, name, args) == {"reason": reason}
    assert len(fakes.recorder.tool_calls("mcp-json")) == before


@pytest.mark.parametrize(
    "params",
    [
        b'{"name":"search\\ud800","arguments":{"query":"x"}}',
        b'{"name":"search","arguments":{"query":"x\\udfff"}}',
        b'{"name":"search","arguments":{"\\ud800":"x"}}',
        b'{"name":"search\\u000a","arguments":{"query":"x"}}',
    ],
    ids=["surrogate-name", "surrogate-value", "surrogate-key", "escaped-newline"],
)
def test_mcp_calls_an_sdk_cannot_send_are_refused_too(
    pep: PepProcess, fakes: FakeUpstreams, params: bytes
) -> None:
    before = len(fakes.recorder.find("mcp-json"))
    body = b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":' + params + b"}"
    reply = post_raw(pep, "/mcp/kb", body, Accept="application/json, text/event-stream")
    assert reply.status_code == 200, reply.text
    assert reply.json()["id"] == 5
    assert reply.json()["error"]["data"]["reason"] == "bad_request"
    assert reply.json()["error"]["data"]["decision_id"] == reply.headers["x-abc-decision-id"]
    assert len(fakes.recorder.find("mcp-json")) == before


def test_local_refusals_are_counted(pep: PepProcess) -> None:
    before = pep.metrics()
    post_raw(pep, "/openai/v1/chat/completions", b'{"model":"gpt-4o-mini\\n"}')
    after = pep.metrics()

    def denials(text: str) -> float:
        try:
            return sample(text, "abc_pep_denials_total", reason="bad_request", route="openai")
        except AssertionError:
            return 0.0

    assert denials(after) == denials(before) + 1


# ---- obligations the sidecar cannot check fail closed -------------------------------------


class LyingPdp(pdp_pb2_grpc.DecisionServiceServicer):
    """Allows, with the obligations a test sets."""

    def __init__(self) -> None:
        self.obligations: dict[str, Any] = {}

    def Decide(self, request, context):  # type: ignore[no-untyped-def]
        from google.protobuf import struct_pb2

        obligations = struct_pb2.Struct()
        obligations.update(self.obligations)
        return pdp_pb2.DecideResponse(
            allow=True, decision_id="dec_lie", obligations=obligations, reservation_id="res_1"
        )

    def ReportUsageBatch(self, request, context):  # type: ignore[no-untyped-def]
        return pdp_pb2.ReportUsageBatchResponse(settled=[True] * len(request.reports))


@pytest.mark.parametrize(
    "obligations",
    [
        {"max_tokens": "10"},
        {"max_tokens": -5},
        {"max_tokens": 0},
        {"max_tokens": 10.5},
        {"max_tokens": 1e12},
        {"max_tokens": True},
        {"max_tokens": None},
        {"max_tokens": [10]},
        {},
        {"max_tokens": 10, "redact": True},
    ],
    ids=[
        "string",
        "negative",
        "zero",
        "fraction",
        "huge",
        "bool",
        "null",
        "list",
        "missing",
        "unknown-obligation",
    ],
)
def test_malformed_obligations_fail_closed(
    fakes: FakeUpstreams, tmp_path: Path, obligations: dict[str, Any]
) -> None:
    from concurrent import futures

    import grpc

    from tests.harness import free_port

    lying = LyingPdp()
    lying.obligations = obligations
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pdp_pb2_grpc.add_DecisionServiceServicer_to_server(lying, server)  # type: ignore[no-untyped-call]
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    own = start_pep(
        f"127.0.0.1:{port}",
        {"openai": fakes.openai_url.removesuffix("/v1")},
        tmp_path,
        "--run",
        "run_any",
    )
    before = len(fakes.recorder.find("openai"))
    try:
        reply = post_raw(
            own,
            "/openai/v1/chat/completions",
            b'{"model":"gpt-4o-mini","messages":[],"max_tokens":100000}',
        )
        refused(reply, 503, "pdp_unavailable")
        assert len(fakes.recorder.find("openai")) == before
    finally:
        own.stop()
        server.stop(0)


# ---- fuzz: forwarded exactly as decided, or refused in the agent's protocol; counted -------

_PIECES = st.sampled_from(
    [
        "/",
        "a",
        "1",
        ".",
        "..",
        ";",
        "%3b",
        "%2e",
        "%2F",
        "%5c",
        "%25",
        "%c0%ae",
        "%e0%80%ae",
        "%ef%bc%8e",
        "%c3%a9",
        "%20",
        "%00",
        "%zz",
        "~",
        "@",
        "invoices",
    ]
)
_HEADERS = st.sampled_from(
    [
        {},
        {"X_HTTP_Method": "DELETE"},
        {"x-original-url": "/admin"},
        {"X-Custom": "1"},
        {"X_Custom": "1"},
        {"Content_Length": "0"},
        {"x_abc_step": "answer"},
    ]
)


def _requests_seen(text: str) -> float:
    total = 0.0
    for decision in ("allow", "deny"):
        with contextlib.suppress(AssertionError):  # not exported until first counted
            total += sample(text, "abc_pep_requests_total", decision=decision, route="http")
    return total


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    pieces=st.lists(_PIECES, max_size=6),
    headers=_HEADERS,
    query=st.sampled_from(["", "a=%2F", "_method=PUT"]),
)
def test_fuzz_http_requests_are_forwarded_exactly_or_refused(
    pep: PepProcess,
    raw: tuple[RawUpstream, str],
    pieces: list[str],
    headers: dict[str, str],
    query: str,
) -> None:
    upstream, _ = raw
    path = "/v1/invoices/" + "".join(pieces)
    before_seen, before_counted = len(upstream.seen), _requests_seen(pep.metrics())
    target = f"{BILLING}{path}" + (f"?{query}" if query else "")
    with httpx.Client(timeout=10) as client:
        request = client.build_request("GET", f"{pep.url}/x", headers=headers)
        request.url = request.url.copy_with(raw_path=target.encode())
        reply = client.send(request)
    assert _requests_seen(pep.metrics()) == before_counted + 1  # every request is counted
    if reply.status_code == 200:
        assert len(upstream.seen) == before_seen + 1
        assert (upstream.seen[-1].raw_path, upstream.seen[-1].raw_query) == (path, query)
        assert reply.headers["x-abc-decision-id"].startswith("dec_")
    else:
        assert reply.status_code in (400, 403), reply.text
        assert reply.headers["content-type"].startswith("application/problem+json")
        assert reply.json()["decision_id"] == reply.headers["x-abc-decision-id"]
        assert len(upstream.seen) == before_seen
