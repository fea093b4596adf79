"""Learning outside execution: `abcctl suggest` and the what-if `abcctl replay`, on logs made
by real runs through a real PDP (gRPC on loopback), frozen and signed by abcctl."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.harness import INTENT, POLICIES, Signer, abcctl, start_pdp

LINEAGE = "acme/learn"


@dataclass
class Learned:
    """A stopped PDP's state after two runs of one lineage, and the envelopes of both."""

    dir: Path
    signer: Signer
    state: Path
    v1: Path
    v2: Path

    @property
    def log(self) -> Path:
        return self.state / "decisions.log"

    @property
    def pub(self) -> Path:
        return self.state / "pdp-log.pub"

    def records(self, log: Path | None = None) -> list[dict[str, Any]]:
        path = log or self.log
        return [json.loads(line) for line in path.read_text().splitlines()]

    def decision(self, decision_id: str) -> dict[str, Any]:
        return next(r for r in self.records() if r.get("decision_id") == decision_id)


class Agent:
    """Sends one run's actions to the PDP as a sidecar would, keeping the answers."""

    def __init__(self, stub: pdp_pb2_grpc.DecisionServiceStub, run_id: str, tag: str) -> None:
        self.stub, self.run_id, self.tag, self.n = stub, run_id, tag, 0

    def act(self, **action: Any) -> pdp_pb2.DecideResponse:
        self.n += 1
        return self.stub.Decide(
            pdp_pb2.DecideRequest(
                run_id=self.run_id,
                request_id=f"{self.tag}-{self.n}",
                action=pdp_pb2.Action(**action),
            )
        )

    def tool(self, name: str, args: dict[str, Any]) -> pdp_pb2.DecideResponse:
        return self.act(kind="tool", target=f"tool:kb/{name}", args_json=json.dumps(args).encode())

    def model(self, model: str, max_tokens: int, used: int = 0, usd: int = 0) -> None:
        reply = self.act(kind="model", target=model, max_tokens=max_tokens, input_bytes=40)
        if reply.allow:
            self.stub.ReportUsage(
                pdp_pb2.ReportUsageRequest(
                    reservation_id=reply.reservation_id, tokens=used, usd_micros=usd
                )
            )

    def http(self, host: str, path: str) -> pdp_pb2.DecideResponse:
        return self.act(kind="http", target=f"http:{host}", method="GET", path=path)

    def step(self, step: str) -> pdp_pb2.DecideResponse:
        return self.act(kind="step", target=f"step:{step}")


def _run_one(agent: Agent) -> None:
    """Run 1: allowed calls, recurring refusals, a one-off, a step change, calls out of step."""
    for name in ("search", "fetch_article", "export", "delete_all"):
        agent.act(kind="tool", target=f"tool:kb/{name}", probe=True)  # tools/list
    agent.model("model:openai/gpt-4o-mini", 100, used=120, usd=300)
    assert agent.tool("search", {"query": "refund"}).allow
    assert agent.tool("search", {"query": "invoice 42", "top_k": 3}).allow
    assert not agent.tool("search", {"query": "x" * 300}).allow  # tool_args_invalid
    assert not agent.tool("export", {"format": "csv", "limit": 10}).allow
    assert not agent.tool("export", {"format": "pdf", "limit": 5}).allow
    assert not agent.tool("delete_all", {}).allow  # refused once only: does not recur
    assert agent.http("billing.internal", "/v1/invoices/42").allow
    assert not agent.http("crm.internal", "/v2/customers/7").allow
    assert not agent.http("crm.internal", "/v2/customers/9").allow
    agent.model("model:openai/gpt-5", 500)
    agent.model("model:openai/gpt-5", 300)
    assert agent.step("answer").allow
    for _ in range(2):
        reply = agent.tool("search", {"query": "refund"})
        assert [r.code for r in reply.reasons] == ["step_out_of_order"]
    agent.model("model:openai/gpt-4o-mini", 200, used=250, usd=500)
    assert agent.step("@completed").allow


