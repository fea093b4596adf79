"""pep.forward.relay over loopback: what the agent gets is what the upstream sent."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from pep.forward import relay, request_headers
from tests.harness import serve_app

JSON = b'{"id":"chatcmpl-1","usage":{"total_tokens":4}}'


async def _upstream(request: web.Request) -> web.StreamResponse:
    match request.path:
        case "/json":
            return web.Response(body=JSON, content_type="application/json")
        case "/empty":
            return web.Response(status=204, headers={"X-Kept": "1"})
        case _:  # a body of known length sent in pieces, the last after a pause
            response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            response.content_length = 10
            await response.prepare(request)
            await response.write(b"01234")
            await asyncio.sleep(0.05)
            await response.write(b"56789")
            await response.write_eof()
            return response


async def _through_relay(method: str, path: str) -> tuple[int, dict[str, str], bytes, list[bytes]]:
    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", _upstream)
    upstream_runner, upstream_port = await serve_app(upstream_app)
    tapped: list[bytes] = []

    async with aiohttp.ClientSession(auto_decompress=False) as session:

        async def proxy(request: web.Request) -> web.StreamResponse:
            url = f"http://127.0.0.1:{upstream_port}{request.path}"
            async with session.request(request.method, url) as upstream:
                return await relay(request, upstream, {"x-abc-decision-id": "dec_1"}, tapped.append)

        proxy_app = web.Application()
        proxy_app.router.add_route("*", "/{tail:.*}", proxy)
        proxy_runner, proxy_port = await serve_app(proxy_app)
        try:
            async with (
                aiohttp.ClientSession(auto_decompress=False) as agent,
                agent.request(method, f"http://127.0.0.1:{proxy_port}{path}") as reply,
            ):
                return reply.status, dict(reply.headers), await reply.read(), tapped
        finally:
            await proxy_runner.cleanup()
            await upstream_runner.cleanup()


def test_a_body_of_known_length_arrives_whole_with_its_head() -> None:
    status, headers, body, tapped = asyncio.run(_through_relay("POST", "/json"))
    assert (status, body, b"".join(tapped)) == (200, JSON, JSON)
    assert headers["Content-Length"] == str(len(JSON))
    assert headers["Content-Type"] == "application/json"
    assert headers["x-abc-decision-id"] == "dec_1"
    assert "Transfer-Encoding" not in headers


def test_a_known_length_sent_in_pieces_is_relayed_in_pieces() -> None:
    status, headers, body, tapped = asyncio.run(_through_relay("GET", "/pieces"))
    assert (status, body, headers["Content-Length"]) == (200, b"0123456789", "10")
    assert len(tapped) == 2  # not gathered: each piece left as it came


def test_empty_bodies_still_send_their_head() -> None:
    status, headers, body, _ = asyncio.run(_through_relay("GET", "/empty"))
    assert (status, body, headers["X-Kept"]) == (204, b"", "1")
    # HEAD: the length of the body a GET would get, and no body.
    status, headers, body, _ = asyncio.run(_through_relay("HEAD", "/json"))
    assert (status, body, headers["Content-Length"]) == (200, b"", str(len(JSON)))


def test_framing_hop_by_hop_and_sidecar_headers_are_not_forwarded() -> None:
    """Expect among them: the sidecar has read the body already (answering the agent's
    100 Continue itself), and an upstream told to wait would read it as another request."""

    async def forwarded(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(dict(request_headers(request, identity=True)))

    async def run() -> dict[str, str]:
        app = web.Application()
        app.router.add_post("/", forwarded)
        runner, port = await serve_app(app)
        try:
            headers = {
                "Expect": "100-continue",
                "Connection": "X-Private",
                "X-Private": "1",
                "X-ABC-Run": "r",
                "Authorization": "Bearer sk-keep",
                "Content-Type": "application/json",
            }
            async with (
                aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Accept")) as agent,
                agent.post(f"http://127.0.0.1:{port}/", data=b"{}", headers=headers) as reply,
            ):
                return dict(await reply.json())
        finally:
            await runner.cleanup()

    sent = asyncio.run(run())
    assert sent == {
        "Authorization": "Bearer sk-keep",
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
    }
