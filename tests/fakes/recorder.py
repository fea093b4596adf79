"""What the fake upstreams actually received, for tests to assert on.

The fakes run on background threads (one aiohttp loop, one uvicorn loop per MCP server) while
tests read from the main thread, hence the lock.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request as an upstream saw it.

    Header names are lower-cased so tests need not guess the casing a proxy used. `body` is the
    parsed JSON body, or None when the body was empty or not JSON; `raw_body` is always kept.
    """

    upstream: str
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    raw_body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def json_rpc_method(self) -> str | None:
        """The JSON-RPC method of an MCP POST, e.g. "tools/call"; None for anything else."""
        if isinstance(self.body, dict):
            method = self.body.get("method")
            return method if isinstance(method, str) else None
        return None

    @property
    def tool_name(self) -> str | None:
        """The tool an MCP `tools/call` asked for; None for any other request."""
        if self.json_rpc_method != "tools/call":
            return None
        params = self.body.get("params")
        name = params.get("name") if isinstance(params, dict) else None
        return name if isinstance(name, str) else None


def normalise_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-case names; repeated headers are joined the way RFC 9110 allows folding them."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def parse_json_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None


class Recorder:
    """Thread-safe, append-only log of requests received by the fake upstreams."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []

    def record(
        self,
        *,
        upstream: str,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        headers: Iterable[tuple[str, str]] = (),
        raw_body: bytes = b"",
    ) -> RecordedRequest:
        entry = RecordedRequest(
            upstream=upstream,
            method=method.upper(),
            path=path,
            query=dict(query or {}),
            headers=normalise_headers(headers),
            body=parse_json_body(raw_body),
            raw_body=raw_body,
        )
        with self._lock:
            self._requests.append(entry)
        return entry

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot copy, safe to iterate while the servers keep recording."""
        with self._lock:
            return list(self._requests)

    def find(
        self,
        upstream: str | None = None,
        *,
        method: str | None = None,
        path: str | None = None,
        json_rpc_method: str | None = None,
    ) -> list[RecordedRequest]:
        return [
            r
            for r in self.requests
            if (upstream is None or r.upstream == upstream)
            and (method is None or r.method == method.upper())
            and (path is None or r.path == path)
            and (json_rpc_method is None or r.json_rpc_method == json_rpc_method)
        ]

    def last(
        self,
        upstream: str | None = None,
        *,
        method: str | None = None,
        path: str | None = None,
        json_rpc_method: str | None = None,
    ) -> RecordedRequest:
        """The most recent matching request; AssertionError (a test failure) when there is none."""
        found = self.find(upstream, method=method, path=path, json_rpc_method=json_rpc_method)
        if not found:
            raise AssertionError(
                f"no request recorded for upstream={upstream!r} method={method!r} path={path!r} "
                f"json_rpc_method={json_rpc_method!r}; recorded: "
                f"{[(r.upstream, r.method, r.path) for r in self.requests]}"
            )
        return found[-1]

    def tool_calls(self, upstream: str | None = None) -> list[str]:
        """Names of the MCP tools that reached an upstream, in arrival order."""
        return [
            name
            for r in self.find(upstream, json_rpc_method="tools/call")
            if (name := r.tool_name) is not None
        ]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._requests)
