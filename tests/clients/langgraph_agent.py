"""LangGraph's prebuilt agent with langchain-mcp-adapters, default settings; prints JSON.

Run by the tests in ``.venv-mcp1`` (langchain-mcp-adapters needs mcp 1.x), so it imports
nothing of the project: ``python langgraph_agent.py MCP_URL MODEL_BASE_URL``. The model is
``ChatOpenAI`` (Chat Completions) pointed at a scripted fake; the MCP server is reached
through the sidecar's route. Prints the tools the agent loaded, every tool message of the
run and the final answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from langchain_core.messages import ToolMessage
from langchain_mcp_adapters.client import MultiServerMCPClient
from langchain_openai import ChatOpenAI
from langgraph.prebuilt import create_react_agent


async def run(mcp_url: str, model_url: str) -> dict[str, Any]:
    client = MultiServerMCPClient({"kb": {"url": mcp_url, "transport": "streamable_http"}})
    tools = await client.get_tools()
    model = ChatOpenAI(model="scripted", base_url=model_url, api_key="sk-scripted")
    agent = create_react_agent(model, tools)
    state = await agent.ainvoke({"messages": [("user", "What is the refund policy?")]})
    messages = state["messages"]
    return {
        "tools": sorted(tool.name for tool in tools),
        "tool_messages": [
            {"name": m.name, "status": m.status, "content": m.content}
            for m in messages
            if isinstance(m, ToolMessage)
        ],
        "final": messages[-1].content,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mcp_url")
    parser.add_argument("model_url")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.mcp_url, args.model_url))))


if __name__ == "__main__":
    main()
