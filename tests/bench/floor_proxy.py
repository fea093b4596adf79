"""The floor any Python proxy can reach: aiohttp, one shared client session, chunks streamed
back, no policy. Run as its own process by bench_pep.py: ``floor_proxy.py PORT UPSTREAM``."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


async def forward(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    body = await request.read()
    async with session.request(
        request.method,
        request.app["upstream"] + request.rel_url.path_qs,
        headers=headers,
        data=body,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status)
        response.headers.update({k: v for k, v in upstream.headers.items() if k.lower() not in HOP})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app["session"] = aiohttp.ClientSession(auto_decompress=False)
    yield
    await app["session"].close()


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    app = web.Application()
    app["upstream"] = upstream
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    # The sidecar's own loop: a floor on the standard loop would cost more CPU than any
    # proxy on uvloop needs to, and flatter the sidecar beside it.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
