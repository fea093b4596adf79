"""The official ``mcp`` 1.x client and LangGraph (langchain-mcp-adapters) through the sidecar.

Both need mcp 1.x, which cannot share the suite's venv with mcp 2.3: they run in
``.venv-mcp1`` (``requirements-mcp1.lock``, built by ``make test``) as scripts from
``tests/clients/`` that print JSON, against a real abc-pep → real abc-pdp → the SDK-built
MCP servers (SSE and JSON framings, and one that keeps its answers open after the
response, which mcp 1.x leaves early); LangGraph's model is ``ChatOpenAI`` on the scripted
Chat Completions fake. The legacy revisions (2025-06-18, 2025-11-25: ``initialize``,
``Mcp-Session-Id``) end to end, and every method of them the manifest does not grant
refused, never forwarded.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from tests.fakes.scripted_model import ScriptedModel
from tests.fakes.serve import AiohttpThread, FakeUpstreams
from tests.harness import ROOT, PdpProcess, PepProcess, Signer, free_port, sample, start_pep
from tests.integration.test_pep import pep_intent, upstream_map

PYTHON = ROOT / ".venv-mcp1" / "bin" / "python"
CLIENTS = ROOT / "tests" / "clients"
SERVERS = {"sse": ("kb", "mcp-sse"), "json": ("kbjson", "mcp-json")}
VERSIONS = ("2025-06-18", "2025-11-25")
SECRET = b"file:///secret/"


def intent() -> str:
    """The sidecar tests' intent; kb and kbjson each grant file:///docs/ and summarize."""
    names = [name for name, _ in SERVERS.values()]
    grants = "resources:\n" + "".join(
        f"  - server: {name}\n    uri_prefix: file:///docs/\n" for name in names
    )
    grants += "prompts:\n" + "".join(f"  - server: {name}\n    name: summarize\n" for name in names)
    uses = " ".join(f"resource:{name}/file:///docs/, prompt:{name}/summarize," for name in names)
    text = pep_intent().replace("\nbudgets:", f"\n{grants}\nbudgets:", 1)
    text = text.replace("tools:\n", "tools:\n  - server: kblinger\n    name: search\n", 1)
    return text.replace("tool:kb/search,", f"tool:kb/search, tool:kblinger/search, {uses}", 1)


