"""The decide socket: ``Decide`` between a sidecar and the PDP on its host, without gRPC.

The real abc-pdp serves it (``--decide-socket``), the real abc-pep decides on it
(``--pdp-socket``) for the official OpenAI SDK; a client speaking anything else is cut off
and the PDP serves on; a PDP gone, silent or garbled is a refusal.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from pdp.api import ReasonCode, pdp_pb2, pdp_pb2_grpc
from pdp.api.decide_socket import HEADER, OK, PREAMBLE, REFUSED, SETTLE_WAIT_SECONDS, frame
from pep.decide_socket import OWN_USERS, DecideSocketClient, DecideSocketError, UnixPeer
from pep.pdp_client import PdpClient
from tests.fakes.serve import FakeUpstreams
from tests.harness import (
    INTENT,
    POLICIES,
    DecideRelay,
    PdpProcess,
    PepProcess,
    Signer,
    free_port,
    pdp_flags,
    read_frame,
    sample,
    start_pdp,
    start_pep,
    start_up_error,
)

MODEL = pdp_pb2.Action(kind="model", target="model:openai/gpt-4o-mini", max_tokens=100)


@pytest.fixture(scope="module")
def short_dir() -> Iterator[Path]:
    """A socket's path must fit in 108 bytes: pytest's tmp paths may not."""
    path = Path(tempfile.mkdtemp(prefix="abc-sock-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def served(signer: Signer, short_dir: Path) -> Iterator[tuple[PdpProcess, Path]]:
    path = short_dir / "decide.sock"
    pdp = start_pdp(signer, short_dir / "state", POLICIES, "--decide-socket", str(path))
    yield pdp, path
    pdp.stop()


@pytest.fixture(scope="module")
def run_id(served: tuple[PdpProcess, Path], signer: Signer) -> str:
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/socket")
    stub = pdp_pb2_grpc.DecisionServiceStub(served[0].channel())  # type: ignore[no-untyped-call]
    envelope = signer.freeze(text, "socket")
    return str(stub.RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=envelope)).run_id)


def ask(sock: socket.socket, payload: bytes) -> bytes:
    """One framed answer to ``payload`` (already framed), or b"" when the PDP hung up."""
    sock.sendall(payload)
    return read_frame(sock.makefile("rb")) or b""


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def test_decisions_need_only_the_socket_and_are_the_pdps_own(
    served: tuple[PdpProcess, Path], run_id: str
) -> None:
    pdp, path = served
    # The socket is the PDP user's alone, from the moment it exists.
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600

    async def scenario() -> None:
        # No gRPC behind the client at all: every decision below went over the socket.
        client = PdpClient(f"127.0.0.1:{free_port()}", 5.0, decide_socket=path)
        first = await client.decide(run_id, "sock-1", MODEL)
        assert first.allow and first.decision_id.startswith("dec_")
        assert first.obligations == {"max_tokens": 100} and first.reservation_id
        # A settlement rides on the next decision, over the socket too.
        client.report_usage(first.reservation_id, 7)
        refused = await client.decide(
            run_id, "sock-2", pdp_pb2.Action(kind="model", target="model:openai/gpt-5")
        )
        assert not refused.allow and refused.reason is ReasonCode.MODEL_NOT_ALLOWED
        # Decisions in flight at once each take a connection of their own.
        many = await asyncio.gather(
            *(client.decide(run_id, f"sock-many-{n}", MODEL) for n in range(12))
        )
        assert all(v.allow for v in many) and len({v.decision_id for v in many}) == 12
        # The same request id answers the same decision, as over gRPC.
        again = await client.decide(run_id, "sock-1", MODEL)
        assert again.decision_id == first.decision_id
        await client.close()

    asyncio.run(scenario())
    runs = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())  # type: ignore[no-untyped-call]
    spent = runs.GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5).spent
    assert spent.tokens == 7  # the carried settlement, durable before the second answer


def _spent(pdp: PdpProcess, run_id: str) -> int:
    runs = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())  # type: ignore[no-untyped-call]
    return int(runs.GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5).spent.tokens)


def test_a_settlement_no_decision_carries_goes_over_the_socket_too(
    served: tuple[PdpProcess, Path], run_id: str
) -> None:
    """An agent whose next call comes after the linger: its settlement travels alone, and
    still needs no gRPC (none is behind this client)."""
    pdp, path = served
    before = _spent(pdp, run_id)

    async def scenario() -> None:
        client = PdpClient(f"127.0.0.1:{free_port()}", 5.0, settle_linger=0.05, decide_socket=path)
        allowed = await client.decide(run_id, "sock-alone-1", MODEL)
        client.report_usage(allowed.reservation_id, 11)
        await asyncio.sleep(0.5)  # the linger passes: no decision will carry it
        await client.close()

    asyncio.run(scenario())
    assert _spent(pdp, run_id) == before + 11


def _settled_in_log(state: Path) -> set[str]:
    """The reservations whose settlement records are in the PDP's decision log."""
    lines = (state / "decisions.log").read_text().splitlines()
    return {r["reservation_id"] for r in map(json.loads, lines) if r["kind"] == "settlement"}


