"""pep/adapters/mcp.py's answer filter, fuzzed: whatever an upstream sends, the client
reads either exactly what was sent with every tool list filtered, or a refusal."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any

from httpx2._sse import _SSEParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from pdp.api import ReasonCode, pdp_pb2
from pep.adapters.mcp.answers import AnswerFilter, _Unavailable
from pep.pdp_client import Verdict
from pep.reading import BodyDecoder

ALLOWED = {"search", "fetch_article"}
NAMES = ["search", "fetch_article", "delete_everything", "admin_reset"]
REFUSALS = (ValueError, RecursionError, _Unavailable)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


async def probe(action: pdp_pb2.Action) -> Verdict:
    allowed = action.target.removeprefix("tool:kb/") in ALLOWED
    return Verdict(allowed, None if allowed else ReasonCode.TOOL_NOT_ALLOWED, "", "d1")


async def chunked(body: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    start = 0
    for cut in [*sorted({c % (len(body) + 1) for c in cuts}), len(body)]:
        yield body[start:cut]
        start = cut


def encode(text: str, charset: str, coding: str) -> tuple[bytes, CIMultiDictProxy[str]]:
    pairs = [("Content-Type", f"text/event-stream; charset={charset}")]
    body = text.encode(charset)
    if coding == "gzip":
        body = gzip.compress(body)
    elif coding == "deflate":
        body = zlib.compress(body)
    if coding != "identity":
        pairs.append(("Content-Encoding", coding))
    return body, CIMultiDictProxy(CIMultiDict(pairs))


async def relay(text_or_bytes: str | bytes, headers: CIMultiDictProxy[str], cuts: list[int]) -> str:
    body = text_or_bytes if isinstance(text_or_bytes, bytes) else text_or_bytes.encode()
    decoder = BodyDecoder.for_response(headers)
    out = [e async for e in AnswerFilter("kb", 1).events(chunked(body, cuts), decoder, probe)]
    return b"".join(out).decode("utf-8")  # what goes out is always UTF-8


def client_reads(relayed: str) -> list[Any]:
    """The events the official SDK's SSE parser finds in what was relayed."""
    parser = _SSEParser()
    return [*parser.decode(relayed), *parser.flush()]


messages = st.one_of(
    st.builds(
        lambda rid, names: {"jsonrpc": "2.0", "id": rid, "result": {"tools": names}},
        st.integers(0, 9),
        st.lists(st.sampled_from(NAMES).map(lambda n: {"name": n, "inputSchema": {}}), max_size=4),
    ),
    st.builds(
        lambda rid, text: {"jsonrpc": "2.0", "id": rid, "result": {"content": text}},
        st.integers(0, 9),
        st.text(max_size=20),
    ),
    st.just(None),  # a priming event: an id, empty data
)


@FUZZ
@given(
    batch=st.lists(messages, max_size=4),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    bom=st.booleans(),
    charset=st.sampled_from(["utf-8", "utf-16le", "utf-16", "utf-32"]),
    coding=st.sampled_from(["identity", "gzip", "deflate"]),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_a_well_formed_stream_is_relayed_exactly_with_lists_filtered(
    batch: list[Any], newline: str, bom: bool, charset: str, coding: str, cuts: list[int]
) -> None:
    events = [
        f"id: ev-{i}{newline}data:{newline}{newline}"
        if message is None
        else f"event: message{newline}data: {json.dumps(message)}{newline}{newline}"
        for i, message in enumerate(batch)
    ]
    body, headers = encode(("\ufeff" if bom else "") + "".join(events), charset, coding)
    seen = client_reads(asyncio.run(relay(body, headers, cuts)))
    assert len(seen) == len(batch)
    for message, event in zip(batch, seen, strict=True):
        if message is None:
            assert event.data == "" and event.id.startswith("ev-")
            continue
        expected = message
        if "tools" in message["result"]:
            kept = [t for t in message["result"]["tools"] if t["name"] in ALLOWED]
            expected = {**message, "result": {"tools": kept}}
        assert json.loads(event.data) == expected


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.sampled_from(
                [
                    "data: ",
                    "event: x",
                    "id: 1",
                    "retry: 5",
                    ": c",
                    "\n",
                    "\r",
                    "\r\n",
                    '{"result":{"tools":[{"name":"delete_everything"}]}}',
                    '{"result":{"tools":[{"name":"search"}]}}',
                    '{"result":{"tools":null}}',
                    '[{"result":{"tools":[]}}]',
                    '{"a":1,"a":2}',
                    "[" * 3000,
                    "\ufeff",
                    "\x00",
                ]
            ),
            max_size=20,
        ).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass")),
    ),
    charset=st.sampled_from(["utf-8", "utf-16le", "latin-1", "nope"]),
    coding=st.sampled_from(["", "gzip", "deflate", "br"]),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_any_stream_is_relayed_filtered_or_refused_never_crashed(
    body: bytes, charset: str, coding: str, cuts: list[int]
) -> None:
    pairs = [("Content-Type", f"text/event-stream; charset={charset}")]
    if coding:
        pairs.append(("Content-Encoding", coding))
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    try:
        relayed = asyncio.run(relay(body, headers, cuts))
    except REFUSALS:
        return  # refused: the caller ends the stream with a JSON-RPC error
    for event in client_reads(relayed):
        assert "delete_everything" not in event.data


@FUZZ
@given(
    text=st.one_of(
        st.text(max_size=60),
        messages.map(json.dumps),
        st.integers(1, 5000).map(lambda depth: '{"result":{"tools":' + "[" * depth),
    ),
    coding=st.sampled_from(["", "gzip"]),
)
def test_a_whole_answer_is_its_own_text_filtered_or_refused(text: str, coding: str) -> None:
    body = text.encode("utf-8", "surrogatepass")
    pairs = [("Content-Type", "application/json")]
    if coding:
        body = gzip.compress(body)
        pairs.append(("Content-Encoding", coding))
    decoder = BodyDecoder.for_response(CIMultiDictProxy(CIMultiDict(pairs)))
    try:
        answer = asyncio.run(AnswerFilter("kb", 1).whole(chunked(body, []), decoder, probe))
    except REFUSALS:
        return
    if answer != text:  # only a tool list is ever rewritten, and then filtered
        listed = json.loads(answer)["result"]["tools"]
        assert {tool["name"] for tool in listed} <= ALLOWED
