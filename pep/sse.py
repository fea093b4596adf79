"""Server-sent events.

- ``SseSplitter``/``event_data``: whole raw events split from bytes, left untouched (usage
  bookkeeping reads model streams by them).
- ``SseParser``/``SseEvent``/``render_event``: the WHATWG event-stream parser over text a
  ``pep.reading.BodyDecoder`` decoded, and its inverse. Where the sidecar must judge what a
  stream says (MCP), it relays only events it parsed, re-rendered from their fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SseEvent", "SseParser", "SseSplitter", "event_data", "render_event"]

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SseSplitter:
    """Feed chunks as they arrive; get back each complete event with its terminator."""

    def __init__(self, limit: int = 8 * 1024 * 1024) -> None:
        self._buffer = b""
        self._limit = limit

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        events: list[bytes] = []
        while match := _BOUNDARY.search(self._buffer):
            events.append(self._buffer[: match.end()])
            self._buffer = self._buffer[match.end() :]
        if len(self._buffer) > self._limit:
            raise ValueError("an SSE event is larger than the limit")
        return events

    def rest(self) -> bytes:
        """Bytes after the last complete event (a stream must not end inside an event)."""
        return self._buffer


_LINE_END = re.compile(r"\r\n|\r|\n")


def event_data(raw: bytes) -> str | None:
    """The event's data (its ``data:`` lines joined), or None if it has none. Lines end
    as the protocol ends them, not ``str.splitlines``'s way: U+2028, U+2029 and U+0085
    stand in JSON strings unescaped, and model text carries them."""
    lines = _LINE_END.split(raw.decode("utf-8"))
    data = [line[5:].removeprefix(" ") for line in lines if line.startswith("data:")]
    return "\n".join(data) if data else None


@dataclass(frozen=True)
class SseEvent:
    """One event's fields as a WHATWG parser takes them; None: the field was not set."""

    data: str | None = None  # the data lines joined with LF
    event: str | None = None
    id: str | None = None
    retry: int | None = None


class SseParser:
    """WHATWG's "interpret an event stream" over decoded text, fed as it arrives.

    Lines end in CRLF, LF or CR; a line that starts with a colon is a comment; a field
    without a colon has an empty value; one space after the colon is dropped; ``id`` with
    NUL and ``retry`` that is not all ASCII digits are ignored; unknown fields are ignored.
    An event ends at an empty line. ``ValueError`` once one event (or line) is over ``limit``
    characters.
    """

    def __init__(self, limit: int = 8 * 1024 * 1024) -> None:
        self._limit = limit
        self._buffer = ""
        self._size = 0
        self._fields: dict[str, str] = {}
        self._data: list[str] = []

    def feed(self, text: str) -> list[SseEvent]:
        waiting = not self._buffer.endswith("\r")
        self._buffer += text
        if waiting and "\n" not in text and "\r" not in text:
            # No line ended: skip rescanning a long line at every chunk.
            if self._size + len(self._buffer) > self._limit:
                raise ValueError("an SSE event is larger than the limit")
            return []
        events: list[SseEvent] = []
        start = 0
        for match in _LINE_END.finditer(self._buffer):
            if match.group() == "\r" and match.end() == len(self._buffer):
                break  # a CR at the end may be the first half of a CRLF: wait for more
            finished = self._line(self._buffer[start : match.start()])
            if finished is not None:
                events.append(finished)
            start = match.end()
        self._buffer = self._buffer[start:]
        if self._size + len(self._buffer) > self._limit:
            raise ValueError("an SSE event is larger than the limit")
        return events

    def finish(self) -> list[SseEvent]:
        """At the end of the stream: the events a last CR completes. ``ValueError`` if the
        stream stopped inside an event (which no client dispatches)."""
        events: list[SseEvent] = []
        if self._buffer.endswith("\r"):
            finished = self._line(self._buffer[:-1])
            self._buffer = ""
            if finished is not None:
                events.append(finished)
        if self._buffer or self._fields or self._data:
            raise ValueError("the stream ended inside an event")
        return events

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        self._size += len(line)
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif (
            name == "event"
            or (name == "id" and "\0" not in value)
            or (name == "retry" and value.isascii() and value.isdigit())
        ):
            self._fields[name] = value
        return None

    def _dispatch(self) -> SseEvent | None:
        fields, data = self._fields, self._data
        self._fields, self._data, self._size = {}, [], 0
        if not fields and not data:
            return None
        retry = fields.get("retry")
        return SseEvent(
            data="\n".join(data) if data else None,
            event=fields.get("event"),
            id=fields.get("id"),
            retry=int(retry) if retry is not None else None,
        )


def render_event(event: SseEvent) -> str:
    """The event as SSE text that any parser reads back as exactly these fields."""
    lines = [] if event.id is None else [f"id: {event.id}"]
    if event.event is not None:
        lines.append(f"event: {event.event}")
    if event.retry is not None:
        lines.append(f"retry: {event.retry}")
    if event.data is not None:
        lines += [f"data: {line}" for line in event.data.split("\n")]
    return "\n".join(lines) + "\n\n"
