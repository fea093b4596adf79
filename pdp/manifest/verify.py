"""Envelope verification, as ordered steps (DESIGN.md, "Envelope").

Nothing from the payload is read before its signature verifies, and the manifest
returned is parsed from exactly the bytes that were signed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from pdp.errors import (
    BadRequest,
    ManifestExpired,
    PolicyMismatch,
    ShadowNotAllowed,
    SignatureInvalid,
)
from pdp.manifest.canonical import digest, parse_canonical
from pdp.manifest.envelope import PAYLOAD_TYPE, pae, parse_envelope
from pdp.manifest.highwater import HighWater
from pdp.manifest.keys import verify_signature
from pdp.manifest.model import Manifest
from pdp.manifest.trust import TrustEntry, TrustStore

__all__ = ["VerifiedManifest", "mark_lineage", "verify_envelope"]


@dataclass(frozen=True)
class VerifiedManifest:
    payload: bytes  # the exact bytes that were signed
    digest: str  # sha256 of payload: the manifest digest
    manifest: Manifest
    signer: str  # key id of the trust-store entry whose signature verified


def mark_lineage(manifest: Manifest) -> str:
    """The lineage a manifest's rollback mark and supersession count under.

    Shadow manifests count apart: registering one observes, it must never retire (or be
    retired by) the enforced versions of the same lineage.
    """
    lineage = manifest.metadata.lineage
    return lineage + "#shadow" if manifest.enforcement == "shadow" else lineage


def verify_envelope(
    raw_envelope: bytes,
    trust: TrustStore,
    now: datetime,
    high_water: HighWater | None = None,
    *,
    expected_policy: str | None = None,
    pending_ok: bool = False,
) -> VerifiedManifest:
    """Verify a DSSE envelope and return the manifest parsed from the signed bytes.

    Steps, each raising on failure:

    1. The envelope is strict JSON with exactly ``payloadType``, ``payload`` and one
       signature; base64 is strict (no whitespace, exact padding).   -> SignatureInvalid
    2. ``payloadType`` is exactly the manifest type.                    -> SignatureInvalid
    3. The signature verifies over PAE(type, exact payload bytes) under a key taken
       from the trust store only, not revoked and inside its window at ``now``. The
       envelope's key id only orders the candidates, but when present it must name
       the key that verified: the key id is unsigned, and no byte of an envelope may
       change without refusal.                                          -> SignatureInvalid
    4. Those exact bytes parse as JSON that is already canonical (no duplicate keys,
       NaN, floats, whitespace or trailing data).                       -> SignatureInvalid
    5. The parsed document is a valid RunManifest.                      -> BadRequest
    6. The verifying key's scope covers the manifest's tenant, and its modes cover
       the manifest's enforcement mode.            -> SignatureInvalid, ShadowNotAllowed
    7. ``now`` is inside the manifest's validity window (or before it, when
       ``pending_ok``: a run registered ahead of its start waits as pending). -> ManifestExpired
    8. The manifest pins ``expected_policy``, the bundle that will judge it; skipped
       when ``expected_policy`` is None.                                -> PolicyMismatch
    9. The version is above the lineage's high-water mark (or is the same manifest
       again), and the mark is raised; skipped when ``high_water`` is None. Last, so
       a manifest refused for any other reason never moves the mark.   -> ManifestRollback

    ``now`` is the one decision time: no step reads the clock.
    """
    # (1)
    envelope = parse_envelope(raw_envelope)
    if len(envelope.signatures) != 1:
        raise SignatureInvalid("an envelope carries exactly one signature")
    (signature,) = envelope.signatures

    # (2)
    if envelope.payload_type != PAYLOAD_TYPE:
        raise SignatureInvalid("unexpected payloadType")

    # (3)
    message = pae(envelope.payload_type, envelope.unverified_payload)
    signer: TrustEntry | None = None
    for candidate in trust.candidates(signature.claimed_keyid, now):
        try:
            verify_signature(candidate.public_key, signature.sig, message)
        except SignatureInvalid:
            continue
        signer = candidate
        break
    if signer is None:
        raise SignatureInvalid("no usable trusted key verifies the signature")
    if signature.claimed_keyid and signature.claimed_keyid != signer.keyid:
        raise SignatureInvalid("the envelope's keyid does not name the key that verified")
    payload = envelope.unverified_payload  # verified from here on

    # (4)
    try:
        document = parse_canonical(payload)
    except BadRequest as exc:
        raise SignatureInvalid(f"signed payload rejected: {exc}") from exc

    # (5)
    try:
        manifest = Manifest.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BadRequest(f"not a valid RunManifest: {first['loc']}: {first['msg']}") from exc
    del document  # parsed only to prove canonical form; the model is the reading we use

    # (6)
    if manifest.metadata.tenant not in signer.tenants:
        raise SignatureInvalid(
            f"key {signer.keyid} is not trusted for tenant {manifest.metadata.tenant!r}"
        )
    if manifest.enforcement not in signer.modes:
        raise ShadowNotAllowed(
            f"key {signer.keyid} may not sign {manifest.enforcement!r} manifests"
        )

    # (7)
    if now >= manifest.expires_at or (now < manifest.not_before and not pending_ok):
        raise ManifestExpired(
            f"manifest valid from {manifest.metadata.not_before} to {manifest.metadata.expires_at}"
        )

    # (8)
    if expected_policy is not None and manifest.policy.bundle_digest != expected_policy:
        raise PolicyMismatch(
            f"manifest pins policy {manifest.policy.bundle_digest}, the PDP runs {expected_policy}"
        )

    manifest_digest = digest(payload)
    # (9)
    if high_water is not None:
        high_water.admit(mark_lineage(manifest), manifest.metadata.version, manifest_digest)

    return VerifiedManifest(payload, manifest_digest, manifest, signer.keyid)
