"""The learning road, walked end to end (issue 22): a shadow grant that is too narrow, real
traffic through the real sidecar with the official openai and mcp SDKs and raw HTTP, then
`abcctl suggest --enforce`, a what-if of the suggestion on the same log, the enforced grant
on the same traffic, and `abcctl audit verify`. Upstreams are the local fakes.

And: the same calls with the same usage give the same suggestion whether their usage was
settled at once or late (sent to a real PDP over gRPC, settled in two orders).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import yaml
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.fakes.serve import FakeUpstreams
from tests.harness import (
    POLICIES,
    PdpProcess,
    Signer,
    abcctl,
    audit_verify,
    log_records,
    start_pdp,
    start_pep,
)

LINEAGE = "acme/road"
BIG = 800  # gpt-4o's max_tokens: a cap counted twice would not fit the suggested tokens

# Too narrow on purpose: one model, one tool, no HTTP, two tool calls and four requests.
NARROW = f"""\
apiVersion: abc/v1
kind: RunIntent
tenant: acme
agent: road-bot
lineage: {LINEAGE}
version: 1
goal: Answer a billing question.
enforcement: shadow
lifetime: 8h
models:
  - {{provider: openai, model: gpt-4o-mini, max_tokens_per_call: 64}}
tools:
  - server: kb
    name: search
    args:
      query: {{type: string, required: true, maxLength: 200}}
http: []
budgets:
  tokens: 100000
  usd_micros: 5000000
  tool_calls: 2
  requests: 4
steps:
  - id: research
    uses: [model:openai/gpt-4o-mini, tool:kb/search]
  - id: answer
    uses: [model:openai/gpt-4o-mini]
    after: [research]
"""

# What the traffic below needs beyond NARROW, and the decisions each refusal is logged as.
REFUSED_THEN = {
    ("model_not_allowed", "model:openai/gpt-4o"): 2,
    ("tool_not_allowed", "tool:kb/fetch_article"): 3,
    ("http_not_allowed", "http:billing.internal"): 2,
    ("step_out_of_order", "tool:kb/search"): 2,
}
CALLS = 13  # 5 model calls, 6 tool calls, 2 HTTP requests (tools/list and steps apart)


@dataclass
class Traffic:
    """What the agent saw: per call, "ok" or the refusal's reason code."""

    outcomes: list[str] = field(default_factory=list)


