"""Both MCP revisions on one sidecar route, as agents speak them now.

The official ``mcp`` 2.x client (``mcp.Client``: ``mode="auto"`` probes ``server/discover``
and speaks 2026-07-28; ``mode="legacy"`` is the 2025-11-25 initialize handshake) → real
abc-pep → real abc-pdp → the SDK's own server, SSE and JSON framings. Where no SDK call
makes the case (a header that lies about the body, an ``InputRequiredResult`` retry), raw
JSON-RPC over httpx as the spec writes it, to a scripted server that records what arrived.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from aiohttp import web
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import PromptReference, ResourceTemplateReference

from tests.fakes.serve import AiohttpThread, FakeUpstreams
from tests.harness import PdpProcess, PepProcess, Signer, free_port, sample, start_pep
from tests.integration.test_pep import pep_intent, upstream_map

MODERN = "2026-07-28"
VERSION_KEY = "io.modelcontextprotocol/protocolVersion"


def intent() -> str:
    """The sidecar tests' intent, with ``kbx`` (the scripted server) granting fetch_article."""
    text = pep_intent().replace(
        "  - server: kb\n    name: fetch_article",
        "  - server: kbx\n    name: fetch_article\n    args:\n"
        "      article_id: {type: string, required: true}\n  - server: kb\n    name: fetch_article",
    )
    text = text.replace("tool:kb/search,", "tool:kb/search, tool:kbx/fetch_article,")
    grants = (
        "resources:\n  - server: kb\n    uri_prefix: file:///docs/\n"
        "prompts:\n  - server: kb\n    name: summarize\n\nbudgets:"
    )
    text = text.replace("\nbudgets:", "\n" + grants, 1)
    return text.replace(
        "tool:kbx/fetch_article,",
        "tool:kbx/fetch_article, resource:kb/file:///docs/, prompt:kb/summarize,",
    )


