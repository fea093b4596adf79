"""Forwarding: the sidecar passes bytes, not its reading of them.

- hop-by-hop headers (RFC 9110 7.6.1, plus any the Connection header names) are dropped
  both ways, and framing headers are re-derived;
- upstream bodies are never decompressed; where the sidecar must read a response
  (usage, ``tools/list``), it asks the upstream for ``identity`` encoding instead;
- ``x-abc-*`` headers are the sidecar's own and never reach the upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from aiohttp import ClientResponse, web
from multidict import CIMultiDict, CIMultiDictProxy

from pep.front import LeanResponse, ModelRequest
from pep.upstream import UpstreamResponse

__all__ = ["HOP_BY_HOP", "relay", "request_headers", "response_headers"]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Framing the sidecar sets itself. Expect too: the sidecar has read the body (answering
# the agent's 100 Continue itself), and an upstream told to wait would read it as the next
# request if it answered first.
_FRAMING = frozenset({"content-length", "host", "expect"})


_REQUEST_DROP = HOP_BY_HOP | _FRAMING
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


def _dropped(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], always: frozenset[str]
) -> frozenset[str]:
    """The lower-cased names not to pass on: ``always``, and any the Connection header names."""
    if "connection" not in headers:
        return always
    named = {
        token.strip().lower()
        for value in headers.getall("connection")
        for token in value.split(",")
        if token.strip()
    }
    return always | named


def request_headers(
    request: web.Request | ModelRequest, *, identity: bool
) -> list[tuple[str, str]]:
    """The agent's headers to send upstream, in order; ``identity`` replaces its
    Accept-Encoding with ``identity``."""
    drop = _dropped(request.headers, _REQUEST_DROP)
    headers = [
        (name, value)
        for name, value in request.headers.items()
        if (low := name.lower()) not in drop
        and not low.startswith("x-abc-")
        and not (identity and low == "accept-encoding")
    ]
    if identity:
        headers.append(("Accept-Encoding", "identity"))
    return headers


def _response_pairs(upstream: ClientResponse | UpstreamResponse) -> Iterator[tuple[str, str]]:
    drop = _dropped(upstream.headers, _RESPONSE_DROP)
    return ((n, v) for n, v in upstream.headers.items() if n.lower() not in drop)


def response_headers(upstream: ClientResponse | UpstreamResponse) -> CIMultiDict[str]:
    return CIMultiDict(_response_pairs(upstream))


class _HeadersWithBody(web.StreamResponse):
    """A response whose head is held until its first body bytes (or its end) and sent in
    the same write: one syscall and one segment, as ``web.Response`` does, where a plain
    ``StreamResponse`` writes the head on its own first."""

    _send_headers_immediately = False


async def relay(
    request: web.Request | ModelRequest,
    upstream: ClientResponse | UpstreamResponse,
    extra_headers: dict[str, str],
    tap: Callable[[bytes], None] | None = None,
) -> web.StreamResponse | LeanResponse:
    """Send the upstream's response to the agent chunk by chunk, exactly as received.

    A body of known length (a JSON answer) usually arrives with its head: the two leave
    in one write. A stream (SSE, chunked) sends its head at once, so the agent sees the
    status before the first event, however long that takes."""
    length = upstream.content_length
    response: web.StreamResponse | LeanResponse
    if isinstance(request, ModelRequest):
        response = LeanResponse(request, upstream.status, upstream.reason)
    else:
        kind = web.StreamResponse if length is None else _HeadersWithBody
        response = kind(status=upstream.status, reason=upstream.reason)
    response.headers.extend(_response_pairs(upstream))
    response.headers.update(extra_headers)
    if length is not None:
        response.content_length = length  # same bytes, same length
    try:
        if isinstance(response, LeanResponse):
            await response.prepare()
        else:
            assert not isinstance(request, ModelRequest)
            await response.prepare(request)
        if isinstance(upstream, UpstreamResponse):
            chunks = upstream.chunks()
        else:
            chunks = upstream.content.iter_any()
        async for chunk in chunks:
            if tap is not None:
                tap(chunk)
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:
        # The agent hung up (SDKs close a stream once they have read its last event):
        # nothing is left to deliver, and leaving the block closes the upstream too.
        pass
    return response
