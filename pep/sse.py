"""Server-sent events, split incrementally into whole raw events (bytes untouched)."""

from __future__ import annotations

import re

__all__ = ["SseSplitter", "event_data"]

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


def event_data(raw: bytes) -> str | None:
    """The event's data (its ``data:`` lines joined), or None if it has none."""
    lines = raw.decode("utf-8").splitlines()
    data = [line[5:].removeprefix(" ") for line in lines if line.startswith("data:")]
    return "\n".join(data) if data else None
