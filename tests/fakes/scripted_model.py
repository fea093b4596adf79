"""A scripted model for agent-framework tests, speaking the OpenAI Responses and Chat
Completions wire formats (non-streaming).

Each turn it looks at the conversation so far: while the script has tool calls left it
asks for the next one; then it answers with text that quotes every tool output it was
shown, so a test can tell what the model saw. It records the tools each request offered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["ScriptedModel"]

USAGE_RESPONSES = {
    "input_tokens": 1,
    "output_tokens": 1,
    "total_tokens": 2,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens_details": {"reasoning_tokens": 0},
}
USAGE_CHAT = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


@dataclass
class ScriptedModel:
    calls: list[tuple[str, dict[str, Any]]]  # (tool name, arguments), in order
    offered: list[list[str]] = field(default_factory=list)  # tool names, per request

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    def _names(self, tools: list[dict[str, Any]]) -> list[str]:
        return sorted(t.get("name") or t.get("function", {}).get("name", "") for t in tools)

    async def responses(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.offered.append(self._names(body.get("tools", [])))
        items = body["input"] if isinstance(body["input"], list) else []
        outputs = [i["output"] for i in items if i.get("type") == "function_call_output"]
        turn = len(outputs)
        if turn < len(self.calls):
            name, arguments = self.calls[turn]
            item: dict[str, Any] = {
                "type": "function_call",
                "id": f"fc_{turn}",
                "call_id": f"call_{turn}",
                "name": name,
                "arguments": json.dumps(arguments),
                "status": "completed",
            }
        else:
            text = "Tool outputs seen: " + " | ".join(map(str, outputs))
            item = {
                "type": "message",
                "id": "msg_final",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        return web.json_response(
            {
                "id": f"resp_{turn}",
                "object": "response",
                "created_at": 0,
                "model": body.get("model", "scripted"),
                "status": "completed",
                "output": [item],
                "parallel_tool_calls": False,
                "tool_choice": "auto",
                "tools": [],
                "usage": USAGE_RESPONSES,
            }
        )

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.offered.append(self._names(body.get("tools", [])))
        outputs = [m["content"] for m in body["messages"] if m.get("role") == "tool"]
        turn = len(outputs)
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if turn < len(self.calls):
            name, arguments = self.calls[turn]
            message["tool_calls"] = [
                {
                    "id": f"call_{turn}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)},
                }
            ]
            finish = "tool_calls"
        else:
            message["content"] = "Tool outputs seen: " + " | ".join(map(str, outputs))
            finish = "stop"
        return web.json_response(
            {
                "id": f"chatcmpl_{turn}",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "scripted"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": USAGE_CHAT,
            }
        )
