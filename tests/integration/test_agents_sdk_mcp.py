"""The OpenAI Agents SDK, with its default settings, through the sidecar's MCP route.

A real agent framework (``openai-agents``, a test-only dependency) → real abc-pep → real
abc-pdp → the SDK-built MCP server; the model is scripted (``tests/fakes/scripted_model``,
Responses and Chat Completions wire formats). The agent sees only the granted tools; a
refused call comes back to the model as the tool's output, with the reason and decision
id, and the run goes on; the refused call never reaches the MCP server.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from agents import Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner
from agents.mcp import MCPServerStreamableHttp
from openai import AsyncOpenAI

from tests.fakes.scripted_model import ScriptedModel
from tests.fakes.serve import AiohttpThread, FakeUpstreams
from tests.harness import PdpProcess, PepProcess, free_port, start_pep
from tests.integration.test_pep import upstream_map

TOO_LONG = {"query": "x" * 201}  # the manifest caps query at 200 characters


@pytest.fixture(scope="module")
def pep(
    pdp: PdpProcess,
    fakes: FakeUpstreams,
    demo_envelope: bytes,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PepProcess]:
    path = Path(tmp_path_factory.mktemp("agents")) / "envelope.json"
    path.write_bytes(demo_envelope)
    process = start_pep(pdp.address, upstream_map(fakes), path.parent, "--manifest", str(path))
    yield process
    process.stop()


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_the_agent_sees_granted_tools_and_recovers_from_a_refused_call(
    pep: PepProcess, fakes: FakeUpstreams, api: str
) -> None:
    model = ScriptedModel([("search", TOO_LONG), ("search", {"query": "refunds"})])
    port = free_port()
    thread = AiohttpThread({"model": (model.app(), port)})
    thread.start(10)
    before = fakes.recorder.tool_calls("mcp-sse")
    try:

        async def run() -> str:
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-scripted")
            chosen = (
                OpenAIResponsesModel("scripted", client)
                if api == "responses"
                else OpenAIChatCompletionsModel("scripted", client)
            )
            async with MCPServerStreamableHttp({"url": f"{pep.url}/mcp/kb"}) as server:
                agent = Agent(name="support", model=chosen, mcp_servers=[server])
                result = await Runner.run(agent, "What is the refund policy?")
                return str(result.final_output)

        final = asyncio.run(run())
    finally:
        thread.stop(5)
    assert model.offered[0] == ["fetch_article", "search"]  # delete_everything is hidden
    # The model read the refusal (reason and decision id) and the run went on to succeed.
    assert "tool_args_invalid" in final and re.search(r"decision dec_[0-9a-f]{32}", final)
    assert "results for 'refunds'" in final
    reached = fakes.recorder.tool_calls("mcp-sse")[len(before) :]
    assert reached == ["search"]  # only the allowed call reached the server
