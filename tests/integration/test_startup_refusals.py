"""A manifest the PDP refuses stops the sidecar with the PDP's explanation, not a bare code;
``abcctl verify`` names an untrusted key the same way."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from pdp.manifest.keys import keyid, load_public_key, raw_public_key
from tests.harness import INTENT, PdpProcess, Signer, abcctl, start_up_error


def _key_id(signer: Signer) -> str:
    return keyid(raw_public_key(load_public_key(signer.dir / "keys" / "signer.pub")))


def _sidecar_refuses(pdp: PdpProcess, envelope: bytes, directory: Path) -> str:
    path = directory / "envelope.json"
    path.write_bytes(envelope)
    stderr = start_up_error("abc-pep", "--pdp", pdp.address, "--manifest", path)
    assert len(stderr.strip().splitlines()) == 1, stderr
    return stderr


def test_untrusted_key_named_with_the_fix(pdp: PdpProcess, tmp_path: Path) -> None:
    stranger = Signer(tmp_path / "stranger")
    envelope = stranger.freeze(INTENT.read_text(), "stranger")
    stderr = _sidecar_refuses(pdp, envelope, tmp_path)
    assert "signature_invalid: " in stderr
    assert _key_id(stranger) in stderr
    assert "abcctl trust add" in stderr
    # abcctl verify against a trust store that lacks the key says the same.
    trusted_elsewhere = tmp_path / "other-trust.yaml"
    other = Signer(tmp_path / "other")
    trusted_elsewhere.write_text(other.trust.read_text())
    done = abcctl("verify", tmp_path / "envelope.json", "--trust", trusted_elsewhere, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("signature_invalid: ")
    assert _key_id(stranger) in done.stderr and "abcctl trust add" in done.stderr


def test_expired_manifest_shows_its_window(pdp: PdpProcess, signer: Signer, tmp_path: Path) -> None:
    start = (datetime.now(UTC) - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = INTENT.read_text().replace("acme/support-bot", "acme/expired")
    text = text.replace("lifetime: 8h", f"lifetime: 1h\nnot_before: {start}")
    stderr = _sidecar_refuses(pdp, signer.freeze(text, "expired"), tmp_path)
    assert "manifest_expired: " in stderr
    assert f"valid from {start} to " in stderr
    assert "freeze the intent again" in stderr


def test_policy_mismatch_shows_both_digests(
    pdp: PdpProcess, signer: Signer, tmp_path: Path
) -> None:
    other = tmp_path / "policies"
    (other / "abc").mkdir(parents=True)
    for source in (Path(__file__).resolve().parents[2] / "policies" / "abc").glob("*.rego"):
        (other / "abc" / source.name).write_text(source.read_text() + "\n# another revision\n")
    text = INTENT.read_text().replace("acme/support-bot", "acme/mismatch")
    stderr = _sidecar_refuses(pdp, signer.freeze(text, "mismatch", other), tmp_path)
    assert "policy_mismatch: " in stderr
    pinned = abcctl("policy", "digest", other).stdout.strip()
    running = abcctl("policy", "digest", Path(__file__).resolve().parents[2] / "policies")
    assert pinned in stderr and running.stdout.strip() in stderr
    assert "freeze again" in stderr


def test_revoked_key_said_so(tmp_path: Path) -> None:
    signer = Signer(tmp_path / "s")
    envelope = tmp_path / "e.json"
    envelope.write_bytes(signer.freeze(INTENT.read_text(), "e"))
    abcctl("trust", "revoke", "--store", signer.trust, "--keyid", _key_id(signer))
    done = abcctl("verify", envelope, "--trust", signer.trust, check=False)
    assert done.returncode == 1
    assert f"the envelope's key {_key_id(signer)} is revoked" in done.stderr


def test_rollback_and_tenant_refusals_say_what_to_do(signer: Signer, tmp_path: Path) -> None:
    text = INTENT.read_text()
    newer = tmp_path / "v2.json"
    newer.write_bytes(signer.freeze(text.replace("version: 1", "version: 2"), "v2"))
    older = tmp_path / "v1.json"
    older.write_bytes(signer.freeze(text, "v1"))
    state = tmp_path / "state"
    assert abcctl("verify", newer, "--trust", signer.trust, "--state", state).returncode == 0
    done = abcctl("verify", older, "--trust", signer.trust, "--state", state, check=False)
    assert done.stderr.startswith("manifest_rollback: ")
    assert "raise version in the intent, freeze again" in done.stderr
    other_tenant = tmp_path / "globex.json"
    other_tenant.write_bytes(
        signer.freeze(
            text.replace("tenant: acme", "tenant: globex").replace("acme/", "globex/"), "g"
        )
    )
    done = abcctl("verify", other_tenant, "--trust", signer.trust, check=False)
    assert done.stderr.startswith("signature_invalid: ")
    assert "not trusted for tenant 'globex' (abcctl trust add --tenant globex)" in done.stderr
