"""verify_envelope: one test per rule of DESIGN.md "Envelope", in the order of the steps;
then which steps each ``VerificationPolicy`` runs, and the rollback mark, admitted apart."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.errors import (
    BadRequest,
    ManifestExpired,
    ManifestRollback,
    PolicyMismatch,
    ReasonCode,
    ShadowNotAllowed,
    SignatureInvalid,
)
from pdp.manifest.canonical import canonical_bytes, digest
from pdp.manifest.highwater import SqliteHighWater
from pdp.manifest.verify import (
    VerificationPolicy,
    VerifiedManifest,
    admit_rollback_mark,
    verify_envelope,
)
from tests.factories import (
    BUNDLE_DIGEST,
    NOW,
    b64,
    envelope_from_payload,
    manifest_document,
    padded_document,
    signed_envelope,
    trust_entry,
    trust_store,
)

OFFLINE = VerificationPolicy.OFFLINE
REGISTRATION = VerificationPolicy.registration(BUNDLE_DIGEST)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_valid_envelope_returns_the_signed_bytes_and_their_manifest(key: Ed25519PrivateKey) -> None:
    raw = signed_envelope(key)
    verified = verify_envelope(raw, trust_store(trust_entry(key)), NOW, OFFLINE)
    assert verified.payload == canonical_bytes(manifest_document())
    assert verified.digest == digest(verified.payload)
    assert verified.manifest.metadata.lineage == "acme/support-bot"
    assert verified.signer == trust_entry(key).keyid


# (1) structure and strict base64 --------------------------------------------------------


def _mutate(raw: bytes, change: object) -> bytes:
    document = json.loads(raw)
    change(document)  # type: ignore[operator]
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(extra=1),
        lambda d: d.pop("payloadType"),
        lambda d: d.update(signatures=[]),
        lambda d: d.update(payload=d["payload"] + "\n"),
        lambda d: d.update(payload=" " + d["payload"]),
        lambda d: d.update(payload=d["payload"].rstrip("=")),
        lambda d: d.update(payload=d["payload"] + "=="),
        lambda d: d["signatures"][0].update(sig=d["signatures"][0]["sig"].rstrip("=")),
        lambda d: d["signatures"][0].update(other="x"),
        lambda d: d["signatures"].append(dict(d["signatures"][0])),
    ],
    ids=[
        "extra-field",
        "missing-payloadType",
        "no-signatures",
        "payload-newline",
        "payload-leading-space",
        "payload-missing-padding",
        "payload-extra-padding",
        "sig-missing-padding",
        "sig-extra-field",
        "two-signatures",
    ],
)
def test_malformed_envelope_is_signature_invalid(key: Ed25519PrivateKey, change: object) -> None:
    raw = _mutate(signed_envelope(key, padded_document()), change)
    with pytest.raises(SignatureInvalid) as caught:
        verify_envelope(raw, trust_store(trust_entry(key)), NOW, OFFLINE)
    assert caught.value.reason is ReasonCode.SIGNATURE_INVALID


def test_non_canonical_base64_trailing_bits_refused(key: Ed25519PrivateKey) -> None:
    raw = json.loads(signed_envelope(key, padded_document()))
    payload = raw["payload"]
    assert payload.endswith("==")
    # Set an unused low bit of the last character before the padding: a lenient decoder
    # yields the same bytes from different text. Only a strict decoder notices.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(payload[-3])
    assert last & 0b1111 == 0
    raw["payload"] = payload[:-3] + alphabet[last | 1] + "=="
    with pytest.raises(SignatureInvalid):
        verify_envelope(json.dumps(raw).encode(), trust_store(trust_entry(key)), NOW, OFFLINE)


def test_urlsafe_base64_alphabet_refused(key: Ed25519PrivateKey) -> None:
    document = manifest_document()
    while not {"+", "/"} & set(b64(canonical_bytes(document))):
        document["metadata"]["goal"] += "?"
    raw = json.loads(signed_envelope(key, document))
    raw["payload"] = raw["payload"].replace("+", "-").replace("/", "_")
    with pytest.raises(SignatureInvalid):
        verify_envelope(json.dumps(raw).encode(), trust_store(trust_entry(key)), NOW, OFFLINE)


# (2) exact payloadType --------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload_type",
    [
        "application/vnd.abc.manifest.v1+json ",
        "application/json",
        "APPLICATION/VND.ABC.MANIFEST.V1+JSON",
    ],
    ids=["trailing-space", "generic-json", "uppercase"],
)
def test_other_payload_type_refused(key: Ed25519PrivateKey, payload_type: str) -> None:
    raw = envelope_from_payload(
        canonical_bytes(manifest_document()), key, payload_type=payload_type
    )
    with pytest.raises(SignatureInvalid):
        verify_envelope(raw, trust_store(trust_entry(key)), NOW, OFFLINE)


# (3) signature, key only from the trust store ---------------------------------------------


def test_tampered_payload_refused(key: Ed25519PrivateKey) -> None:
    document = json.loads(signed_envelope(key))
    tampered = canonical_bytes(manifest_document(version=8))
    document["payload"] = b64(tampered)
    with pytest.raises(SignatureInvalid):
        verify_envelope(json.dumps(document).encode(), trust_store(trust_entry(key)), NOW, OFFLINE)


def test_signature_by_untrusted_key_refused(key: Ed25519PrivateKey) -> None:
    stranger = Ed25519PrivateKey.generate()
    # The envelope claims the trusted key's id: the id is only a hint.
    raw = envelope_from_payload(
        canonical_bytes(manifest_document()), stranger, claimed_keyid=trust_entry(key).keyid
    )
    with pytest.raises(SignatureInvalid):
        verify_envelope(raw, trust_store(trust_entry(key)), NOW, OFFLINE)


def test_missing_keyid_hint_still_finds_the_trusted_key(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    raw = envelope_from_payload(canonical_bytes(manifest_document()), key, claimed_keyid="")
    verified = verify_envelope(raw, trust_store(trust_entry(other), trust_entry(key)), NOW, OFFLINE)
    assert verified.signer == trust_entry(key).keyid


def test_keyid_naming_another_trusted_key_refused(key: Ed25519PrivateKey) -> None:
    # The key id is not signed: were it ignored, it could be changed without detection.
    other = Ed25519PrivateKey.generate()
    raw = envelope_from_payload(
        canonical_bytes(manifest_document()), key, claimed_keyid=trust_entry(other).keyid
    )
    with pytest.raises(SignatureInvalid):
        verify_envelope(raw, trust_store(trust_entry(other), trust_entry(key)), NOW, OFFLINE)


def test_revoked_key_refused(key: Ed25519PrivateKey) -> None:
    with pytest.raises(SignatureInvalid):
        verify_envelope(
            signed_envelope(key), trust_store(trust_entry(key, revoked=True)), NOW, OFFLINE
        )


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [(timedelta(hours=1), timedelta(days=2)), (-timedelta(days=2), -timedelta(seconds=1))],
    ids=["key-not-yet-valid", "key-expired"],
)
def test_key_outside_its_window_refused(
    key: Ed25519PrivateKey, not_before: timedelta, not_after: timedelta
) -> None:
    entry = trust_entry(key, not_before=NOW + not_before, not_after=NOW + not_after)
    with pytest.raises(SignatureInvalid):
        verify_envelope(signed_envelope(key), trust_store(entry), NOW, OFFLINE)


def test_empty_trust_store_refuses_everything(key: Ed25519PrivateKey) -> None:
    with pytest.raises(SignatureInvalid):
        verify_envelope(signed_envelope(key), trust_store(), NOW, OFFLINE)


# (4) the signed bytes must already be canonical -------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        json.dumps(manifest_document(), indent=1).encode(),
        json.dumps(manifest_document(), sort_keys=False).encode(),
        canonical_bytes(manifest_document()) + b" ",
        canonical_bytes(manifest_document()) + b"{}",
        canonical_bytes(manifest_document()).replace(b'"version":7', b'"version":7.0'),
        canonical_bytes(manifest_document()).replace(b'"version":7', b'"version":NaN'),
        canonical_bytes(manifest_document()).replace(b'{"agent"', b'{"agent":"x","agent"', 1),
        canonical_bytes(manifest_document()).replace(b'"acme"', b'"\\u0061cme"', 1),
    ],
    ids=[
        "indented",
        "unsorted-keys",
        "trailing-space",
        "trailing-data",
        "float-version",
        "nan",
        "duplicate-key",
        "escaped-letter",
    ],
)
def test_signed_but_non_canonical_payload_refused(key: Ed25519PrivateKey, payload: bytes) -> None:
    raw = envelope_from_payload(payload, key)
    with pytest.raises(SignatureInvalid):
        verify_envelope(raw, trust_store(trust_entry(key)), NOW, OFFLINE)


# (5) a valid RunManifest ------------------------------------------------------------------


def test_signed_canonical_but_invalid_manifest_is_bad_request(key: Ed25519PrivateKey) -> None:
    document = manifest_document()
    document["assembly"]["steps"][0]["uses"] = ["tool:kb/delete_everything"]
    with pytest.raises(BadRequest) as caught:
        verify_envelope(signed_envelope(key, document), trust_store(trust_entry(key)), NOW, OFFLINE)
    assert caught.value.reason is ReasonCode.BAD_REQUEST


# (6) key scope: tenant and mode ------------------------------------------------------------


def test_a_lineage_belongs_to_its_tenant(key: Ed25519PrivateKey) -> None:
    # Else a key trusted for another tenant could raise acme's rollback mark and lock it out.
    document = manifest_document(lineage="acme/support-bot", tenant="evil")
    with pytest.raises(BadRequest):
        verify_envelope(
            signed_envelope(key, document), trust_store(trust_entry(key, ("evil",))), NOW, OFFLINE
        )


def test_key_not_scoped_to_the_tenant_refused(key: Ed25519PrivateKey) -> None:
    with pytest.raises(SignatureInvalid):
        verify_envelope(
            signed_envelope(key), trust_store(trust_entry(key, ("globex",))), NOW, OFFLINE
        )


def test_shadow_manifest_needs_a_key_granted_shadow(key: Ed25519PrivateKey) -> None:
    document = manifest_document()
    document["enforcement"] = "shadow"
    with pytest.raises(ShadowNotAllowed):
        verify_envelope(signed_envelope(key, document), trust_store(trust_entry(key)), NOW, OFFLINE)
    granted = trust_entry(key, modes=("enforce", "shadow"))
    assert verify_envelope(signed_envelope(key, document), trust_store(granted), NOW, OFFLINE)


# (7) validity window, one decision time -----------------------------------------------------


@pytest.mark.parametrize(
    "at",
    [NOW.replace(hour=9, minute=59, second=59), NOW.replace(hour=18), NOW + timedelta(days=3)],
    ids=["before-not-before", "at-expiry", "long-after"],
)
def test_outside_manifest_window_is_expired(key: Ed25519PrivateKey, at: object) -> None:
    entry = trust_entry(key, not_before=NOW - timedelta(days=5), not_after=NOW + timedelta(days=5))
    with pytest.raises(ManifestExpired) as caught:
        verify_envelope(
            signed_envelope(key),
            trust_store(entry),
            at,  # type: ignore[arg-type]
            OFFLINE,
        )
    assert caught.value.reason is ReasonCode.MANIFEST_EXPIRED


def test_window_edges_use_the_given_time(key: Ed25519PrivateKey) -> None:
    store = trust_store(trust_entry(key))
    assert verify_envelope(signed_envelope(key), store, NOW.replace(hour=10), OFFLINE)
    last = NOW.replace(hour=17, minute=59, second=59)
    assert verify_envelope(signed_envelope(key), store, last, OFFLINE)


# (8) the pinned policy ----------------------------------------------------------------------


def test_manifest_pinned_to_another_policy_refused(key: Ed25519PrivateKey) -> None:
    store = trust_store(trust_entry(key))
    other = VerificationPolicy.registration("sha256:" + "0" * 64)
    with pytest.raises(PolicyMismatch) as caught:
        verify_envelope(signed_envelope(key), store, NOW, other)
    assert caught.value.reason is ReasonCode.POLICY_MISMATCH
    assert verify_envelope(signed_envelope(key), store, NOW, REGISTRATION)


# (9) rollback high-water mark, admitted by the caller after verifying -------------------------


def _admitted(raw: bytes, key: Ed25519PrivateKey, marks: SqliteHighWater) -> VerifiedManifest:
    """What registration does: verify, then admit the mark."""
    verified = verify_envelope(raw, trust_store(trust_entry(key)), NOW, REGISTRATION)
    admit_rollback_mark(verified, marks)
    return verified


def test_rollback_refused_and_mark_persisted(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    _admitted(
        signed_envelope(key, manifest_document(version=8)), key, SqliteHighWater(tmp_path / "s.db")
    )
    reopened = SqliteHighWater(tmp_path / "s.db")  # a restart: the mark comes from disk
    with pytest.raises(ManifestRollback) as caught:
        _admitted(signed_envelope(key, manifest_document(version=7)), key, reopened)
    assert caught.value.reason is ReasonCode.MANIFEST_ROLLBACK
    assert reopened.mark("acme/support-bot") == 8


def test_same_version_different_manifest_is_rollback(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    marks = SqliteHighWater(tmp_path / "s.db")
    _admitted(signed_envelope(key), key, marks)
    other = manifest_document()
    other["budgets"]["tokens"] = 999999
    with pytest.raises(ManifestRollback):
        _admitted(signed_envelope(key, other), key, marks)


def test_same_manifest_again_is_accepted(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    marks = SqliteHighWater(tmp_path / "s.db")
    first = _admitted(signed_envelope(key), key, marks)
    again = _admitted(signed_envelope(key), key, marks)
    assert first.digest == again.digest


def test_lineages_are_independent(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    marks = SqliteHighWater(tmp_path / "s.db")
    _admitted(signed_envelope(key, manifest_document(version=9)), key, marks)
    assert _admitted(
        signed_envelope(key, manifest_document(version=1, lineage="acme/other")), key, marks
    )


class _RecordingMarks:
    """A high-water store that records every write: verifying must make none."""

    def __init__(self) -> None:
        self.admitted: list[tuple[str, int, str]] = []

    def admit(self, lineage: str, version: int, manifest_digest: str) -> None:
        self.admitted.append((lineage, version, manifest_digest))

    def mark(self, lineage: str) -> int | None:
        return None


@pytest.mark.parametrize(
    "policy",
    [REGISTRATION, VerificationPolicy.OFFLINE, VerificationPolicy.CANDIDATE],
    ids=["registration", "offline", "candidate"],
)
def test_verifying_writes_no_mark(key: Ed25519PrivateKey, policy: VerificationPolicy) -> None:
    marks = _RecordingMarks()
    verified = verify_envelope(signed_envelope(key), trust_store(trust_entry(key)), NOW, policy)
    assert marks.admitted == []  # verify was never handed the marks, and holds none
    admit_rollback_mark(verified, marks)
    assert marks.admitted == [("acme/support-bot", 7, verified.digest)]


# Policies: which optional steps each one runs -------------------------------------------------

_PENDING_AT = NOW.replace(hour=9)  # before the manifest's window opens at 10:00
_OTHER_BUNDLE = manifest_document()
_OTHER_BUNDLE["policy"]["bundle_digest"] = "sha256:" + "1" * 64


@pytest.mark.parametrize(
    ("policy", "steps", "pending_passes", "other_bundle_passes"),
    [
        (REGISTRATION, (1, 2, 3, 4, 5, 6, 7, 8), True, False),
        (VerificationPolicy.OFFLINE, (1, 2, 3, 4, 5, 6, 7), False, True),
        (VerificationPolicy.CANDIDATE, (1, 2, 3, 4, 5, 6, 7), True, True),
    ],
    ids=["registration", "offline", "candidate"],
)
def test_each_policy_runs_its_named_steps(
    key: Ed25519PrivateKey,
    policy: VerificationPolicy,
    steps: tuple[int, ...],
    pending_passes: bool,
    other_bundle_passes: bool,
) -> None:
    assert policy.steps == steps
    entry = trust_entry(key, not_before=NOW - timedelta(days=5), not_after=NOW + timedelta(days=5))
    store = trust_store(entry)
    # (7) a manifest before its window: pending for registration and candidates only.
    if pending_passes:
        assert verify_envelope(signed_envelope(key), store, _PENDING_AT, policy)
    else:
        with pytest.raises(ManifestExpired):
            verify_envelope(signed_envelope(key), store, _PENDING_AT, policy)
    # (8) a manifest pinned to another bundle: refused only where a bundle is expected.
    if other_bundle_passes:
        assert verify_envelope(signed_envelope(key, _OTHER_BUNDLE), store, NOW, policy)
    else:
        with pytest.raises(PolicyMismatch):
            verify_envelope(signed_envelope(key, _OTHER_BUNDLE), store, NOW, policy)
    # (1)-(6) hold for every policy: a signature by an untrusted key is refused.
    with pytest.raises(SignatureInvalid):
        verify_envelope(signed_envelope(Ed25519PrivateKey.generate()), store, NOW, policy)
    # (7) and expiry holds for every policy too.
    with pytest.raises(ManifestExpired):
        verify_envelope(signed_envelope(key), store, NOW.replace(hour=18), policy)