def _folding_pdp(signer: Signer, where: Path) -> tuple[PdpProcess, str]:
    """A PDP of its own, with no idle checkpoint to write its log's tail meanwhile: what
    reaches its log is what its decisions' commits took along. Its run's id."""
    where.mkdir()
    flags = ("--decide-socket", str(where / "d.sock"), "--checkpoint-seconds", "3600")
    pdp = start_pdp(signer, where / "state", POLICIES, *flags)
    stub = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())  # type: ignore[no-untyped-call]
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/folding")
    text = text.replace("requests: 500", "requests: 5000")  # for a burst of calls
    envelope = signer.freeze(text, "folding")
    registered = stub.RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=envelope))
    return pdp, str(registered.run_id)


def test_a_settlement_no_decision_carries_is_written_with_the_next_commit(
    signer: Signer, short_dir: Path
) -> None:
    """The last call before a pause: its settlement, sent alone after the linger, is settled
    and answered at once, with no write of its own. The next decision carries it again and
    its commit writes it: one durable write a call, the pause's included."""
    where = short_dir / "fold"
    pdp, run_id = _folding_pdp(signer, where)

    async def scenario() -> tuple[str, int, set[str], set[str]]:
        client = PdpClient(pdp.address, 5.0, settle_linger=0.05, decide_socket=where / "d.sock")
        first = await client.decide(run_id, "fold-1", MODEL)
        client.report_usage(first.reservation_id, 11)
        # The linger passes and no decision carries it; nor would the PDP's wait for one.
        await asyncio.sleep(0.3 + SETTLE_WAIT_SECONDS)
        spent, written = _spent(pdp, run_id), _settled_in_log(where / "state")
        assert (await client.decide(run_id, "fold-2", MODEL)).allow
        after = _settled_in_log(where / "state")
        await client.close()
        return first.reservation_id, spent, written, after

    try:
        reservation, spent, written, after = asyncio.run(scenario())
    finally:
        pdp.stop()
    assert spent == 11  # settled at once
    assert reservation not in written  # its record waited for a commit
    assert reservation in after  # the next decision's took it along


def test_a_closing_sidecar_makes_what_it_had_left_to_confirm_durable(
    signer: Signer, short_dir: Path
) -> None:
    """No decision will come to confirm it: on closing, the sidecar sends the settlement
    again and is answered once it is durable (settled already, so false, and written)."""
    where = short_dir / "closing"
    pdp, run_id = _folding_pdp(signer, where)

    async def scenario() -> tuple[str, set[str]]:
        client = PdpClient(pdp.address, 5.0, settle_linger=0.05, decide_socket=where / "d.sock")
        first = await client.decide(run_id, "closing-1", MODEL)
        client.report_usage(first.reservation_id, 11)
        await asyncio.sleep(0.3 + SETTLE_WAIT_SECONDS)
        written = _settled_in_log(where / "state")
        await client.close()
        return first.reservation_id, written

    try:
        reservation, written = asyncio.run(scenario())
        assert reservation not in written
        assert reservation in _settled_in_log(where / "state")
        assert _spent(pdp, run_id) == 11
    finally:
        pdp.stop()


