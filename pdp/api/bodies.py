"""Reading a request body with a limit, for every aiohttp door (the PEP, the PDP's REST)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["read_body"]


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None if it is over ``limit`` (read no further than that).

    A declared length over the limit is refused before reading; a body that does not
    declare one (chunked) is cut off as soon as it passes the limit.
    """
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
