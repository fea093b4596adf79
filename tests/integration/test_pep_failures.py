"""The sidecar fails closed and passes bytes: PDP down, slow or lying; exact stream bytes."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx2 as httpx
import openai
import pytest
from aiohttp import web

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.fakes.serve import FakeUpstreams
from tests.harness import EarlyExit, Signer, free_port, serve_app, start_pdp, start_pep

CHAT = "/openai/v1/chat/completions"
SLOW_PDP_SECONDS = 10.0
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class FakePdp(pdp_pb2_grpc.DecisionServiceServicer):
    """A PDP servicer at the seam: slow, or answering garbage, on demand."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.release = threading.Event()  # set when the test ends: a slow answer stops waiting

    def Decide(self, request, context):  # type: ignore[no-untyped-def]
        if self.mode == "slow":
            # Far beyond the sidecar's 250 ms deadline, so that no load on the machine can
            # blur which one the sidecar waited for.
            self.release.wait(SLOW_PDP_SECONDS)
            return pdp_pb2.DecideResponse(allow=True, decision_id="dec_slow")
        if self.mode == "no-decision-id":
            return pdp_pb2.DecideResponse(allow=True)
        if self.mode == "unknown-reason":
            return pdp_pb2.DecideResponse(
                allow=False,
                decision_id="dec_x",
                reasons=[pdp_pb2.Reason(code="made_up", message="")],
            )
        return pdp_pb2.DecideResponse(allow=False, decision_id="dec_x")  # a refusal without reason


@pytest.fixture
def fakes() -> Iterator[FakeUpstreams]:
    with FakeUpstreams() as upstreams:
        yield upstreams


@pytest.mark.parametrize(
    "mode", ["slow", "no-decision-id", "unknown-reason", "deny-without-reason"]
)
def test_a_slow_or_lying_pdp_means_refusal(mode: str, fakes: FakeUpstreams, tmp_path: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fake_pdp = FakePdp(mode)
    pdp_pb2_grpc.add_DecisionServiceServicer_to_server(fake_pdp, server)  # type: ignore[no-untyped-call]
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    pep = start_pep(
        f"127.0.0.1:{port}",
        {"openai": fakes.openai_url.removesuffix("/v1")},
        tmp_path,
        "--run",
        "run_any",
        "--pdp-deadline-ms",
        "250",  # the product's default, which this test is about
    )
    try:
        started = time.monotonic()
        reply = httpx.post(pep.url + CHAT, json=BODY, timeout=SLOW_PDP_SECONDS + 5)
        elapsed = time.monotonic() - started
        assert reply.status_code == 503
        assert reply.json()["error"]["code"] == "pdp_unavailable"
        assert reply.headers["x-abc-decision-id"].startswith("pep_")
        if mode == "slow":
            assert elapsed < SLOW_PDP_SECONDS / 4  # the 250 ms deadline, not the PDP's 10 s
        assert not fakes.recorder.find("openai")  # nothing was forwarded
    finally:
        fake_pdp.release.set()
        pep.stop()
        server.stop(0)


def test_pdp_killed_mid_run_refuses_within_the_deadline(
    signer: Signer, fakes: FakeUpstreams, tmp_path: Path
) -> None:
    pdp = start_pdp(signer, tmp_path / "state")
    envelope = tmp_path / "envelope.json"
    from tests.harness import INTENT

    envelope.write_bytes(
        signer.freeze(INTENT.read_text().replace("acme/support-bot", "acme/kill"), "k")
    )
    pep = start_pep(
        pdp.address,
        {"openai": fakes.openai_url.removesuffix("/v1")},
        tmp_path,
        "--manifest",
        str(envelope),
        "--pdp-deadline-ms",
        "250",  # the product's default, which this test is about
    )
    client = openai.OpenAI(base_url=f"{pep.url}/openai/v1", api_key="k", max_retries=0)
    try:
        assert client.chat.completions.create(**BODY)  # type: ignore[call-overload]
        pdp.stop(signal.SIGKILL)
        forwarded = len(fakes.recorder.find("openai"))
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(openai.InternalServerError) as caught:
                client.chat.completions.create(**BODY)  # type: ignore[call-overload]
            assert time.monotonic() - started < 2.0
            assert caught.value.status_code == 503
            assert caught.value.code == "pdp_unavailable"
        assert len(fakes.recorder.find("openai")) == forwarded
    finally:
        pep.stop()


def test_missing_run_is_refused(fakes: FakeUpstreams, tmp_path: Path) -> None:
    pep = start_pep(
        f"127.0.0.1:{free_port()}", {"openai": fakes.openai_url.removesuffix("/v1")}, tmp_path
    )
    try:
        reply = httpx.post(pep.url + CHAT, json=BODY, timeout=10)
        assert reply.status_code == 400
        assert reply.json()["error"]["code"] == "manifest_unknown"
    finally:
        pep.stop()


# Valid SSE in unusual but legal shapes: CRLF endings, comments, split lines, no final newline
# until the end. The agent must receive exactly these bytes.
STREAM = (
    b": keep-alive comment\r\n\r\n"
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}\r\n\r\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
    b"data: [DONE]\n\n"
)


