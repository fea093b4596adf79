"""A model call that fails part way, through the real sidecar and PDP.

An upstream that fails after it was sent the call: the agent gets a refusal it can trace
(never aiohttp's bare 500), and the call settles at its reserved worst case, since the
upstream may have carried it out and billed it. An agent that hangs up: the upstream call is
closed at once, and settled at the worst case, at 0 if it was never forwarded (still decided, or
connecting), or at its usage if its stream had ended."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.harness import (
    INTENT,
    POLICIES,
    DecideRelay,
    PdpProcess,
    PepProcess,
    Signer,
    log_records,
    start_pdp,
    start_pep,
)

CHAT = "/openai/v1/chat/completions"
ANSWER = b'{"id":"c","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'

Fault = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _head_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 80\r\n\r\n")


async def _read_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    pass  # the call was read whole: the model may be running it


async def _cut_after_usage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # A whole JSON document with its usage, but the answer was longer: cut, not complete.
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(ANSWER) + 40) + ANSWER)


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 2OO OK\r\n\r\n")


async def _refused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    body = b'{"error":{"message":"slow down","type":"rate_limit_error"}}'
    writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


FORWARDED: queue.Queue[float] = queue.Queue()  # calls that must never reach the upstream


async def _never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    FORWARDED.put(time.monotonic())
    await _answered(reader, writer)


async def _answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(ANSWER) + ANSWER)


# When an upstream holding a call saw the sidecar close its connection (monotonic).
HUNG_UP: queue.Queue[float] = queue.Queue()
HOLD_SECONDS = 30.0  # how long a holding upstream waits before it gives up by itself


async def _hold(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(HOLD_SECONDS):
            while await reader.read(65536):
                pass
            HUNG_UP.put(time.monotonic())


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _hold(reader)  # the model is thinking


async def _stream_then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    event = b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(event), event)
    )
    await writer.drain()
    await _hold(reader)


async def _stream_done(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A whole stream, its usage and [DONE], but not the chunked body's end: the
    connection closes there."""
    events = (
        b'data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,'
        b'"total_tokens":7}}\n\ndata: [DONE]\n\n'
    )
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(events), events)
    )