def _run_two(agent: Agent) -> None:
    """Run 2 (the next version, same content): smaller, and the same habits."""
    assert not agent.step("review").allow  # not in the Assembly: listed, never learned
    assert agent.tool("search", {"query": "late fee"}).allow
    assert not agent.tool("export", {"format": "csv"}).allow
    agent.model("model:openai/gpt-4o-mini", 50, used=60, usd=100)
    assert agent.step("answer").allow
    assert not agent.tool("search", {"query": "late fee"}).allow
    assert agent.step("@completed").allow


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> Learned:
    directory = tmp_path_factory.mktemp("learn")
    signer = Signer(directory)
    state = directory / "state"
    text = INTENT.read_text().replace("acme/support-bot", LINEAGE)
    pdp = start_pdp(signer, state)
    try:
        stub = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())
        for version, drive in ((1, _run_one), (2, _run_two)):
            envelope = signer.freeze(
                text.replace("version: 1", f"version: {version}"), f"v{version}"
            )
            run_id = stub.RegisterManifest(
                pdp_pb2.RegisterManifestRequest(envelope=envelope)
            ).run_id
            drive(Agent(stub, run_id, f"v{version}"))
    finally:
        assert pdp.stop() == 0
    return Learned(directory, signer, state, directory / "v1.json", directory / "v2.json")


@dataclass
class Suggested:
    out: str
    path: Path
    intent: dict[str, Any]
    text: str


