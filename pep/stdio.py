"""``abc-pep mcp-stdio``: the sidecar between an agent host and an MCP server it starts.

Most MCP servers run as local processes the host launches, speaking newline-delimited
JSON-RPC on stdin/stdout. The wrapper starts that process (``-- COMMAND ARGS...``) and
sits on both pipes: every message from the host is mapped and decided exactly as on the
HTTP route (the same adapter, decisions, refusals, metrics and decision log), and every
message from the server is read and its tool lists filtered before the host sees it. The
host's configuration changes only its command.

Fail closed as the HTTP route does: a message that cannot be mapped, a refused call and
a PDP that does not answer never reach the server; a server line that cannot be read
never reaches the host. The server's stderr passes through; when the host closes stdin
or the wrapper is stopped, the server is stopped too, and the wrapper exits with its code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import Sequence

from pdp.api import ReasonCode, pdp_pb2
from pdp.api.reasons import MappingError
from pep.adapters.base import Call, dump_json, parse_json_object
from pep.adapters.mcp import McpAdapter
from pep.adapters.mcp.answers import MAX_ANSWER_BYTES, AnswerFilter, _Unavailable
from pep.adapters.mcp.refusals import INTERNAL_ERROR, McpRequest, refusal_message
from pep.config import ConfigError
from pep.metrics import PepMetrics
from pep.pdp_client import PdpClient, Verdict

__all__ = ["StdioBridge", "serve_stdio"]

log = logging.getLogger("abc.pep")
ROUTE = "mcp"
STOP_GRACE_SECONDS = 5.0


class StdioBridge:
    """One host, one server process; each direction a loop of whole lines."""

    def __init__(
        self,
        server: str,
        pdp: PdpClient,
        run_id: str,
        metrics: PepMetrics,
        host_out: asyncio.StreamWriter,
    ) -> None:
        self.server, self.pdp, self.run_id, self.metrics = server, pdp, run_id, metrics
        self.adapter = McpAdapter()
        self.host_out = host_out
        self._write_lock = asyncio.Lock()

    async def to_host(self, message: bytes) -> None:
        async with self._write_lock:
            self.host_out.write(message + b"\n")
            await self.host_out.drain()

    async def probe(self, action: pdp_pb2.Action) -> Verdict:
        verdict = await self._decide(action, "probe_")
        self.metrics.count_probe(verdict.allow)
        return verdict

    async def _decide(self, action: pdp_pb2.Action, prefix: str) -> Verdict:
        started = asyncio.get_running_loop().time()
        verdict = await self.pdp.decide(self.run_id, prefix + uuid.uuid4().hex, action)
        self.metrics.decision_seconds.observe(asyncio.get_running_loop().time() - started)
        return verdict

    async def _refuse(self, verdict: Verdict, call: Call | None) -> None:
        if verdict.decision_id.startswith("pep_") and verdict.reason is not (
            ReasonCode.PDP_UNAVAILABLE
        ):
            # The wrapper's own refusal, logged in the PDP's decision log like the route's.
            verdict = await self.pdp.record_refusal(
                self.run_id, "pep_" + uuid.uuid4().hex, ROUTE, verdict
            )
        self.metrics.count(ROUTE, "deny", verdict.reason)
        log.info("refused mcp stdio: %s (%s)", verdict.reason, verdict.decision_id)
        request = call.mcp if call is not None and call.mcp is not None else None
        if request is not None and request.id is not None:
            await self.to_host(dump_json(refusal_message(verdict, request)))

    async def from_host(self, line: bytes, server_in: asyncio.StreamWriter) -> None:
        """One message from the host: forwarded as sent, or refused in its place."""
        if b"\r" in line:
            request_id = _answer_id(line, requests_only=True)
            refused = McpRequest(request_id) if request_id is not None else None
            await self._refuse(
                Verdict.refuse(ReasonCode.BAD_REQUEST, _SPLIT_PROBLEM),
                Call(action=None, body=b"", mcp=refused),
            )
            return
        try:
            call = self.adapter.message(self.server, line, None)
        except MappingError as exc:
            await self._refuse(
                Verdict.refuse(exc.reason, str(exc)),
                Call(action=None, body=b"", mcp=getattr(exc, "mcp", None)),
            )
            return
        verdict: Verdict | None = None
        if call.action is not None:
            verdict = await self._decide(call.action, "pep_")
            if not verdict.allow:
                await self._refuse(verdict, call)
                return
            self.metrics.count_shadow(ROUTE, verdict.reason)
        self.metrics.count(ROUTE, "allow" if verdict or call.lists_tools else "pass")
        server_in.write(line + b"\n")
        await server_in.drain()

    async def from_server(self, line: bytes) -> None:
        """One message from the server: relayed with its tool lists filtered, or refused."""
        answer = AnswerFilter(self.server, None, self.adapter.schemas)
        try:
            if b"\r" in line:
                raise ValueError(_SPLIT_PROBLEM)
            text = line.decode("utf-8")  # not UTF-8: a ValueError, refused like any unreadable
            await self.to_host((await answer.judge(text, self.probe)).encode())
        except (ValueError, RecursionError, _Unavailable) as exc:
            reason = exc.verdict if isinstance(exc, _Unavailable) else None
            verdict = reason or Verdict.refuse(
                ReasonCode.BAD_REQUEST, f"the answer could not be read: {exc}"
            )
            log.info("refused an mcp stdio answer: %s (%s)", verdict.reason, verdict.decision_id)
            request_id = _answer_id(line)
            if request_id is not None:
                message = refusal_message(verdict, McpRequest(request_id, code=INTERNAL_ERROR))
                await self.to_host(dump_json(message))


# A reader with universal newlines (the SDKs' stdio, Python's text files) ends a line at a
# CR too, and JSON allows a raw CR between tokens: a line holding one could be judged here
# as one message and read by its peer as several. (Unicode's line separators, raw in JSON
# strings, end no line for those readers: not refused.)
_SPLIT_PROBLEM = "a line holding a carriage return is refused"


def _answer_id(line: bytes, *, requests_only: bool = False) -> str | int | None:
    """The id of an answer that was refused, so its request is answered and not left waiting.
    ``requests_only``: of a request the host sent, not of its answer to a server request (no
    one on the host's side waits for that)."""
    try:
        message = parse_json_object(line)
    except MappingError:
        return None
    found = message.get("id") if "method" in message or not requests_only else None
    return found if isinstance(found, str | int) and not isinstance(found, bool) else None


async def _pump_host(
    bridge: StdioBridge, host_in: asyncio.StreamReader, server_in: asyncio.StreamWriter
) -> None:
    try:
        while line := await host_in.readline():
            if line.strip():
                await bridge.from_host(line.rstrip(b"\r\n"), server_in)
    except ValueError:  # a line over the limit: nothing after it can be framed
        log.warning("mcp stdio: a host message over %d bytes; closing", MAX_ANSWER_BYTES)
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            server_in.close()  # EOF: the server ends as the host ended


async def _pump_server(bridge: StdioBridge, server_out: asyncio.StreamReader) -> None:
    try:
        while line := await server_out.readline():
            if line.strip():
                await bridge.from_server(line.rstrip(b"\r\n"))
    except ValueError:
        log.warning("mcp stdio: a server message over %d bytes; closing", MAX_ANSWER_BYTES)


async def _stdio() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_ANSWER_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout
    )
    return reader, asyncio.StreamWriter(transport, protocol, None, loop)