def test_a_closing_sidecar_sends_what_it_has_to_confirm_in_batches_the_pdp_takes(
    signer: Signer, short_dir: Path
) -> None:
    """More settlements left to confirm than one batch may hold (a burst, then no call): on
    closing they go in batches the PDP takes, none dropped."""
    where = short_dir / "burst"
    pdp, run_id = _folding_pdp(signer, where)
    calls = 1100  # past the PDP's 1,024 reports a batch

    async def scenario() -> set[str]:
        client = PdpClient(pdp.address, 5.0, settle_linger=0.05, decide_socket=where / "d.sock")
        allowed = [await client.decide(run_id, f"burst-{n}", MODEL) for n in range(calls)]
        for verdict in allowed:
            client.report_usage(verdict.reservation_id, 1)
        await asyncio.sleep(0.3 + SETTLE_WAIT_SECONDS)
        await client.close()
        return {verdict.reservation_id for verdict in allowed}

    try:
        reservations = asyncio.run(scenario())
        assert reservations <= _settled_in_log(where / "state")
        assert _spent(pdp, run_id) == calls
    finally:
        pdp.stop()


def test_a_settlement_answered_before_it_was_durable_survives_kill_9(
    signer: Signer, short_dir: Path
) -> None:
    """Settled, answered pending, then the PDP is killed before any commit wrote it: the
    settlement is lost with the process, not with the sidecar, whose next decision on the
    restarted PDP carries it again. The reservation ends settled at what was used, not
    held at its worst case."""
    where = short_dir / "k9"
    pdp, run_id = _folding_pdp(signer, where)
    flags = ("--decide-socket", str(where / "d.sock"), "--checkpoint-seconds", "3600")
    restarted: list[PdpProcess] = []

    async def scenario() -> tuple[int, int]:
        client = PdpClient(pdp.address, 5.0, settle_linger=0.05, decide_socket=where / "d.sock")
        first = await client.decide(run_id, "k9-1", MODEL)
        client.report_usage(first.reservation_id, 11)
        await asyncio.sleep(0.5)
        assert _spent(pdp, run_id) == 11
        pdp.stop(signal.SIGKILL)
        restarted.append(start_pdp(signer, where / "state", POLICIES, *flags))
        lost = _spent(restarted[0], run_id)
        await asyncio.sleep(0.2)  # the loop, held by the calls above, sees the old one gone
        assert (await client.decide(run_id, "k9-2", MODEL)).allow
        spent = _spent(restarted[0], run_id)  # before closing, which would send it anyway
        await client.close()
        return lost, spent

    try:
        lost, spent = asyncio.run(scenario())
    finally:
        pdp.stop()
        for again in restarted:
            again.stop()
    assert lost == 0  # the restarted PDP never saw the settlement
    assert spent == 11  # the sidecar's next decision brought it back


def test_settlements_a_socket_does_not_take_go_over_grpc(
    served: tuple[PdpProcess, Path], run_id: str, short_dir: Path
) -> None:
    """A PDP of before pipelined decisions and the settlements' preamble: decisions on its
    socket one at a time (the first try of pipelining closed, its decision sent again), and
    a batch of settlements, whose connection it closes, over gRPC at once, settled all the
    same."""
    pdp, path = served
    before = _spent(pdp, run_id)
    old = DecideRelay(path, short_dir / "old.sock", decisions_only=True)

    async def scenario() -> None:
        client = PdpClient(pdp.address, 5.0, settle_linger=0.05, decide_socket=old.path)
        allowed = await client.decide(run_id, "old-pdp-1", MODEL)
        assert allowed.allow
        client.report_usage(allowed.reservation_id, 13)
        await asyncio.sleep(0.5)
        await client.close()

    try:
        asyncio.run(scenario())
    finally:
        old.close()
    assert _spent(pdp, run_id) == before + 13
    assert [said[:12] for said in old.said] == [b"ABC-DECIDE/2", b"ABC-DECIDE/1", b"ABC-SETTLE/1"]