def suggest(learned: Learned, out: Path, *extra: object) -> Suggested:
    done = abcctl(
        "suggest", learned.log, "--pub", learned.pub, "--manifest", learned.v2, "-o", out, *extra,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    return Suggested(done.stdout, out, yaml.safe_load(text), text)


@pytest.fixture(scope="module")
def suggested(learned: Learned) -> Iterator[Suggested]:
    yield suggest(learned, learned.dir / "next-intent.yaml")


def _targets(intent: dict[str, Any]) -> set[str]:
    return {
        *(f"model:{m['provider']}/{m['model']}" for m in intent["models"]),
        *(f"tool:{t['server']}/{t['name']}" for t in intent["tools"]),
        *(f"http:{h['host']}" for h in intent["http"]),
    }


def _step(intent: dict[str, Any], step: str) -> dict[str, Any]:
    return next(s for s in intent["steps"] if s["id"] == step)


def test_suggest_adds_what_recurred_and_removes_what_was_never_called(
    learned: Learned, suggested: Suggested
) -> None:
    intent = suggested.intent
    assert intent["version"] == 3  # above every version of the lineage in the log
    assert intent["lineage"] == LINEAGE
    targets = _targets(intent)
    # Recurred (>= 2 refusals of one target and reason in one step): declared and placed.
    assert {"tool:kb/export", "model:openai/gpt-5", "http:crm.internal"} <= targets
    assert {"tool:kb/export", "model:openai/gpt-5", "http:crm.internal"} <= set(
        _step(intent, "research")["uses"]
    )
    assert "tool:kb/search" in _step(intent, "answer")["uses"]  # step_out_of_order, 3 times
    # Refused once, or refused for its arguments: never proposed.
    assert "tool:kb/delete_all" not in targets
    search = next(t for t in intent["tools"] if t["name"] == "search")
    assert search["args"]["query"]["maxLength"] == 200
    # Never called (fetch_article was only listed by a tools/list probe): removed.
    assert "tool:kb/fetch_article" not in targets
    assert "model:anthropic/claude-haiku-4-5" not in targets
    assert {"tool:kb/search", "model:openai/gpt-4o-mini", "http:billing.internal"} <= targets
    # Inferred, never wider than observed.
    export = next(t for t in intent["tools"] if t["name"] == "export")
    assert export["args"] == {
        # csv, pdf, csv: a value recurred among two, so one of them
        "format": {"type": "string", "required": True, "enum": ["csv", "pdf"]},
        "limit": {"type": "integer", "minimum": 5, "maximum": 10},
    }
    gpt5 = next(m for m in intent["models"] if m["model"] == "gpt-5")
    assert gpt5["max_tokens_per_call"] == 500
    crm = next(h for h in intent["http"] if h["host"] == "crm.internal")
    assert crm == {"host": "crm.internal", "methods": ["GET"], "path_prefix": "/v2/customers/"}
    # Budgets: tool calls the next version allows, per run: 6 (2 searches, 2 exports and
    # 2 searches in answer) and 3; p95 of two runs is the larger, times 1.5.
    assert intent["budgets"]["tool_calls"] == 9
    assert intent["budgets"]["usd_micros"] == 1200  # run 1 settled 800 micro-dollars


def test_suggest_marks_each_addition_with_its_evidence(
    learned: Learned, suggested: Suggested
) -> None:
    text = suggested.text
    assert "Nothing here is in force" in text
    proposed = [line for line in text.splitlines() if "PROPOSED" in line]
    assert any("add tool:kb/export: refused 3x tool_not_allowed" in line for line in proposed)
    assert any("+ tool:kb/search: refused 3x step_out_of_order" in line for line in proposed)
    # The example ids are real refusals of that very thing.
    lines = text.splitlines()
    line = lines[lines.index(next(line for line in proposed if "add tool:kb/export" in line)) + 1]
    ids = line.split("e.g. ")[1].rstrip(".").split(", ")
    assert len(ids) == 3
    for decision_id in ids:
        record = learned.decision(decision_id)
        assert record["input"]["action"]["target"] == "tool:kb/export"
        assert record["policy_result"]["reasons"][0]["code"] == "tool_not_allowed"
    assert "# REMOVED, never called" in text and "#   name: fetch_article" in text
    assert "observed order: research -> answer -> @completed (2 runs)" in text
    # The readable diff, and the terminal summary with what was not proposed.
    diff = (learned.dir / "next-intent.yaml.diff").read_text()
    assert "+version: 3" in diff and "-version: 2" in diff
    assert "-    name: fetch_article" in diff and "+    name: export" in diff
    out = suggested.out
    assert "not proposed: tool:kb/delete_all refused 1x tool_not_allowed" in out
    assert "not proposed: tool:kb/search refused 1x tool_args_invalid" in out
    assert "not proposed: step:review refused 1x (step review is not in the assembly)" in out
    assert "nothing is applied" in out


def _freeze(learned: Learned, intent: Path, name: str) -> Path:
    envelope = learned.dir / f"{name}.json"
    done = abcctl(
        "freeze", intent, "--key", learned.signer.key, "--policies", POLICIES, "-o", envelope,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return envelope


def _what_if(learned: Learned, *candidate: object) -> dict[str, Any]:
    done = abcctl("replay", learned.log, "--pub", learned.pub, *candidate, "--json", check=False)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _changes(report: dict[str, Any]) -> dict[tuple[str, str, str, bool], int]:
    return {
        (c["direction"], c["reason"], c["target"], c["probe"]): c["count"]
        for c in report["changes"]
    }


def test_the_suggestion_freezes_and_a_what_if_allows_what_recurred(
    learned: Learned, suggested: Suggested
) -> None:
    envelope = _freeze(learned, suggested.path, "next")
    report = _what_if(learned, "--manifest", envelope, "--policies", POLICIES)
    assert report["decisions"] > 0 and report["runs"] == 2
    assert _changes(report) == {
        # every refusal that recurred is allowed now...
        ("deny_to_allow", "tool_not_allowed", "tool:kb/export", False): 3,
        ("deny_to_allow", "step_out_of_order", "tool:kb/search", False): 3,
        ("deny_to_allow", "model_not_allowed", "model:openai/gpt-5", False): 2,
        ("deny_to_allow", "http_not_allowed", "http:crm.internal", False): 2,
        ("deny_to_allow", "tool_not_allowed", "tool:kb/export", True): 1,
        # ...and what was removed is refused: its only trace was a tools/list probe.
        ("allow_to_deny", "tool_not_allowed", "tool:kb/fetch_article", True): 1,
    }
    # What did not recur stays refused; the budgets hold every run's recorded use.
    # delete_all (call and probe), the long query, the step to "review"
    assert report["unchanged"]["deny"] == 4
    assert [b["fits"] for b in report["budgets"]] == [True, True]
    # Each run's recorded reservations and settlements, charged to that run: run 1 settled
    # 120 + 250 tokens and 300 + 500 micro-dollars, and reserved 2 searches, 2 model calls
    # and 1 billing request; run 2 one of each of a search and a model call.
    assert [b["used"] for b in report["budgets"]] == [
        {"tokens": 370, "usd_micros": 800, "tool_calls": 2, "requests": 5},
        {"tokens": 60, "usd_micros": 100, "tool_calls": 1, "requests": 2},
    ]
    assert all(b["not_charged"] > 0 for b in report["budgets"])  # calls not made then
    example = next(c for c in report["changes"] if c["target"] == "tool:kb/export")
    assert learned.decision(example["examples"][0])["policy_result"]["allow"] is False


def test_a_what_if_verifies_the_candidate_when_given_a_trust_store(
    learned: Learned, suggested: Suggested
) -> None:
    envelope = _freeze(learned, suggested.path, "next-verified")
    bundles = learned.state / "bundles"
    trusted = _what_if(
        learned, "--manifest", envelope, "--bundles", bundles, "--trust", learned.signer.trust
    )
    assert len(trusted["changes"]) == 6  # the runs' own (stored) bundle is the same policy
    stranger = Signer(learned.dir / "stranger")
    done = abcctl(
        "replay", learned.log, "--pub", learned.pub, "--manifest", envelope,
        "--bundles", bundles, "--trust", stranger.trust, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "no usable trusted key verifies the signature" in done.stderr
    unverified = abcctl(
        "replay", learned.log, "--pub", learned.pub, "--manifest", envelope,
        "--bundles", bundles, check=False,
    )  # fmt: skip
    assert unverified.returncode == 0 and "NOT VERIFIED" in unverified.stderr
    unjudged = abcctl(
        "replay", learned.log, "--pub", learned.pub, "--manifest", envelope, check=False
    )
    assert unjudged.returncode == 1 and "give --bundles STATE/bundles" in unjudged.stderr


def test_a_what_if_with_tighter_budgets_names_the_reservations_refused(
    learned: Learned, suggested: Suggested
) -> None:
    tight = learned.dir / "tight.yaml"
    tight.write_text(suggested.text.replace("  tool_calls: 9\n", "  tool_calls: 1\n"))
    envelope = _freeze(learned, tight, "tight")
    report = _what_if(learned, "--manifest", envelope, "--policies", POLICIES)
    first = report["budgets"][0]
    # Run 1 reserved two tool calls (its allowed searches): the second does not fit.
    assert first["fits"] is False
    assert first["refused"] == 1 and first["refused_budgets"] == ["tool_calls"]
    assert first["used"]["tool_calls"] == 1 and first["used"]["requests"] == 4
    refused = learned.decision(first["refused_examples"][0])
    assert refused["input"]["action"]["target"] == "tool:kb/search"
    assert refused["input"]["action"]["args"] == {"query": "invoice 42", "top_k": 3}
    assert report["budgets"][1]["fits"] is True  # run 2 made one tool call


def test_suggest_since_learns_from_later_records_only(learned: Learned) -> None:
    records = learned.records()
    step = next(r for r in records if r.get("step", {}).get("to") == "answer")
    later = suggest(learned, learned.dir / "since.yaml", "--since", step["time"])
    targets = _targets(later.intent)
    # Before the cut: two export refusals (one after it), the crm and gpt-5 refusals,
    # and the only billing call.
    assert "tool:kb/export" not in targets
    assert "model:openai/gpt-5" not in targets
    assert "http:billing.internal" not in targets
    assert "not proposed: tool:kb/export refused 1x tool_not_allowed" in later.out
    assert "tool:kb/search" in _step(later.intent, "answer")["uses"]  # 3 times, all after
    assert "since" in later.text.splitlines()[0]
    bad = abcctl(
        "suggest", learned.log, "--pub", learned.pub, "--manifest", learned.v2,
        "-o", learned.dir / "x.yaml", "--since", "2026-01-01T00:00:00", check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "no time zone" in bad.stderr


def test_a_tampered_log_is_refused_by_suggest_and_what_if(learned: Learned, tmp_path: Path) -> None:
    log = tmp_path / "decisions.log"
    lines = learned.log.read_bytes().splitlines(keepends=True)
    flipped = json.loads(lines[8])
    assert flipped["kind"] == "decision"
    flipped["policy_result"]["allow"] = not flipped["policy_result"]["allow"]
    lines[8] = json.dumps(flipped, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    log.write_bytes(b"".join(lines))
    out = tmp_path / "next.yaml"
    done = abcctl(
        "suggest", log, "--pub", learned.pub, "--manifest", learned.v2, "-o", out, check=False
    )
    assert done.returncode == 1 and done.stderr.startswith("tampered:")
    assert not out.exists()
    whatif = abcctl(
        "replay", log, "--pub", learned.pub, "--policies", POLICIES, "--manifest", learned.v2,
        check=False,
    )  # fmt: skip
    assert whatif.returncode == 1 and whatif.stderr.startswith("tampered:")
    # A log cut after its last record but before a checkpoint: what `audit verify` refuses.
    cut = tmp_path / "cut.log"
    cut.write_bytes(b"".join(learned.log.read_bytes().splitlines(keepends=True)[:-1]))
    whatif = abcctl("replay", cut, "--pub", learned.pub, "--policies", POLICIES, check=False)
    assert whatif.returncode == 1 and "after the last checkpoint" in whatif.stderr


def test_suggest_refuses_a_manifest_that_is_not_a_run_of_the_log(
    learned: Learned, suggested: Suggested
) -> None:
    envelope = _freeze(learned, suggested.path, "never-registered")
    done = abcctl(
        "suggest", learned.log, "--pub", learned.pub, "--manifest", envelope,
        "-o", learned.dir / "y.yaml", check=False,
    )  # fmt: skip
    assert done.returncode == 1 and "was never registered" in done.stderr


def test_a_what_if_with_another_policy_reports_flips_by_reason_and_capability(
    learned: Learned, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    rego = policies / "abc" / "authz.rego"
    source = rego.read_text()
    weaker = source.replace("count(value) > c.maxLength", "count(value) > c.maxLength + 1000")
    assert weaker != source
    stricter = weaker + (
        '\ndenials contains [4, {"code": "http_not_allowed", "message": "no HTTP today"}] if {\n'
        '\taction.kind == "http"\n}\n'
    )
    rego.write_text(stricter)
    report = _what_if(learned, "--policies", policies)
    assert _changes(report) == {
        ("deny_to_allow", "tool_args_invalid", "tool:kb/search", False): 1,
        ("allow_to_deny", "http_not_allowed", "http:billing.internal", False): 1,
    }
    assert report["budgets"] == []  # the manifests are the runs' own: their budgets held
    text = abcctl("replay", learned.log, "--pub", learned.pub, "--policies", policies).stdout
    assert "allow -> deny (now refused by):" in text
    assert "http_not_allowed   http:billing.internal    1" in text
    # The same log, replayed plainly, still replays identically (what-if changed nothing).
    plain = abcctl(
        "replay", learned.log, "--pub", learned.pub, "--bundles", learned.state / "bundles"
    )
    assert plain.stdout.strip().endswith("0 divergent")