def test_streams_arrive_byte_for_byte(signer: Signer, tmp_path: Path) -> None:
    """And a stream's head reaches the agent before its first event: the upstream sends no
    event until the agent has the status (a sidecar holding the head would stall here)."""
    released = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.wait_for(released.wait(), 10)
        for i in range(0, len(STREAM), 37):  # odd chunk boundaries, split mid-line
            await response.write(STREAM[i : i + 37])
            await asyncio.sleep(0.002)
        await response.write_eof()
        return response

    async def scenario() -> bytes:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", stream)
        runner, port = await serve_app(app)
        pdp = await asyncio.to_thread(start_pdp, signer, tmp_path / "state")
        envelope = tmp_path / "envelope.json"
        from tests.harness import INTENT

        envelope.write_bytes(
            signer.freeze(INTENT.read_text().replace("acme/support-bot", "acme/bytes"), "b")
        )
        pep = await asyncio.to_thread(
            start_pep,
            pdp.address,
            {"openai": f"http://127.0.0.1:{port}"},
            tmp_path,
            "--manifest",
            str(envelope),
        )
        try:
            async with (
                httpx.AsyncClient() as client,
                client.stream("POST", pep.url + CHAT, json={**BODY, "stream": True}) as r,
            ):
                assert r.status_code == 200
                released.set()
                return b"".join([chunk async for chunk in r.aiter_raw()])
        finally:
            pep.stop()
            pdp.stop()
            await runner.cleanup()

    assert asyncio.run(scenario()) == STREAM


def test_hop_by_hop_headers_are_dropped_and_the_key_passes(
    signer: Signer, fakes: FakeUpstreams, tmp_path: Path
) -> None:
    """Also: the sidecar keeps no cookies. Its one client session serves every agent, so a
    cookie an upstream set for one must never reach the upstream on another's request.
    (Reached by host name: aiohttp's default jar would keep a cookie for localhost, not
    for 127.0.0.1.)"""
    pdp = start_pdp(signer, tmp_path / "state")
    from tests.harness import INTENT

    envelope = tmp_path / "envelope.json"
    text = INTENT.read_text().replace("acme/support-bot", "acme/hops")
    envelope.write_bytes(
        signer.freeze(text.replace("path_prefix: /v1/invoices/", "path_prefix: /v1/"), "h")
    )
    pep = start_pep(
        pdp.address,
        {"http:billing.internal": fakes.http_url.replace("127.0.0.1", "localhost")},
        tmp_path,
        "--manifest",
        str(envelope),
    )
    try:
        echo = f"{pep.url}/http/billing.internal/v1/echo"
        first = httpx.get(f"{echo}?set-cookie=session%3Dagent-a%3B%20Path%3D%2F")
        assert first.headers["set-cookie"] == "session=agent-a; Path=/"  # relayed to its agent
        bare = httpx.get(echo).json()["headers"]
        assert "cookie" not in bare
        own = httpx.get(echo, headers={"Cookie": "session=agent-b"}).json()["headers"]
        assert own["cookie"] == "session=agent-b"  # the agent's own, as sent
        reply = httpx.get(
            f"{pep.url}/http/billing.internal/v1/echo",
            headers={
                "Authorization": "Bearer sk-keep",
                "Connection": "X-Private",
                "X-Private": "drop-me",
                "Keep-Alive": "timeout=5",
                "X-ABC-Run": "",
                "X-Other": "keep-me",
            },
        )
        assert reply.status_code == 200, reply.text
        seen = {k.lower(): v for k, v in reply.json()["headers"].items()}
        assert seen["authorization"] == "Bearer sk-keep"
        assert seen["x-other"] == "keep-me"
        for dropped in ("x-private", "keep-alive", "x-abc-run"):
            assert dropped not in seen, dropped
    finally:
        pep.stop()
        pdp.stop()


def test_a_metrics_address_in_use_stops_start_up_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(EarlyExit) as exited:
            start_pep("127.0.0.1:1", {}, tmp_path, "--run", "run_x", "--metrics", busy)
    assert f"abc-pep: error: cannot listen on {busy}" in str(exited.value)
