"""pep/decide_socket.py against a scripted PDP: decisions share one connection, each
answer reaches the caller it is for, a late one sends later decisions elsewhere, and a PDP
of before (one decision at a time) still decides every one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from pdp.api import pdp_pb2
from pdp.api.decide_socket import BUSY, HEADER, OK, PIPELINED, PREAMBLE, frame
from pdp.certs import write_dev_certs
from pep.decide_socket import DecideSocketClient, DecideSocketError, TlsPeer


@pytest.fixture
def where() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="abc-pds-"))  # short: a socket path is 107 bytes
    yield directory / "decide.sock"
    shutil.rmtree(directory, ignore_errors=True)


class _Pdp:
    """Reads requests; answers ``dec_<request id>`` for each, in order, once ``ready``
    says the connection has read enough."""

    def __init__(
        self,
        ready: Callable[[int, list[str]], int],
        delay: float = 0.0,
        before: bool = False,
        busy: int = 0,
    ) -> None:
        self.ready, self.delay = ready, delay
        self.before = before  # a PDP of before pipelining: PREAMBLE only, one at a time
        self.busy = busy  # connections turned away first, as a PDP at its cap does
        self.connections: list[list[str]] = []
        self.said: list[bytes] = []
        self.ended: list[int] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(self.connections)
        seen: list[str] = []
        self.connections.append(seen)
        answered = 0
        try:
            if number < self.busy:
                writer.write(BUSY)
                return
            said = await reader.readexactly(len(PREAMBLE))
            self.said.append(said)
            if said == PIPELINED and not self.before:
                writer.write(PIPELINED)
            elif said != PREAMBLE:
                return  # closed unanswered, as a PDP of before does
            while True:
                (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                seen.append(
                    pdp_pb2.DecideRequest.FromString(await reader.readexactly(length)).request_id
                )
                upto = self.ready(number, seen)
                if upto > answered:
                    await asyncio.sleep(self.delay if number == 0 else 0)
                    writer.write(
                        b"".join(
                            frame(
                                OK
                                + pdp_pb2.DecideResponse(decision_id=f"dec_{r}").SerializeToString()
                            )
                            for r in seen[answered:upto]
                        )
                    )
                    answered = upto
        except (asyncio.IncompleteReadError, ConnectionError):
            self.ended.append(number)
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def _serving(where: Path, pdp: _Pdp) -> AsyncIterator[DecideSocketClient]:
    server = await asyncio.start_unix_server(pdp.serve, str(where))
    client = DecideSocketClient(where)
    try:
        yield client
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def _request(request_id: str) -> pdp_pb2.DecideRequest:
    return pdp_pb2.DecideRequest(run_id="run_1", request_id=request_id)


def test_decisions_in_flight_share_one_connection_and_each_gets_its_own_answer(
    where: Path,
) -> None:
    pdp = _Pdp(lambda _, seen: len(seen) if len(seen) == 8 else 0)  # all 8 answered at once

    async def scenario() -> list[str]:
        async with _serving(where, pdp) as client:
            answers = await asyncio.gather(
                *(client.decide(_request(f"r{n}"), 5.0) for n in range(8))
            )
            return [answer.decision_id for answer in answers]

    assert asyncio.run(scenario()) == [f"dec_r{n}" for n in range(8)]
    assert len(pdp.connections) == 1


def test_an_answer_whose_caller_hung_up_is_dropped_not_given_to_the_next(where: Path) -> None:
    pdp = _Pdp(lambda _, seen: len(seen) if len(seen) == 2 else 0)  # a's answer waits for b

    async def scenario() -> str:
        async with _serving(where, pdp) as client:
            first = asyncio.ensure_future(client.decide(_request("a"), 5.0))
            while not pdp.connections or not pdp.connections[0]:
                await asyncio.sleep(0.01)
            first.cancel()  # its agent hung up: the connection stays in step
            with contextlib.suppress(asyncio.CancelledError):
                await first
            return (await client.decide(_request("b"), 5.0)).decision_id

    assert asyncio.run(scenario()) == "dec_b"
    assert pdp.connections == [["a", "b"]]


def test_a_late_answer_sends_the_next_decisions_to_a_new_connection(where: Path) -> None:
    pdp = _Pdp(lambda _, seen: len(seen), delay=0.5)  # the first connection answers late

    async def scenario() -> str:
        async with _serving(where, pdp) as client:
            with pytest.raises(DecideSocketError, match="TimeoutError"):
                await client.decide(_request("a"), 0.2)
            answer = await client.decide(_request("b"), 5.0)
            await asyncio.sleep(0.6)  # a's answer has come by now, to nobody
            return answer.decision_id

    assert asyncio.run(scenario()) == "dec_b"
    assert pdp.connections == [["a"], ["b"]]
    assert 0 in pdp.ended  # the one given up on is closed, not kept open for good


def test_a_pdp_of_before_decides_each_one_at_a_time_and_none_is_refused(
    where: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pdp = _Pdp(lambda _, seen: len(seen), before=True)

    async def scenario() -> list[str]:
        async with _serving(where, pdp) as client:
            answers = await asyncio.gather(
                *(client.decide(_request(f"r{n}"), 5.0) for n in range(4))
            )
            answers.append(await client.decide(_request("r4"), 5.0))
            return [answer.decision_id for answer in answers]

    with caplog.at_level(logging.WARNING, "abc.pep"):
        assert asyncio.run(scenario()) == [f"dec_r{n}" for n in range(5)]
    assert pdp.said[0] == PIPELINED  # tried once, then one request per connection at a time
    assert set(pdp.said[1:]) == {PREAMBLE}
    assert all(len(seen) <= 2 for seen in pdp.connections)
    assert caplog.text.count("one decision at a time") == 1


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_pdp_turning_a_connection_away_is_a_refusal_not_a_pdp_of_before(
    where: Path, caplog: pytest.LogCaptureFixture, run: Callable[[Any], str]
) -> None:
    """On uvloop (the sidecar's) the first bytes may come before the connection is handed
    over: BUSY is still read as such."""
    pdp = _Pdp(lambda _, seen: len(seen), busy=2)

    async def scenario() -> str:
        async with _serving(where, pdp) as client:
            await client.check(5.0)  # reachable, if busy: the sidecar starts
            with pytest.raises(DecideSocketError, match="turned the connection away: busy"):
                await client.decide(_request("a"), 5.0)
            return (await client.decide(_request("b"), 5.0)).decision_id

    with caplog.at_level(logging.WARNING, "abc.pep"):
        assert run(scenario()) == "dec_b"
    assert pdp.said == [PIPELINED]  # the third, pipelined again, on a new connection
    assert "the PDP is busy" in caplog.text
    assert "one decision at a time" not in caplog.text


def test_a_sidecar_starting_beside_a_pdp_of_before_starts_and_decides(where: Path) -> None:
    pdp = _Pdp(lambda _, seen: len(seen), before=True)

    async def scenario() -> str:
        async with _serving(where, pdp) as client:
            await client.check(5.0)  # reachable: it decides, one at a time
            return (await client.decide(_request("a"), 5.0)).decision_id

    assert asyncio.run(scenario()) == "dec_a"
    assert pdp.said == [PIPELINED, PREAMBLE]


def test_over_tls_a_pdp_closing_at_the_preamble_is_a_refusal_not_a_pdp_of_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every PDP that serves TLS pipelines: one that closes at the preamble is stopping or
    busy, and the sidecar never falls back to a connection (a handshake) per decision."""
    write_dev_certs(tmp_path, ["localhost"], 2, False)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(tmp_path / "pdp.pem", tmp_path / "pdp.key")
    client_side = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_side.load_verify_locations(cafile=tmp_path / "ca.pem")
    pdp = _Pdp(lambda _, seen: len(seen), before=True)

    async def scenario() -> None:
        server = await asyncio.start_server(pdp.serve, "127.0.0.1", 0, ssl=server_side)
        port = server.sockets[0].getsockname()[1]
        client = DecideSocketClient(TlsPeer("127.0.0.1", port, client_side, "localhost"))
        try:
            for request_id in ("a", "b"):
                with pytest.raises(DecideSocketError):
                    await client.decide(_request(request_id), 5.0)
        finally:
            await client.close()
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.WARNING, "abc.pep"):
        uvloop.run(scenario())
    assert pdp.said == [PIPELINED, PIPELINED]  # each tried pipelined, none alone
    assert "one decision at a time" not in caplog.text