async def lingering(request: web.Request) -> web.StreamResponse:
    """An MCP server that keeps each SSE answer open after its one message, as servers that
    stream progress do: mcp 1.x hangs up as soon as it has its response."""
    body = await request.json()
    if "id" not in body:
        return web.Response(status=202)
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": body["id"]}
    if body["method"] == "initialize":
        message["result"] = {
            "protocolVersion": body["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "lingering", "version": "1"},
        }
    elif body["method"] == "tools/list":
        names = ("search", "delete_everything")
        message["result"] = {
            "tools": [{"name": n, "inputSchema": {"type": "object"}} for n in names]
        }
    else:
        message["error"] = {"code": -32601, "message": "not here"}
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(f"event: message\ndata: {json.dumps(message)}\n\n".encode())
    await asyncio.sleep(1)  # still open when the client hangs up
    return response


def run_client(script: str, *args: str) -> Any:
    """What the client script printed (JSON); it runs in .venv-mcp1."""
    if not PYTHON.exists():
        pytest.fail(f"{PYTHON} is missing: `make test` builds it from requirements-mcp1.lock")
    done = subprocess.run(
        [str(PYTHON), str(CLIENTS / script), *args],
        capture_output=True,
        text=True,
        # Seconds on an idle machine (the imports are most of it); generous, because a
        # loaded 2-core machine stretches LangGraph's imports past a minute.
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def pep(
    pdp: PdpProcess,
    fakes: FakeUpstreams,
    signer: Signer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PepProcess]:
    path = tmp_path_factory.mktemp("legacy") / "envelope.json"
    path.write_bytes(signer.freeze(intent(), "legacy"))
    app = web.Application()
    app.router.add_post("/mcp", lingering)
    port = free_port()
    thread = AiohttpThread({"lingering": (app, port)})
    thread.start(10)
    upstreams = {**upstream_map(fakes), "mcp:kblinger": f"http://127.0.0.1:{port}/mcp"}
    process = start_pep(pdp.address, upstreams, path.parent, "--manifest", str(path))
    yield process
    process.stop()
    thread.stop(5)


def reason(outcome: dict[str, Any]) -> tuple[int, str | None]:
    error = outcome["error"]
    return error["code"], error.get("data", {}).get("reason")


@pytest.fixture(scope="module")
def sessions(pep: PepProcess, fakes: FakeUpstreams) -> dict[str, tuple[dict[str, Any], bytes, str]]:
    """Every legacy session once, in one client process (its imports are most of its
    time): what the client got, what reached the upstream, what the sidecar logged."""
    targets = [(framing, version) for framing in SERVERS for version in VERSIONS]
    seen = {upstream: len(fakes.recorder.find(upstream)) for _, upstream in SERVERS.values()}
    before = pep.output()
    urls = [f"{pep.url}/mcp/{SERVERS[framing][0]}@{version}" for framing, version in targets]
    found = run_client("mcp1_session.py", *urls, f"{pep.url}/mcp/kblinger@{VERSIONS[-1]}")
    lingered = found.pop()
    time.sleep(1)  # the lingering server's answers have all ended by now
    logged = pep.output()[len(before) :]
    reached = {
        upstream: b"".join(r.raw_body for r in fakes.recorder.find(upstream)[seen[upstream] :])
        for _, upstream in SERVERS.values()
    }
    outcomes = {
        f"{framing}-{version}": (session, reached[SERVERS[framing][1]], logged)
        for (framing, version), session in zip(targets, found, strict=True)
    }
    return {**outcomes, "lingering": (lingered, b"", logged)}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("framing", list(SERVERS))
def test_the_1x_client_in_a_legacy_session_sees_only_what_is_granted(
    sessions: dict[str, tuple[dict[str, Any], bytes, str]], framing: str, version: str
) -> None:
    found, reached, logged = sessions[f"{framing}-{version}"]
    assert found["protocol"] == version and found["session"]  # Mcp-Session-Id relayed
    tools = sorted(tool["name"] for tool in found["tools"]["result"]["tools"])
    assert tools == (["fetch_article", "search"] if framing == "sse" else ["search"])
    allowed = found["allowed"]["result"]
    assert not allowed.get("isError") and "results for 'refunds'" in allowed["content"][0]["text"]
    # A refused call is the tool's result (the model reads it), not a protocol error.
    refused = found["refused"]["result"]
    meta = refused["_meta"]
    assert refused["isError"] and meta["abc/reason"] == "tool_not_allowed"
    assert meta["abc/decision_id"] in refused["content"][0]["text"]
    assert "tool_not_allowed" in refused["content"][0]["text"]

    assert [r["uri"] for r in found["resources"]["result"]["resources"]] == [
        "file:///docs/refunds.md"
    ]
    assert found["read"]["result"]["contents"][0]["text"] == "Refunds within 30 days."
    assert reason(found["read_refused"]) == (-32003, "resource_not_allowed")
    assert [p["name"] for p in found["prompts"]["result"]["prompts"]] == ["summarize"]
    assert "Summarize for a customer: hi" in json.dumps(found["prompt"]["result"])
    assert reason(found["prompt_refused"]) == (-32003, "prompt_not_allowed")

    # The methods beyond read and get (the mapping in the README, per revision).
    templates = found["templates"]["result"]["resourceTemplates"]
    assert [t["uriTemplate"] for t in templates] == ["file:///docs/{name}"]
    assert reason(found["subscribe_refused"]) == (-32003, "resource_not_allowed")
    for allowed_ref in ("complete", "complete_template"):
        assert found[allowed_ref]["result"]["completion"]["values"] == ["re-suggested"]
    assert reason(found["complete_refused"]) == (-32003, "prompt_not_allowed")
    assert reason(found["complete_template_refused"]) == (-32003, "resource_not_allowed")
    # Allowed (a granted subscribe) or forwarded undecided (they grant nothing): the SDK's
    # server implements none of them, so its own error comes back, not a refusal.
    for name in ("subscribe", "unsubscribe", "log_level"):
        assert "reason" not in found[name]["error"].get("data", {}), found[name]
    assert found["ping"] == {"result": {}}

    # Both sessions on this server: nothing refused reached it. The one secret URI that
    # did is the unsubscribe's (twice: one per session), which grants nothing.
    assert b"delete_everything" not in reached and b"jailbreak" not in reached
    assert reached.count(SECRET) == len(VERSIONS)
    assert reached.count(b'"resources/unsubscribe"') == len(VERSIONS)
    for method in ("resources/subscribe", "logging/setLevel", "completion/complete"):
        assert f'"{method}"'.encode() in reached
    # mcp 1.x closes an SSE answer as soon as it has its response: nothing to log for it.
    assert "Traceback" not in logged and "ERROR" not in logged
    assert "upstream mcp failed" not in logged


def test_the_1x_client_leaving_answers_early_is_no_failure(
    sessions: dict[str, tuple[dict[str, Any], bytes, str]],
) -> None:
    """Every answer of the lingering server is still open when the client has its
    response and hangs up: filtered all the same, and nothing logged or counted."""
    found, _, logged = sessions["lingering"]
    assert [tool["name"] for tool in found["tools"]["result"]["tools"]] == ["search"]
    assert found["refused"]["result"]["_meta"]["abc/reason"] == "tool_not_allowed"
    assert "Traceback" not in logged and "ERROR" not in logged
    assert "upstream mcp failed" not in logged


def test_langgraph_sees_granted_tools_and_recovers_from_a_refused_call(
    pep: PepProcess, fakes: FakeUpstreams
) -> None:
    """LangGraph's prebuilt agent, default settings: the refused call reaches the model as
    the tool's output (reason and decision id), the run goes on to its final answer."""
    model = ScriptedModel([("search", {"query": "x" * 201}), ("search", {"query": "refunds"})])
    port = free_port()
    thread = AiohttpThread({"model": (model.app(), port)})
    thread.start(10)
    before = fakes.recorder.tool_calls("mcp-sse")
    denied = {"route": "mcp", "reason": "tool_args_invalid"}
    denials = sample(pep.metrics(), "abc_pep_denials_total", **denied)
    try:
        found = run_client("langgraph_agent.py", f"{pep.url}/mcp/kb", f"http://127.0.0.1:{port}/v1")
    finally:
        thread.stop(5)
    assert found["tools"] == ["fetch_article", "search"]
    assert model.offered == [["fetch_article", "search"]] * 3  # delete_everything hidden
    refused, allowed = found["tool_messages"]
    assert refused["status"] == "error" and "tool_args_invalid" in json.dumps(refused)
    assert allowed["status"] == "success" and "results for 'refunds'" in json.dumps(allowed)
    # The model's last request held the refusal's reason; its answer quotes what it saw.
    assert "tool_args_invalid" in found["final"] and "results for 'refunds'" in found["final"]
    assert fakes.recorder.tool_calls("mcp-sse")[len(before) :] == ["search"]
    assert sample(pep.metrics(), "abc_pep_denials_total", **denied) == denials + 1
