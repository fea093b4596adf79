"""abcctl replay: every logged decision re-decided with its pinned policy and manifest."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.harness import BIN, INTENT, Signer, log_records, start_pdp


def replay(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN / "abcctl"),
            "replay",
            str(state / "decisions.log"),
            "--bundles",
            str(state / "bundles"),
            "--pub",
            str(state / "pdp-log.pub"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def traffic(signer: Signer, state: Path) -> int:
    """Real decisions (allowed, refused by policy, refused by the ledger) through a real PDP."""
    pdp = start_pdp(signer, state)
    stub = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())
    text = (
        INTENT.read_text()
        .replace("acme/support-bot", "acme/replay")
        .replace("tool_calls: 100", "tool_calls: 2")
    )
    run_id = stub.RegisterManifest(
        pdp_pb2.RegisterManifestRequest(envelope=signer.freeze(text, "r"))
    ).run_id
    calls = [
        ("search", b'{"query": "a"}'),
        ("search", b'{"query": "' + b"x" * 300 + b'"}'),
        ("fetch_article", b'{"article_id": "KB-1"}'),
        ("drop", b"{}"),
        ("fetch_article", b'{"article_id": "KB-2"}'),
        ("search", b'{"query": "b"}'),
    ]
    for i, (name, args) in enumerate(calls):
        stub.Decide(
            pdp_pb2.DecideRequest(
                run_id=run_id,
                request_id=f"q{i}",
                action=pdp_pb2.Action(kind="tool", target=f"tool:kb/{name}", args_json=args),
            )
        )
    assert pdp.stop() == 0
    return len(calls)


def test_an_untouched_log_replays_identically(signer: Signer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    count = traffic(signer, state)
    done = replay(state)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(
        f"{count} decisions re-decided: {count} identical, 0 divergent"
    )
    records = log_records(state / "decisions.log")
    final = [
        r["result"]["reasons"][0]["code"]
        for r in records
        if r["kind"] == "decision" and not r["result"]["allow"]
    ]
    assert "budget_exhausted" in final  # refused by the ledger, yet the policy's answer replays


def test_a_bundle_changed_under_its_digest_is_detected(signer: Signer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    traffic(signer, state)
    (stored,) = (state / "bundles").iterdir()
    rego = stored / "abc" / "authz.rego"
    rego.write_text(
        rego.read_text().replace("count(value) > c.maxLength", "count(value) > c.maxLength + 1000")
    )
    done = replay(state)
    assert done.returncode == 1
    assert "it was changed" in done.stdout


def test_a_tampered_log_is_not_replayed(signer: Signer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    traffic(signer, state)
    log = state / "decisions.log"
    lines = log.read_bytes().splitlines(keepends=True)
    del lines[2]
    log.write_bytes(b"".join(lines))
    done = replay(state)
    assert done.returncode == 1 and done.stderr.startswith("tampered:")