async def serve_stdio(
    server: str,
    command: Sequence[str],
    pdp: PdpClient,
    run_id: str,
    metrics: PepMetrics,
    stop: asyncio.Event,
) -> int:
    """Run the server process between the host's stdin/stdout; its exit code."""
    try:
        child = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # the server's stderr is the host's to read
            limit=MAX_ANSWER_BYTES,
        )
    except OSError as exc:
        raise ConfigError(f"cannot start {command[0]}: {exc.strerror}") from exc
    assert child.stdin is not None and child.stdout is not None
    host_in, host_out = await _stdio()
    bridge = StdioBridge(server, pdp, run_id, metrics, host_out)
    log.info("abc-pep mcp-stdio: %s (pid %d) for run %s", command[0], child.pid, run_id)
    pumps = [
        asyncio.create_task(_pump_host(bridge, host_in, child.stdin)),
        asyncio.create_task(_pump_server(bridge, child.stdout)),
    ]
    stopped = asyncio.create_task(stop.wait())
    try:
        # The server's output ending (it exited, or is exiting once the host closed stdin)
        # or a stop ends the bridge.
        await asyncio.wait([pumps[1], stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (*pumps, stopped):
            task.cancel()
        code = await _stop_child(child, asked=stop.is_set())
    return code


async def _stop_child(child: asyncio.subprocess.Process, *, asked: bool) -> int:
    """The server's exit code; stopped with the wrapper, given a grace period to exit."""
    if not asked:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(child.wait(), STOP_GRACE_SECONDS)
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
        try:
            await asyncio.wait_for(child.wait(), STOP_GRACE_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
    return child.returncode or 0