def _held(path: Path) -> int:
    """Sockets named ``path`` on this host: the PDP's listener and its end of each connection."""
    return Path("/proc/net/unix").read_text().count(f" {path}\n")


def test_a_connection_idle_too_long_is_let_go_before_the_pdp_drops_it(
    served: tuple[PdpProcess, Path], run_id: str
) -> None:
    _, path = served

    async def scenario() -> list[int]:
        client = DecideSocketClient(path, reuse_seconds=0.1)  # 30 s in the product
        before = _held(path)
        held = []
        for n in range(3):
            request = pdp_pb2.DecideRequest(run_id=run_id, request_id=f"idle-{n}", action=MODEL)
            assert (await client.decide(request, 5.0)).allow
            await asyncio.sleep(0.3)  # the PDP closes its end of a connection let go
            held.append(_held(path) - before)
        await client.close()
        return held

    # Each decision after 0.3 s idle takes a new connection and closes the old one.
    assert asyncio.run(scenario()) == [1, 1, 1]


def test_what_is_not_the_protocol_is_cut_off_and_the_pdp_serves_on(
    served: tuple[PdpProcess, Path], run_id: str
) -> None:
    _, path = served
    good = pdp_pb2.DecideRequest(run_id=run_id, request_id="raw-1", action=MODEL)
    cases = {
        "another preamble": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "a frame over the limit": PREAMBLE + HEADER.pack(64 << 20),
        "bytes that are no DecideRequest": PREAMBLE + frame(b"\xff\xff\xff\xff"),
    }
    for why, payload in cases.items():
        with connect(path) as sock:
            assert ask(sock, payload) == b"", why
    with connect(path) as sock:  # cut short: the PDP waits for the rest, then the end
        sock.sendall(PREAMBLE + HEADER.pack(100) + b"x" * 10)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    too_many = pdp_pb2.DecideRequest(
        run_id=run_id,
        request_id="raw-2",
        action=MODEL,
        settlements=[pdp_pb2.ReportUsageRequest(reservation_id="rsv_x")] * 1025,
    )
    with connect(path) as sock:
        answer = ask(sock, PREAMBLE + frame(too_many.SerializeToString()))
        assert answer.startswith(REFUSED) and b"at most 1024" in answer
        # Refused, not cut off: the same connection still decides.
        answer = ask(sock, frame(good.SerializeToString()))
    assert answer[:1] == OK
    assert pdp_pb2.DecideResponse.FromString(answer[1:]).decision_id.startswith("dec_")


