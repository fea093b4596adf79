"""A plain JSON service behind the sidecar: invoices, an admin route it must refuse, an echo."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from tests.fakes._support import FakeApiError, fake_app, json_object
from tests.fakes.recorder import Recorder

UPSTREAM = "http"
INVOICE_AMOUNT_USD_MICROS = 4_200_000
# Tests look for this value to prove it never reached a client through the sidecar.
ADMIN_SECRET = "fake-upstream-admin-secret-0xDEADBEEF"
_INVOICE_NUMBERS: web.AppKey[Iterator[int]] = web.AppKey("invoice_numbers")


def render_error(err: FakeApiError) -> dict[str, Any]:
    return {"error": {"status": err.status, "type": err.kind, "message": err.message}}


def http_app(recorder: Recorder) -> web.Application:
    app = fake_app(UPSTREAM, recorder, render_error)
    app[_INVOICE_NUMBERS] = itertools.count(1001)
    app.router.add_get("/v1/invoices/{invoice_id}", get_invoice)
    app.router.add_post("/v1/invoices", create_invoice)
    app.router.add_get("/admin/secrets", admin_secrets)
    app.router.add_route("*", "/v1/echo", echo)
    app.router.add_get("/healthz", healthz)
    return app


async def get_invoice(request: web.Request) -> web.StreamResponse:
    invoice_id = request.match_info["invoice_id"]
    return web.json_response(
        {"invoice": invoice_id, "amount_usd_micros": INVOICE_AMOUNT_USD_MICROS}
    )


async def create_invoice(request: web.Request) -> web.StreamResponse:
    body = await json_object(request)
    amount = body.get("amount_usd_micros", INVOICE_AMOUNT_USD_MICROS)
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise FakeApiError(400, "amount_usd_micros must be a non-negative integer")
    numbers = request.app[_INVOICE_NUMBERS]
    invoice_id = f"inv_{next(numbers)}"
    return web.json_response(
        {"invoice": invoice_id, "amount_usd_micros": amount, "created": True},
        status=201,
        headers={"Location": f"/v1/invoices/{invoice_id}"},
    )


async def admin_secrets(_request: web.Request) -> web.StreamResponse:
    return web.json_response({"secret": ADMIN_SECRET})


async def echo(request: web.Request) -> web.StreamResponse:
    """Everything the request carried, so tests can see which headers a proxy kept or dropped.
    ``?set-cookie=VALUE`` answers with that ``Set-Cookie``, as a session-keeping service would."""
    raw = await request.read()
    cookie = request.query.get("set-cookie")
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            # Lower-cased like the Recorder's; repeated headers folded with ", ".
            "headers": {
                name.lower(): ", ".join(request.headers.getall(name))
                for name in dict.fromkeys(request.headers.keys())
            },
            "body": raw.decode("utf-8", errors="replace"),
        },
        headers={"Set-Cookie": cookie} if cookie else None,
    )


async def healthz(_request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})