@pytest.fixture(scope="module")
def envelope_path(signer: Signer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("revisions") / "envelope.json"
    path.write_bytes(signer.freeze(intent(), "revisions"))
    return path


class Scripted:
    """A 2026-07-28 server reduced to what the cases need; it records every request."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, Any], dict[str, str]]] = []

    def calls(self) -> list[dict[str, Any]]:
        return [body for body, _ in self.seen if body.get("method") == "tools/call"]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append((body, dict(request.headers)))
        method, params = body.get("method"), body.get("params", {})
        if method == "tools/list":
            tools = [
                {
                    "name": "fetch_article",
                    "inputSchema": {
                        "type": "object",
                        "properties": {"article_id": {"type": "string", "x-mcp-header": "Article"}},
                    },
                },
                {"name": "delete_everything", "inputSchema": {"type": "object"}},
            ]
            result: dict[str, Any] = {"tools": tools, "resultType": "complete", "ttlMs": 0}
        elif method == "tools/call" and "inputResponses" not in params:
            # The server needs the user's say before it acts: ask, and carry state.
            result = {
                "resultType": "input_required",
                "inputRequests": {
                    "confirm": {"method": "elicitation/create", "params": {"message": "Sure?"}}
                },
                "requestState": "state-1",
            }
        else:
            text = f"done with {params.get('requestState')}"
            result = {"content": [{"type": "text", "text": text}], "resultType": "complete"}
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": result})


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[Scripted, str]]:
    server = Scripted()
    app = web.Application()
    app.router.add_post("/mcp", server.handle)
    port = free_port()
    thread = AiohttpThread({"scripted": (app, port)})
    thread.start(10)
    yield server, f"http://127.0.0.1:{port}/mcp"
    thread.stop(5)


@pytest.fixture(scope="module")
def pep(
    pdp: PdpProcess,
    fakes: FakeUpstreams,
    envelope_path: Path,
    scripted: tuple[Scripted, str],
) -> Iterator[PepProcess]:
    upstreams = {**upstream_map(fakes), "mcp:kbx": scripted[1]}
    process = start_pep(
        pdp.address, upstreams, envelope_path.parent, "--manifest", str(envelope_path)
    )
    yield process
    process.stop()


# ---- the official client, both revisions ------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "legacy"])
@pytest.mark.parametrize("server", ["kb", "kbjson"], ids=["sse", "json"])
def test_the_sdk_client_in_either_revision_sees_granted_tools_and_reads_refusals(
    pep: PepProcess, fakes: FakeUpstreams, server: str, mode: str
) -> None:
    upstream = "mcp-sse" if server == "kb" else "mcp-json"
    before_calls = fakes.recorder.tool_calls(upstream).count("delete_everything")
    before = pep.metrics()

    async def work() -> dict[str, Any]:
        async with Client(f"{pep.url}/mcp/{server}", mode=mode) as client:
            listed = sorted(tool.name for tool in (await client.list_tools()).tools)
            allowed = await client.call_tool("search", {"query": "refunds"})
            refused = await client.call_tool("delete_everything", {})
            return {
                "version": client.protocol_version,
                "listed": listed,
                "allowed": allowed,
                "refused": refused,
            }

    outcome = asyncio.run(work())
    assert outcome["version"] == (MODERN if mode == "auto" else "2025-11-25")
    assert outcome["listed"] == (["fetch_article", "search"] if server == "kb" else ["search"])
    assert not outcome["allowed"].is_error
    refused = outcome["refused"]
    meta = refused.meta or {}
    assert refused.is_error and meta["abc/reason"] == "tool_not_allowed"
    text = refused.content[0].text
    assert "tool_not_allowed" in text and meta["abc/decision_id"] in text
    assert fakes.recorder.tool_calls(upstream).count("delete_everything") == before_calls
    # server/discover is no refusal: no bad_request counted for a client that connects.
    after = pep.metrics()
    labels = {"route": "mcp", "reason": "bad_request"}
    assert sample(after, "abc_pep_denials_total", **labels) == sample(
        before, "abc_pep_denials_total", **labels
    )


# ---- raw 2026-07-28 requests ------------------------------------------------------------


def modern(method: str, params: dict[str, Any], request_id: int = 1) -> dict[str, Any]:
    meta = {VERSION_KEY: MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": method,
        "params": {**params, "_meta": meta},
    }


def headers_for(message: dict[str, Any], **extra: str) -> dict[str, str]:
    params = message["params"]
    named = params.get("name") or params.get("uri")
    found = {
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": message["method"],
        **({"Mcp-Name": named} if named else {}),
    }
    return {**found, **extra}


def post(pep: PepProcess, message: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    reply = httpx.post(f"{pep.url}/mcp/kbx", json=message, headers=headers, timeout=10)
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


def list_tools(pep: PepProcess) -> list[str]:
    message = modern("tools/list", {})
    result = post(pep, message, headers_for(message))["result"]
    assert result["ttlMs"] == 0 and result["resultType"] == "complete"  # relayed as sent
    return [tool["name"] for tool in result["tools"]]


FETCH = {"name": "fetch_article", "arguments": {"article_id": "KB-7"}}


@pytest.mark.parametrize(
    ("case", "params", "extra"),
    [
        ("method", FETCH, {"Mcp-Method": "tools/list"}),
        ("name", FETCH, {"Mcp-Name": "search"}),
        ("version", FETCH, {"MCP-Protocol-Version": "2025-11-25"}),
        ("no-method", FETCH, {"Mcp-Method": ""}),
        ("param", FETCH, {"Mcp-Param-Article": "KB-8"}),
        ("param-b64", FETCH, {"Mcp-Param-Article": "=?base64?S0ItOA==?="}),
        ("undeclared-param", FETCH, {"Mcp-Param-Article": "KB-7", "Mcp-Param-Other": "x"}),
    ],
)
def test_headers_that_disagree_with_the_body_are_refused_unforwarded(
    pep: PepProcess, scripted: tuple[Scripted, str], case: str, params: Any, extra: dict[str, str]
) -> None:
    server, _ = scripted
    assert list_tools(pep) == ["fetch_article"]  # the sidecar learns the header map here
    message = modern("tools/call", params, 5)
    headers = {k: v for k, v in headers_for(message, **extra).items() if v}
    before = len(server.seen)
    answer = post(pep, message, headers)
    assert answer["error"]["code"] == -32020, answer
    assert answer["error"]["data"]["reason"] == "bad_request"
    assert len(server.seen) == before  # never forwarded


def test_headers_that_agree_are_forwarded_as_sent(
    pep: PepProcess, scripted: tuple[Scripted, str]
) -> None:
    server, _ = scripted
    list_tools(pep)
    for value in ("KB-7", "=?base64?S0ItNw==?="):  # verbatim, and the spec's base64 form
        message = modern("tools/call", FETCH, 6)
        answer = post(pep, message, headers_for(message, **{"Mcp-Param-Article": value}))
        assert answer["result"]["resultType"] == "input_required", answer
        assert server.seen[-1][1]["Mcp-Param-Article"] == value


def test_an_unknown_protocol_version_names_the_ones_spoken(pep: PepProcess) -> None:
    message = modern("tools/list", {})
    message["params"]["_meta"][VERSION_KEY] = "2099-01-01"
    answer = post(pep, message, headers_for(message, **{"MCP-Protocol-Version": "2099-01-01"}))
    assert answer["error"]["code"] == -32022
    assert answer["error"]["data"]["supported"] == [MODERN]


def test_an_input_required_retry_is_decided_again_as_the_tool_call_it_is(
    pep: PepProcess, pdp: PdpProcess, scripted: tuple[Scripted, str]
) -> None:
    server, _ = scripted
    allowed = {"decision": "allow", "reason": "none", "mode": "enforce"}
    first = modern("tools/call", FETCH, 7)
    before = sample(pdp.metrics(), "abc_pdp_decisions_total", **allowed)
    asked = post(pep, first, headers_for(first))["result"]
    assert asked["resultType"] == "input_required"
    retry_params = {
        **FETCH,
        "inputResponses": {"confirm": {"action": "accept", "content": {}}},
        "requestState": asked["requestState"],
    }
    retry = modern("tools/call", retry_params, 8)
    done = post(pep, retry, headers_for(retry))["result"]
    assert done["content"][0]["text"] == "done with state-1"
    assert sample(pdp.metrics(), "abc_pdp_decisions_total", **allowed) == before + 2
    # A retry of a call the policy refuses is refused again, and never reaches the server.
    calls = len(server.calls())
    sneaky = modern("tools/call", {**retry_params, "name": "delete_everything", "arguments": {}}, 9)
    refused = post(pep, sneaky, headers_for(sneaky))["result"]
    assert refused["isError"] and refused["_meta"]["abc/reason"] == "tool_not_allowed"
    assert refused["resultType"] == "complete"
    assert len(server.calls()) == calls
    assert json.dumps(refused).count(refused["_meta"]["abc/decision_id"]) == 2


def test_list_probes_are_counted_as_probes_not_as_denied_calls(
    pep: PepProcess, pdp: PdpProcess
) -> None:
    """kb lists four tools and the manifest grants two: one list and one refused call are
    four probes (two shown, two hidden) and one denial, at the sidecar and at the PDP."""
    denied = {"decision": "deny", "reason": "tool_not_allowed", "mode": "enforce"}
    pep_denied = {"route": "mcp", "reason": "tool_not_allowed"}
    series = [
        (pdp.metrics, "abc_pdp_decisions_total", denied),
        (pdp.metrics, "abc_pdp_probes_total", {"decision": "deny"}),
        (pdp.metrics, "abc_pdp_probes_total", {"decision": "allow"}),
        (pep.metrics, "abc_pep_denials_total", pep_denied),
        (pep.metrics, "abc_pep_probes_total", {"decision": "deny"}),
        (pep.metrics, "abc_pep_probes_total", {"decision": "allow"}),
        (pep.metrics, "abc_pep_decision_seconds_count", {}),
    ]

    def read() -> list[float]:
        return [sample(scrape(), name, **labels) for scrape, name, labels in series]

    async def work() -> None:
        async with Client(f"{pep.url}/mcp/kb", mode="auto") as client:
            await client.list_tools()
            assert (await client.call_tool("admin_reset", {"confirm": True})).is_error

    before = read()
    asyncio.run(work())
    growth = [after - was for after, was in zip(read(), before, strict=True)]
    # The PEP's decision histogram holds every wait for the PDP: four probes, one call.
    assert growth == [1, 2, 2, 1, 2, 2, 5]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_resources_and_prompts_are_capabilities_like_tools(
    pep: PepProcess, fakes: FakeUpstreams, mode: str
) -> None:
    """The manifest grants file:///docs/ and the prompt summarize: lists show only those,
    reads and gets of anything else are refused and never reach the server."""
    seen_before = len(fakes.recorder.find("mcp-sse"))

    async def work() -> dict[str, Any]:
        async with Client(f"{pep.url}/mcp/kb", mode=mode) as client:
            resources = [str(r.uri) for r in (await client.list_resources()).resources]
            prompts = [p.name for p in (await client.list_prompts()).prompts]
            read = await client.read_resource("file:///docs/refunds.md")
            got = await client.get_prompt("summarize", {"text": "hi"})
            refusals = {}
            for name, attempt in (
                ("resource", client.read_resource("file:///secret/keys.txt")),
                ("prompt", client.get_prompt("jailbreak")),
            ):
                try:
                    await attempt
                    refusals[name] = "not refused"
                except MCPError as exc:
                    refusals[name] = (exc.error.code, (exc.error.data or {}).get("reason"))
            return {
                "resources": resources,
                "prompts": prompts,
                "read": read,
                "got": got,
                "refusals": refusals,
            }

    outcome = asyncio.run(work())
    assert outcome["resources"] == ["file:///docs/refunds.md"]
    assert outcome["prompts"] == ["summarize"]
    assert outcome["read"].contents[0].text == "Refunds within 30 days."
    assert "Summarize for a customer: hi" in str(outcome["got"].messages[0].content)
    assert outcome["refusals"] == {
        "resource": (-32003, "resource_not_allowed"),
        "prompt": (-32003, "prompt_not_allowed"),
    }
    reached = fakes.recorder.find("mcp-sse")[seen_before:]
    bodies = b"".join(r.raw_body for r in reached)
    assert b"keys.txt" not in bodies and b"jailbreak" not in bodies


def test_templates_and_completions_in_2026_are_judged_like_reads_and_gets(
    pep: PepProcess, fakes: FakeUpstreams
) -> None:
    """The 2026-07-28 side of the method mapping (the legacy side: the 1.x client, in
    test_pep_mcp_legacy_clients): a template is listed only under a granted URI prefix,
    and a completion is judged as the prompt or template it completes."""
    seen_before = len(fakes.recorder.find("mcp-sse"))

    async def work() -> dict[str, Any]:
        async with Client(f"{pep.url}/mcp/kb", mode="auto") as client:
            templates = (await client.list_resource_templates()).resource_templates
            found: dict[str, Any] = {"templates": [t.uri_template for t in templates]}
            refs = {
                "prompt": PromptReference(name="summarize"),
                "template": ResourceTemplateReference(uri="file:///docs/{name}"),
                "prompt_refused": PromptReference(name="jailbreak"),
                "template_refused": ResourceTemplateReference(uri="file:///secret/{name}"),
            }
            for name, ref in refs.items():
                try:
                    done = await client.complete(ref, {"name": "name", "value": "re"})
                    found[name] = done.completion.values
                except MCPError as exc:
                    found[name] = (exc.error.code, (exc.error.data or {}).get("reason"))
            return found

    found = asyncio.run(work())
    assert found == {
        "templates": ["file:///docs/{name}"],
        "prompt": ["re-suggested"],
        "template": ["re-suggested"],
        "prompt_refused": (-32003, "prompt_not_allowed"),
        "template_refused": (-32003, "resource_not_allowed"),
    }
    reached = b"".join(r.raw_body for r in fakes.recorder.find("mcp-sse")[seen_before:])
    assert b"jailbreak" not in reached and b"file:///secret/" not in reached


@pytest.mark.parametrize(
    ("notifications", "code", "reason"),
    [
        ({"toolsListChanged": True}, None, None),
        ({"resourceSubscriptions": ["file:///secret/keys.txt"]}, -32003, "resource_not_allowed"),
        ({"resourceSubscriptions": ["file:///a", "file:///b"]}, -32602, "bad_request"),
    ],
    ids=["list-changes-only", "ungranted-resource", "two-resources"],
)
def test_a_listen_is_decided_on_the_resource_it_subscribes_to(
    pep: PepProcess,
    scripted: tuple[Scripted, str],
    notifications: dict[str, Any],
    code: int | None,
    reason: str | None,
) -> None:
    server, _ = scripted
    before = len(server.seen)
    message = modern("subscriptions/listen", {"notifications": notifications}, 11)
    answer = post(pep, message, headers_for(message))
    if code is None:  # nothing granted by it: forwarded as sent
        assert "result" in answer and server.seen[-1][0] == message
        return
    assert (answer["error"]["code"], answer["error"]["data"]["reason"]) == (code, reason)
    assert len(server.seen) == before
