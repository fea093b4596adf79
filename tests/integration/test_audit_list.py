"""`abcctl audit list` and the `abcctl explain` selectors (`last`, `last-denied`, a unique
prefix) on the log of a real PDP (gRPC on loopback), two runs of two lineages."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.harness import INTENT, Signer, abcctl, start_pdp
from tests.integration.test_pdp_grpc import register, stub, tool_call


@dataclass
class Logged:
    state: Path
    runs: list[str]
    ids: dict[str, str]  # name -> decision id
    middle: str  # an instant between run A's decisions and run B's

    def cli(self, *args: object, check: bool = True) -> Any:
        # The PDP is still running: its log ends in records no checkpoint signed yet.
        return abcctl(*args, "--pub", self.state / "pdp-log.pub", "--allow-tail", check=check)

    def listed(self, *flags: object) -> list[dict[str, Any]]:
        done = self.cli("audit", "list", self.state / "decisions.log", *flags, "--json")
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def explained(self, selector: str, check: bool = True) -> Any:
        return self.cli(
            "explain", selector, "--log", self.state / "decisions.log", "--json", check=check
        )


@pytest.fixture(scope="module")
def logged(signer: Signer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    state = tmp_path_factory.mktemp("audit-list")
    pdp = start_pdp(signer, state)
    try:
        client = stub(pdp)
        runs, ids = [], {}
        for name in ("a", "b"):
            text = INTENT.read_text().replace("acme/support-bot", f"acme/audit-{name}")
            runs.append(register(pdp, signer.freeze(text, f"audit-{name}")))
        calls = [
            ("a-search", runs[0], "search", {"query": "refund"}),
            ("a-typo", runs[0], "serch", {"query": "refund"}),
            ("a-long", runs[0], "search", {"query": "x" * 300}),
            ("b-search", runs[1], "search", {"query": "late fee"}),
            ("b-unknown", runs[1], "delete_all", {}),
        ]
        middle = ""
        for name, run_id, tool, args in calls:
            if name == "b-search":
                time.sleep(0.01)  # the PDP reads the same clock: A's decisions are before this
                middle = datetime.now(UTC).isoformat()
                time.sleep(0.01)
            reply = client.Decide(tool_call(run_id, tool, args), timeout=5)
            ids[name] = reply.decision_id
        yield Logged(state, runs, ids, middle)
    finally:
        pdp.stop()


def test_audit_list_filters_by_decision_reason_run_and_time(logged: Logged) -> None:
    every = logged.listed()
    assert [r["decision_id"] for r in every] == list(logged.ids.values())
    assert [r["verdict"] for r in every] == ["allow", "deny", "deny", "allow", "deny"]
    assert every[1] == {
        "time": every[1]["time"],
        "decision_id": logged.ids["a-typo"],
        "run_id": logged.runs[0],
        "verdict": "deny",
        "kind": "tool",
        "target": "tool:kb/serch",
        "probe": False,
        "reasons": ["tool_not_allowed"],
    }
    denied = logged.listed("--decision", "deny")
    assert [r["decision_id"] for r in denied] == [
        logged.ids[n] for n in ("a-typo", "a-long", "b-unknown")
    ]
    allowed = logged.listed("--decision", "allow")
    assert [r["decision_id"] for r in allowed] == [logged.ids["a-search"], logged.ids["b-search"]]
    unknown = logged.listed("--reason", "tool_not_allowed")
    assert [r["decision_id"] for r in unknown] == [logged.ids["a-typo"], logged.ids["b-unknown"]]
    run_b = logged.listed("--run", logged.runs[1][:12])
    assert {r["run_id"] for r in run_b} == {logged.runs[1]} and len(run_b) == 2
    combined = logged.listed("--run", logged.runs[0], "--decision", "deny", "--last", "1")
    assert [r["decision_id"] for r in combined] == [logged.ids["a-long"]]
    after = logged.listed("--since", logged.middle)
    before = logged.listed("--until", logged.middle)
    assert [r["decision_id"] for r in after] == [logged.ids["b-search"], logged.ids["b-unknown"]]
    assert len(before) == 3
    text = logged.cli("audit", "list", logged.state / "decisions.log", "--decision", "deny")
    lines = text.stdout.splitlines()
    assert len(lines) == 3 and "3 decision(s)" in text.stderr
    assert logged.ids["a-long"] in lines[1] and "tool_args_invalid" in lines[1]
    naive = logged.cli(
        "audit", "list", logged.state / "decisions.log", "--since", "2026-01-01T00:00:00",
        check=False,
    )  # fmt: skip
    assert naive.returncode == 2 and "no time zone" in naive.stderr
    none = logged.cli("audit", "list", logged.state / "decisions.log", "--last", "0", check=False)
    assert none.returncode == 2 and "at least 1" in none.stderr


def test_explain_last_last_denied_and_a_unique_prefix(logged: Logged) -> None:
    last = json.loads(logged.explained("last").stdout)
    assert last["decision_id"] == logged.ids["b-unknown"]
    denied = json.loads(logged.explained("last-denied").stdout)
    assert denied["decision_id"] == logged.ids["b-unknown"]
    full = logged.ids["a-long"]
    prefix = next(
        full[:n]
        for n in range(5, len(full))
        if sum(i.startswith(full[:n]) for i in logged.ids.values()) == 1
    )
    by_prefix = json.loads(logged.explained(prefix).stdout)
    assert by_prefix["decision_id"] == full
    assert by_prefix["result"]["reasons"][0]["code"] == "tool_args_invalid"


def test_an_ambiguous_prefix_lists_the_candidates(logged: Logged) -> None:
    done = logged.explained("dec_", check=False)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("abcctl: error: 5 decisions start with dec_: ")
    assert all(decision_id in line for decision_id in logged.ids.values())
    assert "give more of the id" in line
    missing = logged.explained("dec_zzz", check=False)
    assert missing.returncode == 1 and "no decision dec_zzz" in missing.stderr


def test_a_running_pdps_unsigned_tail_is_read_only_when_allowed(logged: Logged) -> None:
    """As ``audit verify``, ``replay`` and ``suggest``: records no checkpoint signed yet are
    read with ``--allow-tail`` only, so nothing unsigned is shown without being asked."""
    log, pub = logged.state / "decisions.log", logged.state / "pdp-log.pub"
    for command in (
        ("audit", "list", log),
        ("explain", "last", "--log", log),
        ("audit", "verify", log),
    ):
        done = abcctl(*command, "--pub", pub, check=False)
        assert done.returncode == 1, command
        assert "after the last checkpoint" in done.stderr and "--allow-tail" in done.stderr
        assert done.stdout == ""
    assert logged.listed("--last", "1")  # the same log, the tail allowed


def test_audit_list_refuses_a_tampered_log(logged: Logged, tmp_path: Path) -> None:
    lines = (logged.state / "decisions.log").read_text().splitlines(keepends=True)
    tampered = tmp_path / "tampered.log"
    tampered.write_text("".join([lines[0], lines[1].replace("acme", "acne"), *lines[2:]]))
    done = logged.cli("audit", "list", tampered, check=False)
    assert done.returncode == 1 and done.stderr.startswith("tampered:")
    assert done.stdout == ""
