"""pep/stdio.py's server-to-host direction: what a stdio server writes is read like an HTTP
answer, its lists filtered, and a line that cannot be read never reaches the host."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

from prometheus_client import CollectorRegistry

from pdp.api import pdp_pb2
from pep.metrics import PepMetrics
from pep.pdp_client import PdpClient, Verdict
from pep.stdio import StdioBridge

GRANTED = {"tool:kb/search"}


class _Pdp:
    """Decides probes as the demo manifest would: only kb/search is granted."""

    async def decide(self, run_id: str, request_id: str, action: pdp_pb2.Action) -> Verdict:
        return Verdict(action.target in GRANTED, None, "", "dec_" + request_id[-8:])

    async def record_refusal(
        self, run_id: str, request_id: str, route: str, verdict: Verdict
    ) -> Verdict:
        return verdict  # kept under the wrapper's own id, as when the PDP cannot log it


class _Pipe:
    """One side's stdin or stdout: what the bridge writes to it."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.lines.append(data)

    async def drain(self) -> None:
        return None


def relay(line: bytes) -> list[Any]:
    host = _Pipe()
    bridge = StdioBridge(
        "kb", cast(PdpClient, _Pdp()), "run_1", PepMetrics(CollectorRegistry()), cast(Any, host)
    )
    asyncio.run(bridge.from_server(line))
    return [json.loads(sent) for sent in host.lines]


def test_a_tool_list_reaches_the_host_filtered() -> None:
    tools = [{"name": n, "inputSchema": {}} for n in ("search", "delete_everything")]
    line = json.dumps({"jsonrpc": "2.0", "id": 3, "result": {"tools": tools}}).encode()
    [sent] = relay(line)
    assert [t["name"] for t in sent["result"]["tools"]] == ["search"]


def test_an_unreadable_line_is_an_error_under_its_id_never_relayed() -> None:
    # Not UTF-8 (a byte-level reader would still find the list in it).
    line = b'{"jsonrpc":"2.0","id":4,"result":{"tools":[{"name":"delete_everything"}]}}\xff'
    assert relay(line) == []  # no id can be read from bytes that are not UTF-8 JSON
    broken = b'{"jsonrpc":"2.0","id":5,"result":{"tools":[{"nome":"delete_everything"}]}}'
    [sent] = relay(broken)
    assert sent["id"] == 5 and sent["error"]["code"] == -32603
    assert "delete_everything" not in json.dumps(sent)


def test_a_host_line_holding_a_carriage_return_reaches_neither_side_but_its_refusal() -> None:
    """Refused under the id of a request the host sent; an answer the host gave to the
    server's own request has no one on the host's side to answer it."""
    host, server = _Pipe(), _Pipe()
    bridge = StdioBridge(
        "kb", cast(PdpClient, _Pdp()), "run_1", PepMetrics(CollectorRegistry()), cast(Any, host)
    )
    request = b'{"jsonrpc":"2.0","id":7,"method":"tools/list",\r"params":{}}'
    answer = b'{"jsonrpc":"2.0","id":"s-1",\r"result":{}}'
    for line in (request, answer):
        asyncio.run(bridge.from_host(line, cast(Any, server)))
    assert server.lines == []
    [refused] = [json.loads(sent) for sent in host.lines]
    assert refused["id"] == 7 and "carriage return" in refused["error"]["message"]