def _silent(path: Path, reply: bytes | None) -> None:
    """A listener on ``path`` that reads a request and answers ``reply`` (None: nothing)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            conn.recv(65536)
            if reply is not None:
                conn.sendall(reply)
            time.sleep(1.5)

    threading.Thread(target=serve, daemon=True).start()


@pytest.mark.parametrize(
    "reply",
    [None, frame(OK + b"\xff\xff"), frame(REFUSED + b"no"), HEADER.pack(1 << 30)],
    ids=["silent", "garbage", "refused", "too-long"],
)
def test_a_silent_garbled_or_absent_pdp_is_a_refusal(short_dir: Path, reply: bytes | None) -> None:
    path = short_dir / f"fake-{free_port()}.sock"
    _silent(path, reply)  # a daemon thread: it ends by itself once its 1.5 s are up

    async def scenario() -> tuple[float, list[tuple[bool, ReasonCode | None, str]]]:
        client = PdpClient(f"127.0.0.1:{free_port()}", 0.25, decide_socket=path)
        started = time.monotonic()
        verdict = await client.decide("run_any", "r-1", MODEL)
        elapsed = time.monotonic() - started
        absent = PdpClient(f"127.0.0.1:{free_port()}", 0.25, decide_socket=path.with_name("no"))
        gone = await absent.decide("run_any", "r-2", MODEL)
        await client.close()
        await absent.close()
        return elapsed, [(v.allow, v.reason, v.decision_id[:4]) for v in (verdict, gone)]

    elapsed, verdicts = asyncio.run(scenario())
    assert verdicts == [(False, ReasonCode.PDP_UNAVAILABLE, "pep_")] * 2
    assert elapsed < 1.0  # the deadline, not the listener's 1.5 s


def test_a_decision_waiting_for_a_connection_keeps_its_deadline(
    served: tuple[PdpProcess, Path], short_dir: Path, run_id: str
) -> None:
    """With the pool's one connection held by a silent PDP, the next decision waits for it
    no longer than its own deadline; the slot is given back, so the pool decides again
    once the socket leads to a PDP that answers (a restarted one)."""
    fake, path = short_dir / f"fake-{free_port()}.sock", short_dir / f"via-{free_port()}.sock"
    _silent(fake, None)
    path.symlink_to(fake)

    async def scenario() -> tuple[list[str], float, str]:
        client = DecideSocketClient(path, max_in_flight=1)
        request = pdp_pb2.DecideRequest(run_id=run_id, request_id="r-slot", action=MODEL)
        holding = asyncio.ensure_future(client.decide(request, 1.2))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(DecideSocketError):
            await client.decide(request, 0.3)
        waited = time.monotonic() - started
        failures = await asyncio.gather(holding, return_exceptions=True)
        path.unlink()
        path.symlink_to(served[1])
        answer = await client.decide(request, 5.0)
        await client.close()
        return [type(f).__name__ for f in failures], waited, answer.decision_id

    failures, waited, decision_id = asyncio.run(scenario())
    assert failures == ["DecideSocketError"]
    assert waited < 0.8  # its own 0.3 s, not the 1.2 s the connection was held
    assert decision_id.startswith("dec_")


def test_the_sidecar_decides_on_the_socket_for_the_openai_sdk(
    served: tuple[PdpProcess, Path], signer: Signer, short_dir: Path
) -> None:
    pdp, path = served
    envelope = short_dir / "pep.json"
    envelope.write_bytes(
        signer.freeze(
            INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/socket-pep"),
            "socket-pep",
        )
    )
    with FakeUpstreams() as fakes:
        pep: PepProcess = start_pep(
            pdp.address,
            {"openai": fakes.openai_url.removesuffix("/v1")},
            short_dir,
            "--manifest",
            str(envelope),
            "--pdp-socket",
            str(path),
        )
        try:
            agent = openai.OpenAI(base_url=f"{pep.url}/openai/v1", api_key="sk-x", max_retries=0)
            reply = agent.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=9000
            )
            assert reply.choices[0].message.content
            assert fakes.recorder.last("openai").body["max_tokens"] == 2048  # the grant's cap
            with pytest.raises(openai.PermissionDeniedError) as refused:
                agent.chat.completions.create(
                    model="gpt-5", messages=[{"role": "user", "content": "x"}]
                )
            assert refused.value.code == "model_not_allowed"
            assert refused.value.response.headers["x-abc-decision-id"].startswith("dec_")
            # The sidecar holds a connection to the socket: its decisions went there.
            assert _held(path) >= 2  # the listener and the PDP's end of the sidecar's
            metrics = pep.metrics()
            assert sample(metrics, "abc_pep_pdp_transport", transport="decide_socket") == 1
            assert sample(metrics, "abc_pep_pdp_transport", transport="grpc") == 0
        finally:
            pep.stop()


def test_a_socket_in_the_way_stops_start_up_and_a_dead_ones_file_is_reused(
    signer: Signer, short_dir: Path, served: tuple[PdpProcess, Path]
) -> None:
    state = short_dir / "other-state"
    # The other refusals of a path (a file, no directory) are unit tests of bind_decide_socket.
    error = start_up_error("abc-pdp", *pdp_flags(signer.trust, state), "--decide-socket", served[1])
    assert "another process is serving on it" in error
    assert not state.exists()  # refused before any state was made
    stale = short_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()  # its file stays, with nobody behind it
    flags = ("--decide-socket", str(stale))

    async def across_a_restart() -> list[str]:
        """Decision ids answered before and after a new PDP takes the socket's path while
        the old one still runs (as in a rolling restart), then the old one stops."""
        client = PdpClient(f"127.0.0.1:{free_port()}", 5.0, decide_socket=stale)
        old = start_pdp(signer, state, POLICIES, *flags)  # blocks the loop: no matter
        new = None
        try:
            answered = [(await client.decide("run_unknown", "s-1", MODEL)).decision_id[:4]]
            stale.rename(short_dir / "old.sock")  # the old PDP serves on, under another name
            new = start_pdp(signer, short_dir / "new-state", POLICIES, *flags)
            old.stop()
            assert stale.exists()  # the old PDP removed its own file, not the newcomer's
            await asyncio.sleep(0.2)  # the loop sees the old PDP's end of its connection
            answered.append((await client.decide("run_unknown", "s-2", MODEL)).decision_id[:4])
        finally:
            old.stop()
            if new is not None:
                new.stop()
        assert not stale.exists()  # a clean stop takes its socket away
        await client.close()
        return answered

    # Both from a PDP: the connection the old one closed was not reused for the second.
    assert asyncio.run(across_a_restart()) == ["dec_", "dec_"]


def _impostor(path: Path, answer: bytes, uid: int | None) -> int:
    """A child process serving ``answer`` on ``path`` as ``uid``; its pid once listening."""
    ready, told = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: sockets and exit only, nothing of the parent's threads
        try:
            if uid is not None:
                os.setuid(uid)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            listener.listen()
            os.write(told, b"1")
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(answer)
            conn.recv(1)
        finally:
            os._exit(0)
    os.close(told)
    assert os.read(ready, 1) == b"1"
    os.close(ready)
    return pid


def test_a_sidecar_that_cannot_decide_on_its_socket_does_not_start(
    served: tuple[PdpProcess, Path], signer: Signer, short_dir: Path
) -> None:
    """Registered over gRPC, so the PDP is up: a wrong --pdp-socket is a configuration
    mistake, said once at start-up rather than as a refusal of every call."""
    envelope = short_dir / "startup.json"
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/sock-start")
    envelope.write_bytes(signer.freeze(text, "sock-start"))
    wrong = short_dir / "wrong.sock"
    error = start_up_error(
        "abc-pep",
        "--pdp",
        served[0].address,
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--metrics",
        "off",
        "--manifest",
        envelope,
        "--pdp-socket",
        wrong,
    )
    assert f"--pdp-socket {wrong}: cannot decide there" in error
    assert f"is abc-pdp started with --decide-socket {wrong}?" in error


def test_a_socket_served_by_another_user_is_refused(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever can write to the socket's directory could put their own socket there: the
    sidecar decides only with a PDP running as its own user (or root)."""
    path = short_dir / "impostor.sock"
    allow = pdp_pb2.DecideResponse(allow=True, decision_id="dec_fake")
    allow.obligations.update({"max_tokens": 100})  # well formed: only who serves it is wrong
    # As root, the impostor is another user, and the sidecar trusts its own users (itself
    # and root). Otherwise the impostor runs as this user, so the sidecar is told to trust
    # root alone: the same check against a peer it does not trust.
    other = 65534 if os.getuid() == 0 else None
    users = OWN_USERS if other is not None else frozenset({0})
    os.chmod(short_dir, 0o777)  # the impostor may create its socket there
    pid = _impostor(path, frame(OK + allow.SerializeToString()), other)
    try:

        async def scenario() -> None:
            client = DecideSocketClient(UnixPeer(path, users))
            request = pdp_pb2.DecideRequest(run_id="run_any", request_id="imp-1", action=MODEL)
            # No answer at all, not the impostor's allow (PdpClient refuses on this error).
            with pytest.raises(DecideSocketError, match="not this sidecar's user"):
                await client.decide(request, 2.0)
            await client.close()

        asyncio.run(scenario())
        assert f"{path} is served by uid {other or os.getuid()}, not this sidecar's user" in (
            caplog.text
        )
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.chmod(short_dir, 0o700)
