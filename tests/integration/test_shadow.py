"""Shadow mode: the same traffic through an enforced and a shadow run of the same intent.

Both runs are decided alike and logged alike; only forwarding differs, and the metrics
say which refusals were enforced and which were only observed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from pdp.api import pdp_pb2
from tests.fakes.serve import FakeUpstreams
from tests.harness import (
    INTENT,
    POLICIES,
    PdpProcess,
    PepProcess,
    Signer,
    abcctl,
    log_records,
    sample,
    start_pdp,
    start_pep,
)
from tests.integration.test_pdp_grpc import codes, register, stub, tool_call


@pytest.fixture(scope="module")
def shadow_key(signer: Signer) -> Path:
    """A second key in the same trust store, granted shadow mode (the signer's is not)."""
    abcctl("keygen", "--out", signer.dir / "keys", "--name", "shadow")
    abcctl(
        "trust",
        "add",
        "--store",
        signer.trust,
        "--pub",
        signer.dir / "keys" / "shadow.pub",
        "--tenant",
        "acme",
        "--mode",
        "enforce",
        "--mode",
        "shadow",
    )
    return signer.dir / "keys" / "shadow.key"


@pytest.fixture(scope="module")
def shadow_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shadow-state")


@pytest.fixture(scope="module")
def shadow_pdp(signer: Signer, shadow_key: Path, shadow_state: Path) -> Iterator[PdpProcess]:
    pdp = start_pdp(signer, shadow_state)
    yield pdp
    pdp.stop()


def frozen(signer: Signer, key: Path, text: str, name: str) -> Path:
    intent, envelope = signer.dir / f"{name}.yaml", signer.dir / f"{name}.json"
    intent.write_text(text)
    abcctl("freeze", intent, "--key", key, "--policies", POLICIES, "-o", envelope)
    return envelope


def intent(lineage: str, shadow: bool, requests: int = 500) -> str:
    text = INTENT.read_text().replace("lineage: acme/support-bot", f"lineage: acme/{lineage}")
    text = text.replace("requests: 500", f"requests: {requests}")
    return text + ("\nenforcement: shadow\n" if shadow else "")


def decisions_of(state: Path, run_id: str) -> list[dict[str, object]]:
    records = log_records(state / "decisions.log")
    return [r for r in records if r["kind"] == "decision" and r["run_id"] == run_id]


def test_a_key_without_shadow_mode_cannot_register_a_shadow_manifest(
    shadow_pdp: PdpProcess, signer: Signer
) -> None:
    envelope = frozen(signer, signer.key, intent("no-shadow", shadow=True), "no-shadow")
    with pytest.raises(grpc.RpcError) as refused:
        register(shadow_pdp, envelope.read_bytes().strip())
    assert refused.value.details().startswith("shadow_not_allowed: ")
    counted = sample(
        shadow_pdp.metrics(), "abc_pdp_manifests_rejected_total", reason="shadow_not_allowed"
    )
    assert counted == 1


def test_same_traffic_same_decisions_different_forwarding(
    shadow_pdp: PdpProcess, shadow_state: Path, signer: Signer, shadow_key: Path, tmp_path: Path
) -> None:
    enforce = frozen(signer, signer.key, intent("twin", shadow=False), "twin-enforce")
    shadow = frozen(signer, shadow_key, intent("twin", shadow=True), "twin-shadow")
    with FakeUpstreams() as fakes:
        peps: dict[str, PepProcess] = {
            mode: start_pep(
                shadow_pdp.address,
                {"openai": fakes.openai_url.removesuffix("/v1")},
                tmp_path,
                "--manifest",
                str(envelope),
            )
            for mode, envelope in (("enforce", enforce), ("shadow", shadow))
        }
        try:
            outcomes: dict[str, list[str]] = {}
            for mode, pep in peps.items():
                client = openai.OpenAI(base_url=f"{pep.url}/openai/v1", api_key="k", max_retries=0)
                outcomes[mode] = []
                for model in ("gpt-4o-mini", "gpt-4o", "o1"):
                    try:
                        client.chat.completions.create(
                            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8
                        )
                        outcomes[mode].append("forwarded")
                    except openai.PermissionDeniedError as exc:
                        outcomes[mode].append(str(exc.code))
            forwarded = [call.body["model"] for call in fakes.recorder.find("openai")]
            pep_metrics = {mode: pep.metrics() for mode, pep in peps.items()}
        finally:
            for pep in peps.values():
                pep.stop()
    assert outcomes["enforce"] == ["forwarded", "model_not_allowed", "model_not_allowed"]
    assert outcomes["shadow"] == ["forwarded", "forwarded", "forwarded"]
    assert sorted(forwarded) == sorted(["gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "o1"])

    # The log holds the same decisions for both runs; the shadow ones say they were not enforced.
    runs = {
        mode: register(shadow_pdp, path.read_bytes().strip())
        for mode, path in (("enforce", enforce), ("shadow", shadow))
    }
    logged = {mode: decisions_of(shadow_state, run) for mode, run in runs.items()}
    assert [r["result"] for r in logged["enforce"]] == [r["result"] for r in logged["shadow"]]
    assert all(r.get("enforced") is False for r in logged["shadow"])
    assert all("enforced" not in r for r in logged["enforce"])

    assert (
        sample(
            pep_metrics["enforce"],
            "abc_pep_denials_total",
            route="openai",
            reason="model_not_allowed",
        )
        == 2
    )
    assert (
        sample(
            pep_metrics["shadow"],
            "abc_pep_denials_total",
            route="openai",
            reason="model_not_allowed",
        )
        == 0
    )
    assert (
        sample(
            pep_metrics["shadow"],
            "abc_pep_shadow_denials_total",
            route="openai",
            reason="model_not_allowed",
        )
        == 2
    )
    assert (
        sample(
            pep_metrics["enforce"],
            "abc_pep_shadow_denials_total",
            route="openai",
            reason="model_not_allowed",
        )
        == 0
    )
    pdp_text = shadow_pdp.metrics()
    for mode in ("enforce", "shadow"):
        assert (
            sample(
                pdp_text,
                "abc_pdp_decisions_total",
                decision="deny",
                reason="model_not_allowed",
                mode=mode,
            )
            == 2
        )


def test_shadow_records_over_spend_instead_of_blocking(
    shadow_pdp: PdpProcess, signer: Signer, shadow_key: Path
) -> None:
    envelope = frozen(signer, shadow_key, intent("overspend", shadow=True, requests=2), "over")
    run_id = register(shadow_pdp, envelope.read_bytes().strip())
    answers = [
        stub(shadow_pdp).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=5)
        for _ in range(3)
    ]
    assert all(a.allow and a.shadow for a in answers)
    assert [a.would_allow for a in answers] == [True, True, False]
    assert codes(answers[2]) == ["budget_exhausted"]
    run = stub(shadow_pdp).GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert run.remaining.requests == -1  # the over-spend is on the books, not hidden


def test_a_shadow_version_never_retires_the_enforced_run(
    shadow_pdp: PdpProcess, signer: Signer, shadow_key: Path
) -> None:
    enforced = register(
        shadow_pdp,
        frozen(signer, signer.key, intent("lineage", shadow=False), "lin-1").read_bytes().strip(),
    )
    later = intent("lineage", shadow=True).replace("version: 1", "version: 2")
    register(shadow_pdp, frozen(signer, shadow_key, later, "lin-2").read_bytes().strip())
    run = stub(shadow_pdp).GetRun(pdp_pb2.GetRunRequest(run_id=enforced), timeout=5)
    assert run.status == "running"
    still = stub(shadow_pdp).Decide(tool_call(enforced, "delete_all", {}), timeout=5)
    assert not still.allow and not still.shadow and codes(still) == ["tool_not_allowed"]


def test_suggest_learns_from_a_shadow_run(
    shadow_pdp: PdpProcess, shadow_state: Path, signer: Signer, shadow_key: Path, tmp_path: Path
) -> None:
    envelope = frozen(signer, shadow_key, intent("observed", shadow=True), "observed")
    run_id = register(shadow_pdp, envelope.read_bytes().strip())
    for n in range(2):  # forwarded both times, refused only in the log
        answer = stub(shadow_pdp).Decide(
            tool_call(run_id, "translate", {"text": f"t{n}"}), timeout=5
        )
        assert answer.allow and answer.shadow and not answer.would_allow
    out = tmp_path / "next.yaml"
    abcctl(
        "suggest",
        shadow_state / "decisions.log",
        "--pub",
        shadow_state / "pdp-log.pub",
        "--manifest",
        envelope,
        "-o",
        out,
        "--allow-tail",
    )
    proposed = out.read_text()
    assert "name: translate" in proposed and "PROPOSED" in proposed
    assert "enforcement: shadow" in proposed  # the next version is still the signer's choice