def _drive(pep_url: str, traffic: Traffic, outside: bool = False) -> None:
    """The agent's work: research (models, tools, HTTP), then the answer step. With
    ``outside``, one last call the suggestion never saw (a tool it never asked for)."""
    client = openai.OpenAI(base_url=f"{pep_url}/openai/v1", api_key="k", max_retries=0)

    def chat(model: str, max_tokens: int, step: str | None = None) -> None:
        headers = {"x-abc-step": step} if step else None
        try:
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "what is invoice 42?"}],
                max_tokens=max_tokens,
                extra_headers=headers,
            )
            traffic.outcomes.append("ok")
        except openai.PermissionDeniedError as exc:
            traffic.outcomes.append(str(exc.code))

    async def tools(calls: list[tuple[str, dict[str, Any]]]) -> None:
        url = f"{pep_url}/mcp/kb"
        async with (
            streamable_http_client(url) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            await session.list_tools()
            for name, args in calls:
                # A refused call answers as a tool result with isError, its reason in _meta.
                result = await session.call_tool(name, args)
                if result.is_error:
                    traffic.outcomes.append(str((result.meta or {}).get("abc/reason", "error")))
                else:
                    traffic.outcomes.append("ok")

    def get(path: str) -> None:
        reply = httpx.get(f"{pep_url}/http/billing.internal{path}", timeout=10)
        traffic.outcomes.append("ok" if reply.status_code == 200 else reply.json()["reason"])

    chat("gpt-4o-mini", 16)
    asyncio.run(
        tools(
            [
                ("search", {"query": "refunds"}),
                ("fetch_article", {"article_id": "KB-1"}),
                ("fetch_article", {"article_id": "KB-22"}),
                ("fetch_article", {"article_id": "KB-333"}),
            ]
        )
    )
    get("/v1/invoices/42")
    get("/v1/invoices/7")
    chat("gpt-4o-mini", 16)
    chat("gpt-4o", BIG)
    chat("gpt-4o", BIG)
    chat("gpt-4o-mini", 16, step="answer")
    outside_call = [("delete_everything", {})] if outside else []
    asyncio.run(tools([("search", {"query": "late fee"})] * 2 + outside_call))


@dataclass
class Road:
    dir: Path
    signer: Signer
    shadow_key: Path
    state: Path
    narrow: Path  # the shadow envelope
    traffic: Traffic
    forwarded: dict[str, int]  # what reached the fakes, by kind

    @property
    def log(self) -> Path:
        return self.state / "decisions.log"

    @property
    def pub(self) -> Path:
        return self.state / "pdp-log.pub"

    def records(self) -> list[dict[str, Any]]:
        return log_records(self.log)


def _shadow_signer(directory: Path) -> tuple[Signer, Path]:
    signer = Signer(directory)
    abcctl("keygen", "--out", directory / "keys", "--name", "shadow")
    abcctl(
        "trust", "add", "--store", signer.trust, "--pub", directory / "keys" / "shadow.pub",
        "--tenant", "acme", "--mode", "enforce", "--mode", "shadow",
    )  # fmt: skip
    return signer, directory / "keys" / "shadow.key"


def _freeze(signer: Signer, key: Path, intent: Path, name: str) -> Path:
    envelope = intent.with_name(f"{name}.json")
    abcctl("freeze", intent, "--key", key, "--policies", POLICIES, "-o", envelope)
    return envelope


def _walk(pdp: PdpProcess, fakes: FakeUpstreams, envelope: Path, logs: Path, **kw: Any) -> Traffic:
    upstreams = {
        "openai": fakes.openai_url.removesuffix("/v1"),
        "mcp:kb": fakes.mcp_sse_url,
        "http:billing.internal": fakes.http_url,
    }
    pep = start_pep(pdp.address, upstreams, logs, "--manifest", str(envelope))
    traffic = Traffic()
    try:
        _drive(pep.url, traffic, **kw)
    finally:
        pep.stop()
    return traffic


@pytest.fixture(scope="module")
def road(tmp_path_factory: pytest.TempPathFactory) -> Road:
    directory = tmp_path_factory.mktemp("road")
    signer, shadow_key = _shadow_signer(directory)
    (directory / "narrow.yaml").write_text(NARROW)
    narrow = _freeze(signer, shadow_key, directory / "narrow.yaml", "narrow")
    state = directory / "state"
    pdp = start_pdp(signer, state)
    try:
        with FakeUpstreams() as fakes:
            traffic = _walk(pdp, fakes, narrow, directory)
            forwarded = {
                "models": len(fakes.recorder.find("openai")),
                "fetch_article": fakes.recorder.tool_calls("mcp-sse").count("fetch_article"),
                "http": len(fakes.recorder.find("http")),
            }
    finally:
        assert pdp.stop() == 0
    return Road(directory, signer, shadow_key, state, narrow, traffic, forwarded)


def test_shadow_forwards_everything_and_logs_what_it_would_refuse(road: Road) -> None:
    assert road.traffic.outcomes == ["ok"] * CALLS
    assert road.forwarded == {"models": 5, "fetch_article": 3, "http": 2}
    refused: dict[tuple[str, str], int] = {}
    for record in road.records():
        if record["kind"] != "decision" or record["input"]["action"].get("probe"):
            continue
        assert record.get("enforced") is False  # a shadow run: logged, never refused
        answer = record["policy_result"]
        if not answer["allow"]:
            key = (answer["reasons"][0]["code"], record["input"]["action"]["target"])
            refused[key] = refused.get(key, 0) + 1
    assert refused == REFUSED_THEN
    assert audit_verify(road.state).returncode == 0


@dataclass
class Suggested:
    path: Path
    out: str
    text: str
    intent: dict[str, Any]


@pytest.fixture(scope="module")
def suggested(road: Road) -> Suggested:
    path = road.dir / "next.yaml"
    done = abcctl(
        "suggest", road.log, "--pub", road.pub, "--manifest", road.narrow, "-o", path,
        "--enforce",
    )  # fmt: skip
    text = path.read_text()
    return Suggested(path, done.stdout, text, yaml.safe_load(text))


def test_suggest_proposes_only_what_was_used(road: Road, suggested: Suggested) -> None:
    intent = suggested.intent
    assert intent["version"] == 2 and intent["enforcement"] == "enforce"
    assert intent["models"] == [
        {"provider": "openai", "model": "gpt-4o-mini", "max_tokens_per_call": 64},
        {"provider": "openai", "model": "gpt-4o", "max_tokens_per_call": BIG},
    ]
    assert intent["tools"] == [
        {"server": "kb", "name": "search", "args": NARROW_SEARCH_ARGS},
        {
            "server": "kb",
            "name": "fetch_article",
            # three distinct ids: no enum, bounded by length
            "args": {
                "article_id": {"type": "string", "required": True, "minLength": 1, "maxLength": 6}
            },
        },
    ]
    assert intent["http"] == [
        {"host": "billing.internal", "methods": ["GET"], "path_prefix": "/v1/invoices/"}
    ]
    steps = {s["id"]: set(s["uses"]) for s in intent["steps"]}
    assert steps == {
        "research": {
            "model:openai/gpt-4o-mini",
            "tool:kb/search",
            "model:openai/gpt-4o",
            "tool:kb/fetch_article",
            "http:billing.internal",
        },
        "answer": {"model:openai/gpt-4o-mini", "tool:kb/search"},
    }
    # Budgets from the calls the next version allows: 6 tool calls and 13 requests, x 1.5.
    assert intent["budgets"]["tool_calls"] == 9 and intent["budgets"]["requests"] == 20
    text, out = suggested.text, suggested.out
    assert "article_id: at most 6 characters (3 values seen, 3 distinct)" in text
    assert f"{CALLS} calls (model, tool and HTTP; not counted:" in out
    assert "enforcement: shadow -> enforce" in out
    assert "went past a budget in shadow (forwarded, not refused)" in out
    assert "lower bound" not in out  # nothing was refused for budget
    lines = text.splitlines()
    tokens_note = lines[lines.index(f"  tokens: {intent['budgets']['tokens']}") - 1]
    assert "settled usage of" in tokens_note and "never settled" not in tokens_note


NARROW_SEARCH_ARGS = {"query": {"type": "string", "required": True, "maxLength": 200}}


def test_a_what_if_of_the_suggestion_fits_and_flips_exactly_the_refusals(
    road: Road, suggested: Suggested
) -> None:
    envelope = _freeze(road.signer, road.shadow_key, suggested.path, "next")
    done = abcctl(
        "replay", road.log, "--pub", road.pub, "--manifest", envelope, "--policies", POLICIES,
        "--trust", road.signer.trust, "--json",
    )  # fmt: skip
    report = json.loads(done.stdout)
    calls = {
        (c["reason"], c["target"]): c["count"]
        for c in report["changes"]
        if c["direction"] == "deny_to_allow" and not c["probe"]
    }
    assert calls == REFUSED_THEN
    # tools/list, once per MCP session: in research fetch_article is listed now, in answer
    # search is (fetch_article stays a research tool, still refused there: unchanged).
    probes = {
        (c["direction"], c["reason"], c["target"], c["count"])
        for c in report["changes"]
        if c["probe"]
    }
    assert probes == {
        ("deny_to_allow", "tool_not_allowed", "tool:kb/fetch_article", 1),
        ("deny_to_allow", "step_out_of_order", "tool:kb/search", 1),
    }
    decided = [r["input"]["action"] for r in road.records() if r["kind"] == "decision"]
    assert report["probes"] == sum(1 for a in decided if a.get("probe")) > 0
    assert not [c for c in report["changes"] if c["direction"] == "allow_to_deny"]
    assert report["calls"] == CALLS and report["steps"] == 1
    assert report["decisions"] == report["calls"] + report["probes"] + report["steps"]
    (budget,) = report["budgets"]
    assert budget["fits"] is True and budget["refused"] == 0, budget
    assert budget["used"]["tool_calls"] == 6 and budget["used"]["requests"] == CALLS


def test_the_enforced_grant_passes_the_same_traffic_and_refuses_one_call_outside(
    road: Road, suggested: Suggested, tmp_path: Path
) -> None:
    envelope = _freeze(road.signer, road.signer.key, suggested.path, "enforced")
    state = tmp_path / "state"
    pdp = start_pdp(road.signer, state)
    try:
        with FakeUpstreams() as fakes:
            traffic = _walk(pdp, fakes, envelope, tmp_path, outside=True)
            deleted = fakes.recorder.tool_calls("mcp-sse").count("delete_everything")
    finally:
        assert pdp.stop() == 0
    assert traffic.outcomes == ["ok"] * CALLS + ["tool_not_allowed"]
    assert deleted == 0
    records = log_records(state / "decisions.log")
    assert all(r.get("enforced", True) for r in records if r["kind"] == "decision")
    assert audit_verify(state).returncode == 0


# ---- the same log, settled at once or late --------------------------------------------------


def _settled(directory: Path, signer: Signer, envelope: bytes, late: bool) -> Path:
    """Model and tool calls through a real PDP; usage reported after each call, or all at
    the end. Returns the state directory."""
    state = directory / ("late" if late else "at-once")
    pdp = start_pdp(signer, state)
    try:
        client = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())
        run_id = client.RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=envelope)).run_id
        pending: list[tuple[str, int]] = []
        plan = [("gpt-4o-mini", 60, 25), ("gpt-4o", 500, 40), ("gpt-4o-mini", 60, 30)] * 2
        for n, (model, max_tokens, used) in enumerate(plan):
            reply = client.Decide(
                pdp_pb2.DecideRequest(
                    run_id=run_id,
                    request_id=f"m-{n}",
                    action=pdp_pb2.Action(
                        kind="model",
                        target=f"model:openai/{model}",
                        max_tokens=max_tokens,
                        input_bytes=120,
                    ),
                )
            )
            pending.append((reply.reservation_id, used))
            if not late:
                client.ReportUsage(
                    pdp_pb2.ReportUsageRequest(reservation_id=pending.pop()[0], tokens=used)
                )
        for reservation_id, used in pending:
            client.ReportUsage(
                pdp_pb2.ReportUsageRequest(reservation_id=reservation_id, tokens=used)
            )
    finally:
        assert pdp.stop() == 0
    return state