async def _stream_done_then_silent(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await _stream_done(reader, writer)
    await writer.drain()
    await _hold(reader)  # the body's last chunk comes late


FAULTS: dict[str, Fault] = {
    "silent": _silent,
    "stream-then-silent": _stream_then_silent,
    "stream-done-then-silent": _stream_done_then_silent,
    "stream-done-then-close": _stream_done,
    "head-then-close": _head_then_close,
    "read-then-close": _read_then_close,
    "garbage": _garbage,
    "cut-after-usage": _cut_after_usage,
    "refused": _refused,
    "answered": _answered,
    "never": _never,
}


class RawUpstream:
    """An OpenAI-shaped upstream in a thread of its own, behaving as the request's ``user``
    field says; every connection serves one request and is closed."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        assert self._ready.wait(5)

    def _run(self) -> None:
        async def serve() -> None:
            server = await asyncio.start_server(self._one, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            async with server:
                await server.serve_forever()

        self._serving = self._loop.create_task(serve())
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._serving)

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = json.loads(await reader.readexactly(length))
            await FAULTS[body["user"]](reader, writer)
            await writer.drain()
        finally:
            writer.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._serving.cancel)


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    raw = RawUpstream()
    yield raw
    raw.stop()


def _start_pdp(signer: Signer, tmp: Path, *flags: str) -> PdpProcess:
    """A PDP, and the grant the sidecar registers in ``tmp/envelope.json``."""
    envelope = tmp / "envelope.json"
    envelope.write_bytes(
        signer.freeze(INTENT.read_text().replace("acme/support-bot", "acme/faults"), "f")
    )
    return start_pdp(signer, tmp / "state", POLICIES, *flags)


def _start_pep(pdp: PdpProcess, tmp: Path, upstream: RawUpstream | int, *flags: str) -> PepProcess:
    port = upstream if isinstance(upstream, int) else upstream.port
    openai = f"http://127.0.0.1:{port}"
    return start_pep(
        pdp.address, {"openai": openai}, tmp, "--manifest", str(tmp / "envelope.json"), *flags
    )


@pytest.fixture(scope="module")
def sidecar(
    signer: Signer, tmp_path_factory: pytest.TempPathFactory, upstream: RawUpstream
) -> Iterator[tuple[PepProcess, Path]]:
    tmp = tmp_path_factory.mktemp("upstream-faults")
    pdp = _start_pdp(signer, tmp)
    pep = _start_pep(pdp, tmp, upstream)
    try:
        yield pep, tmp / "state" / "decisions.log"
    finally:
        pep.stop()
        pdp.stop()


def _chat(fault: str) -> dict[str, object]:
    """A chat call the upstream answers as ``fault`` says."""
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "user": fault}


def _settled(log: Path, decision_id: str) -> tuple[int, int]:
    """(tokens reserved by the decision, tokens its settlement reported), once logged."""
    for _ in range(100):
        records = log_records(log)
        decision = next(r for r in records if r.get("decision_id") == decision_id)
        settled = [
            r["tokens"]
            for r in records
            if r.get("kind") == "settlement" and r["reservation_id"] == decision["reservation_id"]
        ]
        if settled:
            return decision["cost"]["tokens"], settled[0]
        time.sleep(0.05)
    raise AssertionError(f"no settlement for {decision_id}")


def _last_decision(log: Path) -> str:
    return str([r for r in log_records(log) if r.get("kind") == "decision"][-1]["decision_id"])


@pytest.mark.parametrize(
    ("fault", "worst"),
    [("head-then-close", True), ("read-then-close", True), ("garbage", True), ("refused", False)],
)
def test_a_call_the_upstream_received_but_never_answered_settles_at_its_worst_case(
    sidecar: tuple[PepProcess, Path], fault: str, worst: bool
) -> None:
    pep, log = sidecar
    reply = httpx.post(f"{pep.url}{CHAT}", json=_chat(fault), timeout=10)
    decision_id = reply.headers["x-abc-decision-id"]
    reserved, settled = _settled(log, decision_id)
    if worst:
        # A refusal in the agent's protocol, traceable to its decision; never aiohttp's 500.
        assert reply.status_code == 502, reply.text
        assert reply.json()["error"]["decision_id"] == decision_id
        assert f"upstream openai failed ({decision_id})" in pep.output()  # the operator's trace
        assert settled == reserved > 0
    else:  # the upstream's own refusal, relayed as sent, and not spent
        assert reply.status_code == 429
        assert reply.json()["error"]["type"] == "rate_limit_error"
        assert settled == 0


def test_an_answer_cut_part_way_settles_at_the_worst_case_whatever_it_reported(
    sidecar: tuple[PepProcess, Path],
) -> None:
    pep, log = sidecar
    with pytest.raises(httpx.HTTPError):  # the agent sees the cut
        httpx.post(f"{pep.url}{CHAT}", json=_chat("cut-after-usage"), timeout=10).read()
    reserved, settled = _settled(log, _last_decision(log))
    assert settled == reserved > 7


def test_a_stream_cut_after_its_last_event_settles_at_its_usage(
    sidecar: tuple[PepProcess, Path],
) -> None:
    """Its protocol said it ended ([DONE], after its usage): the usage is whole, however
    the connection ended after it."""
    pep, log = sidecar
    body = {**_chat("stream-done-then-close"), "stream": True}
    with (
        pytest.raises(httpx.HTTPError),  # the agent sees the body cut
        httpx.stream("POST", f"{pep.url}{CHAT}", json=body, timeout=10) as reply,
    ):
        reply.read()
    reserved, settled = _settled(log, _last_decision(log))
    assert (settled, reserved > 7) == (7, True)


def test_an_answered_call_settles_at_what_the_upstream_reported(
    sidecar: tuple[PepProcess, Path],
) -> None:
    pep, log = sidecar
    reply = httpx.post(f"{pep.url}{CHAT}", json=_chat("answered"), timeout=10)
    assert reply.status_code == 200 and reply.content == ANSWER
    assert _settled(log, reply.headers["x-abc-decision-id"])[1] == 7


def _hang_up_after(
    pep: PepProcess, body: dict[str, object], *, until: bytes = b"", wait: float = 0.0
) -> bytes:
    """Send a chat call as a raw agent; hang up once it has received ``until`` and waited
    ``wait`` s more. What it had received."""
    raw = json.dumps(body).encode()
    host, port = pep.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as agent:
        agent.sendall(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (CHAT.encode(), host.encode(), len(raw), raw)
        )
        received = b""
        while until not in received:
            received += agent.recv(65536)
        time.sleep(wait)
        return received


@pytest.mark.parametrize("fault", ["silent", "stream-then-silent"])
def test_an_agent_that_hangs_up_stops_its_call_and_it_settles_at_the_worst_case(
    sidecar: tuple[PepProcess, Path], fault: str
) -> None:
    """The upstream's connection is closed at once (a provider stops generating, and bills
    no further), not held until the upstream answers; the call may have run, so it settles
    at its worst case, whatever part of a stream was relayed."""
    pep, log = sidecar
    streamed = fault.startswith("stream")
    # Hangs up once the stream had begun, or while the upstream is thinking.
    received = _hang_up_after(
        pep, {**_chat(fault), "stream": streamed}, until=b"data: " if streamed else b"", wait=0.5
    )
    hung_up = time.monotonic()
    assert received.startswith(b"HTTP/1.1 200") or not streamed
    assert HUNG_UP.get(timeout=5) - hung_up < 5  # not the upstream's own 30 s
    reserved, settled = _settled(log, _last_decision(log))
    assert settled == reserved > 0
    reply = httpx.post(f"{pep.url}{CHAT}", json=_chat("answered"), timeout=10)
    assert reply.status_code == 200 and reply.content == ANSWER  # serving on


@pytest.mark.parametrize("stopped", [False, True], ids=["serving", "stopped-at-once"])
def test_a_call_whose_agent_hangs_up_while_it_is_decided_is_released_not_held(
    signer: Signer, upstream: RawUpstream, stopped: bool
) -> None:
    """The PDP decides it all the same (the request had reached it) and reserves its worst
    case; nothing was forwarded, so the sidecar settles it at 0 rather than leave it held,
    and charged, until the reservation expires; a sidecar stopped meanwhile does so first."""
    tmp = Path(tempfile.mkdtemp(prefix="abc-hang-"))  # a socket path fits in 108 bytes
    pdp = _start_pdp(signer, tmp, "--decide-socket", str(tmp / "d.sock"))
    slow = DecideRelay(tmp / "d.sock", tmp / "slow.sock", delay=0.6)
    pep = _start_pep(pdp, tmp, upstream, "--pdp-socket", str(slow.path))
    log = tmp / "state" / "decisions.log"
    try:
        logged = len(log_records(log))
        _hang_up_after(pep, _chat("never"), wait=0.2)  # before the PDP's answer, 0.6 s away
        if stopped:
            pep.stop()  # SIGTERM, while the release is on its way
        for _ in range(100):
            added = log_records(log)[logged:]
            decisions = [r for r in added if r.get("kind") == "decision"]
            if decisions:
                break
            time.sleep(0.05)
        assert decisions[0]["result"]["allow"] and decisions[0]["reservation_id"]
        runs = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())  # type: ignore[no-untyped-call]
        asked = pdp_pb2.GetRunRequest(run_id=decisions[0]["run_id"])
        for _ in range(100):  # released, while the sidecar serves on: nothing held, nothing spent
            run = runs.GetRun(asked, timeout=5)
            if not run.reserved.tokens:
                break
            time.sleep(0.05)
        assert (run.reserved.tokens, run.spent.tokens) == (0, 0)
        # Its record: with the next commit, or the sidecar's last settlements as it stops.
        pep.stop()
        reserved, settled = _settled(log, decisions[0]["decision_id"])
        assert (reserved > 0, settled) == (True, 0)
        assert FORWARDED.empty()
    finally:
        pep.stop()
        slow.close()
        pdp.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_call_whose_agent_hangs_up_before_its_upstream_connects_settles_at_0(
    signer: Signer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Nothing was written to the upstream: the call cannot have run, and its reservation
    is given back rather than charged at its worst case."""
    tmp = tmp_path_factory.mktemp("unconnected")
    with socket.socket() as listener, socket.socket() as queued:
        # An accept queue of one, taken: the kernel drops the sidecar's SYNs, and its
        # connect waits, as it does for an upstream that is slow to answer them.
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        queued.settimeout(5)
        queued.connect(listener.getsockname())
        pdp = _start_pdp(signer, tmp)
        pep = _start_pep(pdp, tmp, listener.getsockname()[1])
        log = tmp / "state" / "decisions.log"
        try:
            _hang_up_after(pep, _chat("answered"), wait=0.5)
            reserved, settled = _settled(log, _last_decision(log))
            assert (reserved > 0, settled) == (True, 0)
            # Hung up on while forwarding (not while decided, which settles at 0 too).
            assert "upstream openai call abandoned" in pep.output()
        finally:
            pep.stop()
            pdp.stop()


def test_an_agent_that_hangs_up_after_its_streams_last_event_is_charged_what_it_used(
    sidecar: tuple[PepProcess, Path],
) -> None:
    """The stream ended as its protocol ends one ([DONE], after its usage): its usage is
    whole though the chunked body's end had not come, and the call settles at it."""
    pep, log = sidecar
    _hang_up_after(pep, {**_chat("stream-done-then-silent"), "stream": True}, until=b"[DONE]")
    assert HUNG_UP.get(timeout=5)
    reserved, settled = _settled(log, _last_decision(log))
    assert (settled, reserved > 7) == (7, True)
