"""No interleaving overspends: 200 concurrent calls (half streaming) race for a budget of 50,
through one PDP with its embedded store, or through two PDP replicas sharing a real Redis
(each with its own sidecar, the calls alternating between them)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.fakes.serve import FakeUpstreams
from tests.harness import INTENT, POLICIES, RedisProcess, Signer, start_pdp, start_pep

CALLS, AFFORDABLE = 200, 50


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_two_hundred_calls_race_for_fifty(
    signer: Signer, tmp_path: Path, redis_server: RedisProcess, store: str
) -> None:
    text = INTENT.read_text().replace("lineage: acme/support-bot", f"lineage: acme/race-{store}")
    text = text.replace("requests: 500", f"requests: {AFFORDABLE}")
    envelope = tmp_path / "envelope.json"
    envelope.write_bytes(signer.freeze(text, "race"))
    replicas = 1 if store == "memory" else 2
    store_url = "memory" if store == "memory" else redis_server.url
    pdps = [
        start_pdp(signer, tmp_path / f"state-{i}", POLICIES, "--store", store_url)
        for i in range(replicas)
    ]
    with FakeUpstreams() as fakes:
        peps = [
            start_pep(
                pdp.address,
                {"openai": fakes.openai_url.removesuffix("/v1")},
                tmp_path,
                "--manifest",
                str(envelope),
                "--log-level",
                "WARNING",
                # The race is about the ledger, not latency: no call may fail for a slow answer.
                "--pdp-deadline-ms",
                "10000",
            )
            for pdp in pdps
        ]
        try:
            clients = [
                openai.AsyncOpenAI(
                    base_url=f"{pep.url}/openai/v1", api_key="k", max_retries=0, timeout=30
                )
                for pep in peps
            ]

            async def call(i: int) -> int | None:
                """Tokens the upstream reported for an allowed call, None for a refusal."""
                messages = [{"role": "user", "content": f"race {i}"}]
                client = clients[i // 2 % len(clients)]  # streaming and not on every replica
                try:
                    if i % 2:
                        stream = await client.chat.completions.create(
                            model="gpt-4o-mini",
                            messages=messages,
                            max_tokens=64,
                            stream=True,  # type: ignore[arg-type]
                            stream_options={"include_usage": True},
                        )
                        usage = None
                        async for chunk in stream:
                            usage = chunk.usage or usage
                        return usage.total_tokens if usage else 0
                    reply = await client.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=messages,
                        max_tokens=64,  # type: ignore[arg-type]
                    )
                    return reply.usage.total_tokens if reply.usage else 0
                except openai.PermissionDeniedError as exc:
                    assert exc.code == "budget_exhausted"
                    return None

            async def race() -> list[int | None]:
                return await asyncio.gather(*(call(i) for i in range(CALLS)))

            outcomes = asyncio.run(race())
            allowed = [tokens for tokens in outcomes if tokens is not None]
            assert len(allowed) == AFFORDABLE
            assert len(fakes.recorder.find("openai")) == AFFORDABLE  # no refused call was forwarded

            stub = pdp_pb2_grpc.DecisionServiceStub(pdps[-1].channel())
            run_id = stub.RegisterManifest(
                pdp_pb2.RegisterManifestRequest(envelope=envelope.read_bytes().rstrip(b"\n"))
            ).run_id
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                run = stub.GetRun(pdp_pb2.GetRunRequest(run_id=run_id))
                if run.spent.tokens == sum(allowed):
                    break
                time.sleep(0.05)
            # The books balance: every call settled with what the upstream reported.
            assert run.spent.requests == AFFORDABLE and run.remaining.requests == 0
            assert run.spent.tokens == sum(allowed)
            assert run.spent.tokens + run.remaining.tokens == 200000
        finally:
            for process in [*peps, *pdps]:
                process.stop()
