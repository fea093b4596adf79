"""``abc-pep mcp-stdio`` between the official client's stdio transport and a real stdio server.

The host's configuration changes only its command: ``abc-pep mcp-stdio --server kb
--manifest ... -- python -m tests.fakes.mcp_stdio``. Real abc-pdp, the demo manifest (kb
grants search and fetch_article); the server records every call that reaches it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from tests.harness import ROOT, PdpProcess, free_port, sample

PEP = str(Path(sys.executable).parent / "abc-pep")


def wrapped(pdp: PdpProcess, envelope: Path, record: Path, *extra: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=PEP,
        args=[
            "mcp-stdio",
            "--server",
            "kb",
            "--pdp",
            pdp.address,
            "--manifest",
            str(envelope),
            *extra,
            "--",
            sys.executable,
            "-m",
            "tests.fakes.mcp_stdio",
            "--record",
            str(record),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=str(ROOT),
    )


def spawn(params: StdioServerParameters, stderr: int) -> subprocess.Popen[bytes]:
    """The wrapper as a host starts it, its stdin and stdout ours to speak on."""
    return subprocess.Popen(
        [params.command, *params.args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=params.env,
        cwd=params.cwd,
    )


@pytest.fixture
def envelope(demo_envelope: bytes, tmp_path: Path) -> Path:
    path = tmp_path / "envelope.json"
    path.write_bytes(demo_envelope)
    return path


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_the_stdio_wrapper_decides_filters_and_refuses_like_the_route(
    pdp: PdpProcess, envelope: Path, tmp_path: Path, mode: str
) -> None:
    record = tmp_path / "calls.txt"
    metrics_port = free_port()
    params = wrapped(pdp, envelope, record, "--metrics", f"127.0.0.1:{metrics_port}")

    async def work() -> dict[str, Any]:
        async with Client(params, mode=mode) as client:
            listed = sorted(t.name for t in (await client.list_tools()).tools)
            allowed = await client.call_tool("search", {"query": "refunds"})
            refused = await client.call_tool("delete_everything", {})
            bad_args = await client.call_tool("search", {"query": "x" * 201})
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                metrics = response.read().decode()
            return {
                "listed": listed,
                "allowed": allowed,
                "refused": refused,
                "bad_args": bad_args,
                "metrics": metrics,
            }

    outcome = asyncio.run(work())
    assert outcome["listed"] == ["fetch_article", "search"]
    assert not outcome["allowed"].is_error
    for name, reason in (("refused", "tool_not_allowed"), ("bad_args", "tool_args_invalid")):
        result = outcome[name]
        assert result.is_error and (result.meta or {})["abc/reason"] == reason
        assert result.meta["abc/decision_id"] in result.content[0].text
    assert record.read_text().split() == ["search"]  # nothing refused reached the server
    metrics = outcome["metrics"]
    assert sample(metrics, "abc_pep_denials_total", route="mcp", reason="tool_not_allowed") == 1
    assert sample(metrics, "abc_pep_probes_total", decision="deny") == 2


def test_the_servers_stderr_passes_and_it_is_stopped_with_the_wrapper(
    pdp: PdpProcess, envelope: Path, tmp_path: Path
) -> None:
    wrapper = spawn(wrapped(pdp, envelope, tmp_path / "calls.txt"), stderr=subprocess.PIPE)
    try:
        assert wrapper.stderr is not None
        deadline = time.monotonic() + 30
        child_pid, banner = 0, False
        while time.monotonic() < deadline and not (child_pid and banner):
            line = wrapper.stderr.readline().decode()
            if "(pid " in line:
                child_pid = int(line.split("(pid ")[1].split(")")[0])
            banner = banner or "fake stdio MCP server up" in line
        assert child_pid and banner, "the wrapper never started its server, or hid its stderr"
        wrapper.send_signal(signal.SIGTERM)
        wrapper.wait(timeout=15)
        time.sleep(0.2)
        with pytest.raises(ProcessLookupError):
            os.kill(child_pid, 0)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()


def test_the_wrapper_fails_closed_without_a_decision(tmp_path: Path) -> None:
    """A PDP that does not answer: the call is refused (``pdp_unavailable``, as the tool's
    error result) and never reaches the server."""
    record = tmp_path / "calls.txt"
    command = [PEP, "mcp-stdio", "--server", "kb", "--pdp", f"127.0.0.1:{free_port()}"]
    command += ["--run", "run_nothing", "--", sys.executable, "-m", "tests.fakes.mcp_stdio"]
    call = {"name": "search", "arguments": {"query": "x"}}
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": call}
    done = subprocess.run(
        [*command, "--record", str(record)],
        input=json.dumps(message).encode() + b"\n",
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=str(ROOT),
        timeout=60,
    )
    answer = json.loads(done.stdout)
    assert answer["id"] == 1 and answer["result"]["isError"] is True
    assert answer["result"]["_meta"]["abc/reason"] == "pdp_unavailable"
    assert not record.exists()


def test_a_call_hidden_behind_a_carriage_return_never_reaches_the_server(
    pdp: PdpProcess, envelope: Path, tmp_path: Path
) -> None:
    """The SDKs' stdio servers read with universal newlines: a lone CR ends a line there.
    A line this wrapper would judge as one client response (no decision) must not reach a
    server that reads a refused ``tools/call`` out of it."""
    record = tmp_path / "calls.txt"
    wrapper = spawn(wrapped(pdp, envelope, record), stderr=subprocess.DEVNULL)
    assert wrapper.stdin is not None and wrapper.stdout is not None

    def send(message: bytes) -> None:
        assert wrapper.stdin is not None
        wrapper.stdin.write(message + b"\n")
        wrapper.stdin.flush()

    def request(request_id: int, method: str, params: dict[str, Any]) -> None:
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        send(json.dumps(message).encode())

    def answer() -> dict[str, Any]:
        assert wrapper.stdout is not None
        found: dict[str, Any] = json.loads(wrapper.stdout.readline())
        return found

    hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t"}}
    hidden = {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}
    hidden["params"] = {"name": "delete_everything", "arguments": {}}
    try:
        request(0, "initialize", hello)
        assert answer()["id"] == 0
        send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        smuggled = b'{"jsonrpc":"2.0","id":9,"result":{},"x":\r' + json.dumps(hidden).encode()
        send(smuggled + b"\r}")  # an answer to no request of the server's: refused, unanswered
        allowed = {"name": "search", "arguments": {"query": "refunds"}}
        request(3, "tools/call", allowed)
        assert answer()["id"] == 3  # the next answer is the search's: nothing ran id 2
    finally:
        wrapper.stdin.close()
        try:
            wrapper.wait(timeout=15)
        finally:
            if wrapper.poll() is None:
                wrapper.kill()
    assert record.read_text().split() == ["search"]
