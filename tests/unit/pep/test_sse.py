"""pep/sse.py: the WHATWG event-stream parser and its inverse, checked against httpx2's
SSE parser (what the official MCP SDK client reads with)."""

from __future__ import annotations

import pytest
from httpx2._sse import _SSEParser

from pep.sse import SseEvent, SseParser, render_event


def parse(text: str, chunk: int = 1) -> list[SseEvent]:
    parser = SseParser()
    events = [e for i in range(0, len(text), chunk) for e in parser.feed(text[i : i + chunk])]
    return events + parser.finish()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data: x\n\n", [SseEvent(data="x")]),
        ("data:x\r\n\r\n", [SseEvent(data="x")]),
        ("data: a\rdata: b\r\r", [SseEvent(data="a\nb")]),
        ("data\n\n", [SseEvent(data="")]),
        ("data:  x\n\n", [SseEvent(data=" x")]),
        (": comment\n\n", []),
        ("id: 1\nretry: 10\n\n", [SseEvent(id="1", retry=10)]),
        ("retry: 1x\nretry: +5\nretry: \u0661\ndata: y\n\n", [SseEvent(data="y")]),
        ("id: a\0b\ndata: y\n\n", [SseEvent(data="y")]),
        ("event: tools\nbogus: 1\ndata: y\n\n", [SseEvent(data="y", event="tools")]),
        ("data: y\n\n\n\ndata: z\n\n", [SseEvent(data="y"), SseEvent(data="z")]),
    ],
    ids=[
        "plain",
        "crlf-no-space",
        "cr-only-multi-line",
        "field-without-colon",
        "one-space-dropped",
        "comment-only",
        "id-and-retry-only",
        "retry-not-ascii-digits",
        "id-with-nul",
        "other-event-unknown-field",
        "blank-lines-between",
    ],
)
@pytest.mark.parametrize("chunk", [1, 2, 1000])
def test_events_parsed_as_whatwg_says(text: str, expected: list[SseEvent], chunk: int) -> None:
    assert parse(text, chunk) == expected


@pytest.mark.parametrize("text", ["data: x", "data: x\n", "id: 1\n", ": c"])
def test_a_stream_ending_inside_an_event_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse(text)


def test_an_event_over_the_limit_is_refused() -> None:
    parser = SseParser(limit=100)
    with pytest.raises(ValueError):
        for _ in range(20):
            parser.feed("data: " + "x" * 10 + "\n")


@pytest.mark.parametrize(
    "event",
    [
        SseEvent(data='{"a": 1}'),
        SseEvent(data="a\n\nb", event="message", id=" padded", retry=3),
        SseEvent(data="", id=""),
        SseEvent(id="ev-1", retry=10),
    ],
    ids=["data", "all-fields-multi-line", "empty-data-and-id", "no-data"],
)
def test_render_reads_back_as_the_same_fields(event: SseEvent) -> None:
    assert parse(render_event(event)) == [event]
    (seen,) = list(_SSEParser().decode(render_event(event)))
    assert (seen.data, seen.id, seen.retry) == (event.data or "", event.id or "", event.retry)
