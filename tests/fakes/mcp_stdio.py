"""The fake MCP server (the same tools as the HTTP one), over stdio, as a host would start it.

``python -m tests.fakes.mcp_stdio [--record PATH]``: each tool call that reaches it is
appended to PATH (one name a line), so a test can tell what got past the wrapper. It
writes a line to stderr at start, which the wrapper must pass through.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer

from tests.fakes.mcp_server import build_mcp_server


def recording(server: MCPServer[Any], path: Path) -> MCPServer[Any]:
    """Every tool call appended to ``path`` before it runs."""
    manager = server._tool_manager
    original = manager.call_tool

    async def call_tool(name: str, *args: Any, **kwargs: Any) -> Any:
        with path.open("a", encoding="utf-8") as log:
            log.write(name + "\n")
        return await original(name, *args, **kwargs)

    manager.call_tool = call_tool  # type: ignore[method-assign]
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", type=Path)
    args = parser.parse_args()
    server = build_mcp_server("fake-stdio-mcp")
    if args.record:
        server = recording(server, args.record)
    print("fake stdio MCP server up", file=sys.stderr, flush=True)
    server.run("stdio")


if __name__ == "__main__":
    main()