def test_the_same_log_gives_the_same_suggestion_whatever_the_settlement_timing(
    tmp_path: Path,
) -> None:
    signer, shadow_key = _shadow_signer(tmp_path)
    (tmp_path / "narrow.yaml").write_text(NARROW)
    envelope = _freeze(signer, shadow_key, tmp_path / "narrow.yaml", "narrow")
    suggestions = []
    for late in (False, True):
        state = _settled(tmp_path, signer, envelope.read_bytes().strip(), late)
        out = state / "next.yaml"
        abcctl(
            "suggest", state / "decisions.log", "--pub", state / "pdp-log.pub",
            "--manifest", envelope, "-o", out,
        )  # fmt: skip
        text = out.read_text()
        notes = [
            line for line in text.splitlines() if line.lstrip().startswith("# ") and "p95" in line
        ]
        suggestions.append((yaml.safe_load(text), notes))
    (at_once, at_once_notes), (late_intent, late_notes) = suggestions
    assert at_once == late_intent and at_once_notes == late_notes
    # Settled usage, with the call before still held: the most needed at once is at the last
    # call, 25 + 40 + 30 + 25 used before the second gpt-4o + its reservation (500 + 120
    # bytes) + the last gpt-4o-mini's (60 + 120) = 920; x 1.5 = 1380, rounded up to two
    # significant digits. (Had the late run's reservations been summed as held, as they
    # were before the fix: 4 x 180 + 2 x 620 = 1960.)
    assert at_once["budgets"]["tokens"] == 1400
