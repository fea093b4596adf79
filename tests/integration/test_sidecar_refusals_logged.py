"""A refusal the sidecar makes itself is in the PDP's decision log too: no attempt unseen.

Requests the sidecar cannot map to an action never reach a Decide; it logs them with
RecordRefusal, and its answer carries the logged decision id. When the PDP cannot log it,
the request is refused all the same, under the sidecar's own id.
"""

from __future__ import annotations

from pathlib import Path

import httpx2 as httpx

from pdp.decisionlog import DecisionRecord, read_verified_log
from pdp.manifest.keys import load_public_key
from tests.harness import INTENT, Signer, audit_verify, start_pdp, start_pep


def _post(url: str, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/openai/v1/chat/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )


def _http(url: str, path: str) -> httpx.Response:
    return httpx.get(f"{url}/http/billing.internal{path}", timeout=10)


SENDS = {
    "malformed-json": (lambda url: _post(url, b'{"model": "gpt-4o-mini",'), "openai"),
    "name-with-newline": (
        lambda url: _post(url, b'{"model": "gpt-4o-mini\\n", "messages": []}'),
        "openai",
    ),
    "overlong-dots": (lambda url: _http(url, "/v1/invoices/%e0%80%ae%e0%80%ae/admin"), "http"),
}


def test_a_local_refusal_is_logged_and_carries_the_logged_id(tmp_path: Path) -> None:
    signer = Signer(tmp_path)
    state = tmp_path / "state"
    pdp = start_pdp(signer, state)
    envelope = tmp_path / "demo.json"
    envelope.write_bytes(signer.freeze(INTENT.read_text(), "demo"))
    upstreams = {"openai": "http://127.0.0.1:9", "http:billing.internal": "http://127.0.0.1:9"}
    pep = start_pep(pdp.address, upstreams, tmp_path, "--manifest", str(envelope))
    logged_ids: dict[str, str] = {}
    try:
        for case, (send, _) in SENDS.items():
            reply = send(pep.url)
            assert reply.status_code == 400, (case, reply.text)
            assert reply.headers["x-abc-reason"] == "bad_request", case
            decision_id = reply.headers["x-abc-decision-id"]
            assert decision_id.startswith("dec_") and decision_id in reply.text, case
            logged_ids[case] = decision_id
        # The PDP gone: still refused, under the sidecar's own id, nothing forwarded.
        pdp.stop()
        for case, (send, _) in SENDS.items():
            again = send(pep.url)
            assert again.status_code == 400, case
            assert again.headers["x-abc-decision-id"].startswith("pep_"), case
    finally:
        pep.stop()
        pdp.stop()
    records = read_verified_log(state / "decisions.log", load_public_key(state / "pdp-log.pub"))
    decisions = {r.decision_id: r for r in records.records if isinstance(r, DecisionRecord)}
    for case, (_, route) in SENDS.items():
        logged = decisions[logged_ids[case]]
        assert logged.input == {"refused_by_sidecar": {"route": route}}, case
        assert logged.result["allow"] is False
        assert logged.result["reasons"][0]["code"] == "bad_request"
        assert logged.run_id and logged.manifest_digest.startswith("sha256:")
    assert audit_verify(state).returncode == 0
