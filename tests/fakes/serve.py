"""Start every fake upstream on loopback: in tests as a context manager, or as a demo process.

    python -m tests.fakes.serve --openai-port 18001 --anthropic-port 18002 \\
        --http-port 18003 --mcp-port 18004

prints `NAME=url` lines (OPENAI_BASE_URL and ANTHROPIC_BASE_URL are the variables the official
SDKs read) and serves until SIGTERM or SIGINT. With --mcp-port P the JSON-framed MCP server
takes P+1 and the stateless one P+2 unless given their own ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import Self

from aiohttp import web

from tests.fakes.anthropic_api import anthropic_app
from tests.fakes.http_service import http_app
from tests.fakes.mcp_server import HOST, McpFraming, RunningMcpServer, start_mcp_server
from tests.fakes.openai_api import openai_app
from tests.fakes.recorder import Recorder


class AiohttpThread:
    """Several aiohttp apps, each on its own port, sharing one event loop on one thread."""

    def __init__(self, apps: dict[str, tuple[web.Application, int]]) -> None:
        self._apps = apps
        self.ports: dict[str, int] = {}
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self._run, name="fake-upstreams-aiohttp", daemon=True
        )

    def start(self, timeout: float) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop(timeout)
            raise TimeoutError(f"aiohttp fakes did not start within {timeout}s")
        if self._failure is not None:
            raise RuntimeError("aiohttp fakes failed to start") from self._failure

    def stop(self, timeout: float) -> bool:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            # The loop may already be gone if startup failed; nothing is left to stop then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._failure = exc
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            # Wakes start() on failure paths too.
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runners: list[web.AppRunner] = []
        try:
            for name, (app, port) in self._apps.items():
                # shutdown_timeout bounds how long cleanup() waits for in-flight streams.
                runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
                await runner.setup()
                runners.append(runner)
                site = web.TCPSite(runner, HOST, port, reuse_address=True)
                await site.start()
                self.ports[name] = site.port
            self._ready.set()
            await self._stop.wait()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()


class FakeUpstreams:
    """OpenAI, Anthropic, a plain HTTP service and three MCP servers, all on 127.0.0.1.

    Ports default to 0 (any free port). URLs are valid between start() and stop():

    * `openai_url`: base URL including /v1, as `OpenAI(base_url=...)` expects.
    * `anthropic_url`: base URL without /v1, as `Anthropic(base_url=...)` appends /v1/messages.
    * `http_url`: base URL of the plain JSON service.
    * `mcp_sse_url`, `mcp_json_url`, `mcp_stateless_url`: full streamable-HTTP endpoints ending in
      /mcp: stateful SSE framing (SDK default), stateful JSON framing, stateless JSON framing.

    Every request any of them receives lands in `recorder`, tagged with the upstream names
    "openai", "anthropic", "http", "mcp-sse", "mcp-json" and "mcp-json-stateless".
    """

    _MCP_VARIANTS: tuple[tuple[str, McpFraming, bool], ...] = (
        ("sse", "sse", False),
        ("json", "json", False),
        ("stateless", "json", True),
    )

    def __init__(
        self,
        *,
        openai_port: int = 0,
        anthropic_port: int = 0,
        http_port: int = 0,
        mcp_sse_port: int = 0,
        mcp_json_port: int = 0,
        mcp_stateless_port: int = 0,
        recorder: Recorder | None = None,
        openai_api_key: str | None = None,
        anthropic_api_key: str | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.recorder = recorder if recorder is not None else Recorder()
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._aiohttp = AiohttpThread(
            {
                "openai": (openai_app(self.recorder, api_key=openai_api_key), openai_port),
                "anthropic": (
                    anthropic_app(self.recorder, api_key=anthropic_api_key),
                    anthropic_port,
                ),
                "http": (http_app(self.recorder), http_port),
            }
        )
        self._mcp_ports = {
            "sse": mcp_sse_port,
            "json": mcp_json_port,
            "stateless": mcp_stateless_port,
        }
        self._mcp: dict[str, RunningMcpServer] = {}
        self._started = False

    def start(self) -> Self:
        try:
            self._aiohttp.start(self.startup_timeout)
            for name, framing, stateless in self._MCP_VARIANTS:
                self._mcp[name] = start_mcp_server(
                    framing,
                    stateless=stateless,
                    port=self._mcp_ports[name],
                    recorder=self.recorder,
                    startup_timeout=self.startup_timeout,
                )
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def stop(self) -> bool:
        """Stop everything, in parallel, within about `stop_timeout`; True if all threads ended."""
        self._started = False
        for server in self._mcp.values():
            server.server.should_exit = True
        deadline = time.monotonic() + self.stop_timeout
        stopped = self._aiohttp.stop(self.stop_timeout)
        for server in self._mcp.values():
            stopped = server.stop(max(0.1, deadline - time.monotonic())) and stopped
        self._mcp.clear()
        return stopped

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _port(self, name: str) -> int:
        if not self._started:
            raise RuntimeError("FakeUpstreams is not running; use it as a context manager")
        return self._aiohttp.ports[name]

    def _mcp_url(self, name: str) -> str:
        if not self._started:
            raise RuntimeError("FakeUpstreams is not running; use it as a context manager")
        return self._mcp[name].url

    @property
    def openai_url(self) -> str:
        return f"http://{HOST}:{self._port('openai')}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://{HOST}:{self._port('anthropic')}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self._port('http')}"

    @property
    def mcp_sse_url(self) -> str:
        return self._mcp_url("sse")

    @property
    def mcp_json_url(self) -> str:
        return self._mcp_url("json")

    @property
    def mcp_stateless_url(self) -> str:
        return self._mcp_url("stateless")

    def urls(self) -> dict[str, str]:
        """Environment-style names; the first two are what the official SDKs read."""
        return {
            "OPENAI_BASE_URL": self.openai_url,
            "ANTHROPIC_BASE_URL": self.anthropic_url,
            "FAKE_HTTP_URL": self.http_url,
            "FAKE_MCP_SSE_URL": self.mcp_sse_url,
            "FAKE_MCP_JSON_URL": self.mcp_json_url,
            "FAKE_MCP_STATELESS_URL": self.mcp_stateless_url,
        }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.serve",
        description="Fake OpenAI, Anthropic, HTTP and MCP upstreams on 127.0.0.1.",
    )
    parser.add_argument("--openai-port", type=int, default=0)
    parser.add_argument("--anthropic-port", type=int, default=0)
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--mcp-port", type=int, default=0, help="SSE-framed MCP server")
    parser.add_argument("--mcp-json-port", type=int, default=None, help="default: --mcp-port + 1")
    parser.add_argument(
        "--mcp-stateless-port", type=int, default=None, help="default: --mcp-port + 2"
    )
    parser.add_argument("--openai-api-key", default=None, help="require this bearer key")
    parser.add_argument("--anthropic-api-key", default=None, help="require this x-api-key")
    return parser.parse_args(argv)


def _next_port(base: int, offset: int) -> int:
    return base + offset if base else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    upstreams = FakeUpstreams(
        openai_port=args.openai_port,
        anthropic_port=args.anthropic_port,
        http_port=args.http_port,
        mcp_sse_port=args.mcp_port,
        mcp_json_port=(
            args.mcp_json_port if args.mcp_json_port is not None else _next_port(args.mcp_port, 1)
        ),
        mcp_stateless_port=(
            args.mcp_stateless_port
            if args.mcp_stateless_port is not None
            else _next_port(args.mcp_port, 2)
        ),
        openai_api_key=args.openai_api_key,
        anthropic_api_key=args.anthropic_api_key,
    )
    with upstreams:
        for name, url in upstreams.urls().items():
            print(f"{name}={url}", flush=True)
        print("fake upstreams ready; SIGTERM or SIGINT stops them", file=sys.stderr, flush=True)
        # A timed wait keeps the main thread returning to the interpreter, where signal
        # handlers run.
        while not stop.wait(0.5):
            pass
    print("fake upstreams stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
