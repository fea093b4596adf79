"""abcctl end to end, through the installed console script, as the README shows it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ABCCTL = str(Path(sys.executable).parent / "abcctl")
INTENT = ROOT / "deploy" / "demo" / "intent.yaml"
POLICIES = ROOT / "policies"


@dataclass
class Result:
    code: int
    out: str
    err: str


def abcctl(*args: str | Path) -> Result:
    done = subprocess.run(
        [ABCCTL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    return Result(done.returncode, done.stdout, done.stderr)


@dataclass
class Setup:
    dir: Path
    key: Path
    pub: Path
    trust: Path
    envelope: Path


def _freeze(setup: Setup, intent: Path, out: str) -> Path:
    envelope = setup.dir / out
    result = abcctl("freeze", intent, "--key", setup.key, "--policies", POLICIES, "-o", envelope)
    assert result.code == 0, result.err
    return envelope


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    keygen = abcctl("keygen", "--out", tmp_path / "keys", "--name", "signer")
    assert keygen.code == 0, keygen.err
    assert keygen.out.strip().startswith("sha256:")
    key, pub = tmp_path / "keys" / "signer.key", tmp_path / "keys" / "signer.pub"
    trust = tmp_path / "trust.yaml"
    added = abcctl("trust", "add", "--store", trust, "--pub", pub, "--tenant", "acme")
    assert added.code == 0, added.err
    partial = Setup(tmp_path, key, pub, trust, tmp_path / "envelope.json")
    _freeze(partial, INTENT, "envelope.json")
    return partial


def _no_traceback(result: Result) -> None:
    assert "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err


def test_keygen_freeze_verify_inspect(setup: Setup) -> None:
    verified = abcctl(
        "verify", setup.envelope, "--trust", setup.trust, "--state", setup.dir / "state"
    )
    assert verified.code == 0, verified.err
    assert "acme/support-bot v1" in verified.out
    inspected = abcctl("inspect", setup.envelope, "--json")
    summary = json.loads(inspected.out)
    assert summary["verified"] is False
    assert "tool:kb/search" in [tool["target"] for tool in summary["tools"]]
    assert summary["policy_bundle_digest"] == abcctl("policy", "digest", POLICIES).out.strip()
    human = abcctl("inspect", setup.envelope)
    assert human.out.startswith("UNVERIFIED")
    assert "step         answer after research" in human.out


def _expect_refusal(result: Result, reason: str) -> None:
    assert result.code == 1
    assert result.err.startswith(f"{reason}:"), result.err
    _no_traceback(result)


def test_tampered_envelope(setup: Setup) -> None:
    document = json.loads(setup.envelope.read_text())
    import base64

    payload = base64.b64decode(document["payload"]).replace(b'"tokens":200000', b'"tokens":900000')
    document["payload"] = base64.b64encode(payload).decode()
    setup.envelope.write_text(json.dumps(document))
    _expect_refusal(abcctl("verify", setup.envelope, "--trust", setup.trust), "signature_invalid")


def test_expired_envelope(setup: Setup) -> None:
    # Past the manifest's 8h lifetime, but inside the key's one-year window.
    later = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = abcctl("verify", setup.envelope, "--trust", setup.trust, "--at", later)
    _expect_refusal(result, "manifest_expired")


def test_wrong_tenant(setup: Setup) -> None:
    other = setup.dir / "other-trust.yaml"
    abcctl("trust", "add", "--store", other, "--pub", setup.pub, "--tenant", "globex")
    _expect_refusal(abcctl("verify", setup.envelope, "--trust", other), "signature_invalid")


def test_revoked_key(setup: Setup) -> None:
    key_id = yaml.safe_load(setup.trust.read_text())["keys"][0]["keyid"]
    assert abcctl("trust", "revoke", "--store", setup.trust, "--keyid", key_id).code == 0
    _expect_refusal(abcctl("verify", setup.envelope, "--trust", setup.trust), "signature_invalid")


def test_rolled_back(setup: Setup) -> None:
    v2_intent = setup.dir / "intent-v2.yaml"
    v2_intent.write_text(INTENT.read_text().replace("version: 1", "version: 2"))
    v2 = _freeze(setup, v2_intent, "v2.json")
    state = setup.dir / "state"
    assert abcctl("verify", v2, "--trust", setup.trust, "--state", state).code == 0
    _expect_refusal(
        abcctl("verify", setup.envelope, "--trust", setup.trust, "--state", state),
        "manifest_rollback",
    )


def test_non_canonical(setup: Setup) -> None:
    # Re-sign an indented payload with the trusted key: only the canonical rule refuses it.
    import base64

    from cryptography.hazmat.primitives import serialization

    from pdp.manifest.envelope import PAYLOAD_TYPE, pae

    document = json.loads(setup.envelope.read_text())
    payload = json.dumps(json.loads(base64.b64decode(document["payload"])), indent=2).encode()
    key = serialization.load_pem_private_key(setup.key.read_bytes(), password=None)
    signature = key.sign(pae(PAYLOAD_TYPE, payload))  # type: ignore[union-attr,call-arg]
    document["payload"] = base64.b64encode(payload).decode()
    document["signatures"][0]["sig"] = base64.b64encode(signature).decode()
    setup.envelope.write_text(json.dumps(document))
    _expect_refusal(abcctl("verify", setup.envelope, "--trust", setup.trust), "signature_invalid")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            (
                "freeze",
                "{dir}/missing.yaml",
                "--key",
                "{key}",
                "--policies",
                POLICIES,
                "-o",
                "{dir}/o.json",
            ),
            "missing.yaml",
        ),
        (
            (
                "freeze",
                INTENT,
                "--key",
                "{dir}/missing.key",
                "--policies",
                POLICIES,
                "-o",
                "{dir}/o.json",
            ),
            "missing.key",
        ),
        (
            (
                "freeze",
                "{dir}/bad.yaml",
                "--key",
                "{key}",
                "--policies",
                POLICIES,
                "-o",
                "{dir}/o.json",
            ),
            "bad.yaml:3:1",
        ),
        (
            ("verify", "{dir}/envelope.json", "--trust", "{dir}/missing-trust.yaml"),
            "missing-trust.yaml",
        ),
        (
            (
                "trust",
                "add",
                "--store",
                "{dir}/t.yaml",
                "--pub",
                "{dir}/missing.pub",
                "--tenant",
                "a",
            ),
            "missing.pub",
        ),
        (("keygen", "--out", "{dir}/keys", "--name", "signer"), "already exists"),
        (("inspect", "{dir}/bad.yaml"), "envelope"),
    ],
    ids=[
        "no-intent",
        "no-key",
        "bad-yaml",
        "no-trust",
        "no-pub",
        "keygen-overwrite",
        "inspect-garbage",
    ],
)
def test_user_mistakes_are_one_line(setup: Setup, args: tuple[object, ...], message: str) -> None:
    (setup.dir / "bad.yaml").write_text("tenant: acme\nagent: [\n")
    expanded = [str(a).format(dir=setup.dir, key=setup.key) for a in args]
    result = abcctl(*expanded)
    assert result.code == 1, result
    _no_traceback(result)
    assert result.err.startswith("abcctl: error:")
    assert message in result.err


def test_audit_verify(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from pdp.decisionlog import DecisionLog, SettlementRecord

    abcctl("keygen", "--out", tmp_path, "--name", "pdp")
    key = serialization.load_pem_private_key((tmp_path / "pdp.key").read_bytes(), password=None)
    log = DecisionLog(tmp_path / "d.log", key, checkpoint_every=3)  # type: ignore[arg-type]
    for i in range(5):
        log.append(
            SettlementRecord(
                time=datetime.now(UTC),
                run_id="run_1",
                reservation_id=f"rsv_{i}",
                tokens=i,
                usd_micros=0,
            )
        )
    log.close()
    ok = abcctl("audit", "verify", tmp_path / "d.log", "--pub", tmp_path / "pdp.pub")
    assert ok.code == 0 and ok.out.startswith("intact: 7 records, 2 signed checkpoints")
    lines = (tmp_path / "d.log").read_bytes().splitlines(keepends=True)
    (tmp_path / "d.log").write_bytes(b"".join(lines[:2] + lines[3:]))
    bad = abcctl("audit", "verify", tmp_path / "d.log", "--pub", tmp_path / "pdp.pub")
    assert bad.code == 1
    assert bad.err.startswith("tampered: record seq 3 (line 3)")
    _no_traceback(bad)
