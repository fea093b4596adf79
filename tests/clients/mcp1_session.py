"""The official ``mcp`` 1.x client, legacy sessions through the sidecar; prints JSON.

Run by the tests in ``.venv-mcp1`` (mcp 1.x cannot share the suite's venv with mcp 2.x),
so it imports nothing of the project: ``python mcp1_session.py URL@VERSION...``, one
session each, in order, in one process (the imports are most of its time). Every step's
outcome lands in a JSON object per session on stdout (a result, or the JSON-RPC error the
client raised) for the test to assert on; the script itself asserts nothing.

``VERSION``: the revision ``initialize`` asks for. mcp 1.x sends its newest (2025-11-25);
a client built on an older 1.x release asks for 2025-06-18, which is what setting the
module constant does here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable
from typing import Any

import mcp.types
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError
from pydantic import AnyUrl


async def outcome(step: Awaitable[Any]) -> dict[str, Any]:
    """A step's result as JSON, or the JSON-RPC error the client raised for it."""
    try:
        result = await step
    except McpError as exc:
        return {"error": exc.error.model_dump(mode="json", exclude_none=True)}
    return {"result": result.model_dump(mode="json", by_alias=True, exclude_none=True)}


async def session(url: str, version: str) -> dict[str, Any]:
    mcp.types.LATEST_PROTOCOL_VERSION = version
    async with (
        streamable_http_client(url) as (read, write, session_id),
        ClientSession(read, write) as client,
    ):
        init = await client.initialize()
        found: dict[str, Any] = {
            "protocol": init.protocolVersion,
            "session": session_id(),
            "tools": await outcome(client.list_tools()),
            "allowed": await outcome(client.call_tool("search", {"query": "refunds"})),
            "refused": await outcome(client.call_tool("delete_everything", {})),
            "resources": await outcome(client.list_resources()),
            "read": await outcome(client.read_resource(AnyUrl("file:///docs/refunds.md"))),
            "read_refused": await outcome(client.read_resource(AnyUrl("file:///secret/keys.txt"))),
            "prompts": await outcome(client.list_prompts()),
            "prompt": await outcome(client.get_prompt("summarize", {"text": "hi"})),
            "prompt_refused": await outcome(client.get_prompt("jailbreak")),
            "templates": await outcome(client.list_resource_templates()),
        }
        for name, uri in (
            ("subscribe", "file:///docs/refunds.md"),
            ("subscribe_refused", "file:///secret/keys.txt"),
        ):
            found[name] = await outcome(client.subscribe_resource(AnyUrl(uri)))
        found["unsubscribe"] = await outcome(
            client.unsubscribe_resource(AnyUrl("file:///secret/keys.txt"))
        )
        refs: dict[str, mcp.types.PromptReference | mcp.types.ResourceTemplateReference] = {
            "complete": mcp.types.PromptReference(type="ref/prompt", name="summarize"),
            "complete_refused": mcp.types.PromptReference(type="ref/prompt", name="jailbreak"),
            "complete_template": mcp.types.ResourceTemplateReference(
                type="ref/resource", uri="file:///docs/{name}"
            ),
            "complete_template_refused": mcp.types.ResourceTemplateReference(
                type="ref/resource", uri="file:///secret/{name}"
            ),
        }
        for name, ref in refs.items():
            found[name] = await outcome(client.complete(ref, {"name": "name", "value": "re"}))
        found["log_level"] = await outcome(client.set_logging_level("warning"))
        found["ping"] = await outcome(client.send_ping())
        return found


async def sessions(targets: list[str]) -> list[dict[str, Any]]:
    return [await session(*target.rsplit("@", 1)) for target in targets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", metavar="URL@VERSION")
    print(json.dumps(asyncio.run(sessions(parser.parse_args().targets))))


if __name__ == "__main__":
    main()
