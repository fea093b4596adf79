"""`abcctl explain` on the log of a real PDP: each refusal says what decided it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdp.api import pdp_pb2
from tests.harness import INTENT, PdpProcess, Signer, abcctl, start_pdp
from tests.integration.test_pdp_grpc import register, step, stub, tool_call


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("explain-state")


@pytest.fixture(scope="module")
def explained_pdp(signer: Signer, state: Path) -> Iterator[PdpProcess]:
    pdp = start_pdp(signer, state)
    yield pdp
    pdp.stop()


@pytest.fixture(scope="module")
def run_id(explained_pdp: PdpProcess, signer: Signer) -> str:
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/explain")
    return register(
        explained_pdp, signer.freeze(text.replace("tool_calls: 100", "tool_calls: 2"), "why")
    )


def explained(state: Path, decision_id: str) -> dict[str, Any]:
    shown = abcctl(
        "explain",
        decision_id,
        "--log",
        state / "decisions.log",
        "--pub",
        state / "pdp-log.pub",
        "--allow-tail",  # the PDP is still running
        "--json",
    )
    document: dict[str, Any] = json.loads(shown.stdout)
    return document


def only_reason(document: dict[str, Any]) -> dict[str, Any]:
    (reason,) = document["result"]["reasons"]
    return reason


def test_an_unknown_tool_is_explained_with_the_closest_names(
    explained_pdp: PdpProcess, run_id: str, state: Path
) -> None:
    refused = stub(explained_pdp).Decide(tool_call(run_id, "serch", {"query": "q"}), timeout=5)
    document = explained(state, refused.decision_id)
    reason = only_reason(document)
    assert reason["code"] == "tool_not_allowed"
    assert reason["evidence"] == {
        "target": "tool:kb/serch",
        "matched": None,
        "closest": ["tool:kb/search"],
    }
    assert document["consulted"]["capability"] == {"tool:kb/serch": None}
    assert document["run"]["step"] == "research"
    assert document["manifest_digest"].startswith("sha256:") and document["policy_digest"]


def test_an_argument_over_max_length_names_the_constraint(
    explained_pdp: PdpProcess, run_id: str, state: Path
) -> None:
    refused = stub(explained_pdp).Decide(
        tool_call(run_id, "search", {"query": "x" * 201}), timeout=5
    )
    reason = only_reason(explained(state, refused.decision_id))
    assert reason["code"] == "tool_args_invalid"
    assert reason["evidence"] == {
        "capability": "tool:kb/search",
        "argument": "query",
        "constraint": {"maxLength": 200},
    }


def test_a_pattern_mismatch_names_the_pattern(
    explained_pdp: PdpProcess, run_id: str, state: Path
) -> None:
    refused = stub(explained_pdp).Decide(
        tool_call(run_id, "fetch_article", {"article_id": "XX-1"}), timeout=5
    )
    document = explained(state, refused.decision_id)
    assert only_reason(document)["evidence"] == {
        "capability": "tool:kb/fetch_article",
        "argument": "article_id",
        "constraint": {"pattern": "^KB-[0-9]{1,8}$"},
    }
    entry = document["consulted"]["capability"]["tool:kb/fetch_article"]
    assert entry["args"]["article_id"]["pattern"] == "^KB-[0-9]{1,8}$"


def test_a_budget_refusal_shows_the_books_at_that_moment(
    explained_pdp: PdpProcess, run_id: str, state: Path
) -> None:
    first = stub(explained_pdp).Decide(tool_call(run_id, "search", {"query": "a"}), timeout=5)
    second = stub(explained_pdp).Decide(tool_call(run_id, "search", {"query": "b"}), timeout=5)
    third = stub(explained_pdp).Decide(tool_call(run_id, "search", {"query": "c"}), timeout=5)
    assert first.allow and second.allow and not third.allow
    document = explained(state, third.decision_id)
    reason = only_reason(document)
    assert reason["code"] == "budget_exhausted"
    assert reason["evidence"]["remaining"]["tool_calls"] == 0
    assert reason["evidence"]["cost"]["tool_calls"] == 1
    assert document["budget"]["limits"]["tool_calls"] == 2
    assert document["budget"]["reserved"]["tool_calls"] == 2  # both held, none settled yet
    assert document["budget"]["remaining"]["tool_calls"] == 0


def test_a_step_out_of_order_names_where_the_tool_is_allowed(
    explained_pdp: PdpProcess, run_id: str, state: Path
) -> None:
    assert stub(explained_pdp).Decide(step(run_id, "answer"), timeout=5).allow
    refused = stub(explained_pdp).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=5)
    document = explained(state, refused.decision_id)
    assert only_reason(document)["evidence"] == {
        "capability": "tool:kb/search",
        "step": "answer",
        "allowed_in": ["research"],
    }
    assert document["run"] == {"step": "answer", "completed_steps": ["research"]}
    text = abcctl(
        "explain",
        refused.decision_id,
        "--log",
        state / "decisions.log",
        "--pub",
        state / "pdp-log.pub",
        "--allow-tail",
    ).stdout
    assert f"decision {refused.decision_id}" in text and ": DENY" in text
    assert 'allowed_in: ["research"]' in text


def test_a_refusal_the_sidecar_made_says_so(
    explained_pdp: PdpProcess, run_id: str, state: Path
) -> None:
    logged = stub(explained_pdp).RecordRefusal(
        pdp_pb2.RecordRefusalRequest(
            run_id=run_id,
            request_id="pep_1",
            route="openai",
            reason="bad_request",
            message="percent-encoded model endpoint paths are refused",
        ),
        timeout=5,
    )
    document = explained(state, logged.decision_id)
    assert document["action"] == {} and document["refused_on"] == "openai"
    assert document["consulted"] == {}
    text = abcctl(
        "explain", logged.decision_id, "--log", state / "decisions.log", "--pub",
        state / "pdp-log.pub", "--allow-tail",
    ).stdout  # fmt: skip
    assert f"run      {run_id}\n" in text  # no step: it never reached the policy
    assert "action   none: refused by the sidecar on its openai route" in text
    assert "consulted" not in text
    assert "reason   bad_request: percent-encoded model endpoint paths" in text


def test_explain_refuses_a_tampered_log_and_an_unknown_id(state: Path, tmp_path: Path) -> None:
    lines = (state / "decisions.log").read_text().splitlines(keepends=True)
    tampered = tmp_path / "tampered.log"
    tampered.write_text("".join([*lines[:1], lines[1].replace("research", "answer"), *lines[2:]]))
    refused = abcctl(
        "explain", "dec_x", "--log", tampered, "--pub", state / "pdp-log.pub", check=False
    )
    assert refused.returncode == 1 and "tampered" in refused.stderr
    unknown = abcctl(
        "explain",
        "dec_nope",
        "--log",
        state / "decisions.log",
        "--pub",
        state / "pdp-log.pub",
        "--allow-tail",
        check=False,
    )
    assert unknown.returncode == 1 and "no decision dec_nope" in unknown.stderr
