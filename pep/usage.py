"""Token usage read from an upstream model response as it streams by, bytes untouched.

One reader serves OpenAI (chat, responses) and Anthropic, streamed or not: each JSON
object seen (the body, or each SSE event's data) may carry a ``usage`` object, directly
or under ``response`` / ``message``; later values win. A stream's usage counts only once
the stream ended as its protocol ends one (``[DONE]``, ``message_stop``, a final
``response.*`` event): Anthropic's first event already reports the input and one output
token, so a stream cut before its end (the agent hanging up, the upstream failing) would
otherwise settle at almost nothing. An unreadable or unfinished response settles at the
reserved worst case.
"""

from __future__ import annotations

import json
from typing import Any

from pep.sse import SseSplitter, event_data

__all__ = ["UsageReader"]

_INPUT = ("prompt_tokens", "input_tokens")
_OUTPUT = ("completion_tokens", "output_tokens")
# Anthropic counts prompt-cache writes and reads beside input_tokens, not in it (OpenAI's
# cached tokens are part of prompt_tokens already).
_CACHE = ("cache_creation_input_tokens", "cache_read_input_tokens")
# The events a stream ends with, each carrying (or following) its final usage.
_FINAL_EVENTS = frozenset(
    {"message_stop", "response.completed", "response.incomplete", "response.failed"}
)
_LIMIT = 8 * 1024 * 1024


class UsageReader:
    def __init__(self, streaming: bool) -> None:
        self._streaming = streaming
        self._splitter = SseSplitter()
        self._body = bytearray()
        self._seen: dict[str, int] = {}
        self._broken = False
        self._ended = not streaming

    def feed(self, chunk: bytes) -> None:
        if self._broken:
            return
        try:
            if self._streaming:
                for raw in self._splitter.feed(chunk):
                    data = event_data(raw)
                    if data == "[DONE]":
                        self._ended = True
                    elif data:
                        self._see(json.loads(data))
            else:
                self._body += chunk
                if len(self._body) > _LIMIT:
                    self._broken = True
        except (ValueError, UnicodeDecodeError):
            self._broken = True

    def _see(self, document: Any) -> None:
        if not isinstance(document, dict):
            return
        kind = document.get("type")
        if isinstance(kind, str) and kind in _FINAL_EVENTS:
            self._ended = True
        for holder in (document, document.get("response"), document.get("message")):
            usage = holder.get("usage") if isinstance(holder, dict) else None
            if isinstance(usage, dict):
                for key, value in usage.items():
                    if isinstance(value, int) and not isinstance(value, bool):
                        self._seen[key] = value

    @property
    def stream_ended(self) -> bool:
        """A stream whose protocol end was seen: its usage is whole, however its HTTP
        framing ends."""
        return self._streaming and self._ended

    def tokens(self) -> int | None:
        """Total tokens the upstream reported, or None if it reported none readable (or
        its stream did not end)."""
        if not self._streaming and not self._broken and self._body:
            try:
                self._see(json.loads(self._body))
            except (ValueError, UnicodeDecodeError):
                return None
        if self._broken or not self._ended:
            return None
        if "total_tokens" in self._seen:
            return self._seen["total_tokens"]
        parts = [
            next((self._seen[k] for k in keys if k in self._seen), None)
            for keys in (_INPUT, _OUTPUT)
        ]
        if all(part is None for part in parts):
            return None
        return sum(part or 0 for part in parts) + sum(self._seen.get(k, 0) for k in _CACHE)
