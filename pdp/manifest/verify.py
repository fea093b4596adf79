"""Envelope verification, as ordered steps (DESIGN.md, "Envelope").

Nothing from the payload is read before its signature verifies, and the manifest
returned is parsed from exactly the bytes that were signed. Verifying writes nothing:
the rollback mark (step 9) is the caller's next, separately named step,
``admit_rollback_mark``, taken only where a manifest is admitted (registration).

Which optional rules run is named by a ``VerificationPolicy``, never by optional
arguments that silently drop a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

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
from pdp.manifest.model import Manifest, format_timestamp
from pdp.manifest.trust import TrustEntry, TrustStore

__all__ = [
    "VerificationPolicy",
    "VerifiedManifest",
    "admit_rollback_mark",
    "mark_lineage",
    "verify_envelope",
]


@dataclass(frozen=True)
class VerifiedManifest:
    payload: bytes  # the exact bytes that were signed
    digest: str  # sha256 of payload: the manifest digest
    manifest: Manifest
    signer: str  # key id of the trust-store entry whose signature verified


@dataclass(frozen=True)
class VerificationPolicy:
    """Which rules ``verify_envelope`` checks beyond the common ones (steps 1-7).

    Every policy runs steps 1 to 7; they differ in whether a manifest before its window
    passes (step 7, as pending) and whether it must pin a given policy bundle (step 8).
    None of them writes the rollback mark (step 9): registration admits it afterwards with
    ``admit_rollback_mark``.

    - ``registration(bundle)``: what the PDP admits, and re-verifies on reload or when
      another replica registered the run: pending passes, the bundle must be pinned.
    - ``OFFLINE``: ``abcctl verify``, which has no policy bundle at hand: the window is
      strict (a manifest not yet valid is refused) and no bundle is pinned.
    - ``CANDIDATE``: a what-if candidate, often frozen moments ago: pending passes and no
      bundle is pinned, since nothing is applied.
    """

    name: str
    pending_ok: bool  # (7) a manifest before its window passes: it waits as pending
    expected_policy: str | None = None  # (8) the bundle digest it must pin; None: not checked

    OFFLINE: ClassVar[VerificationPolicy]
    CANDIDATE: ClassVar[VerificationPolicy]

    @classmethod
    def registration(cls, bundle_digest: str) -> VerificationPolicy:
        return cls("registration", pending_ok=True, expected_policy=bundle_digest)

    @property
    def steps(self) -> tuple[int, ...]:
        """The numbered steps of ``verify_envelope`` this policy runs."""
        return (1, 2, 3, 4, 5, 6, 7) + ((8,) if self.expected_policy is not None else ())


VerificationPolicy.OFFLINE = VerificationPolicy("offline", pending_ok=False)
VerificationPolicy.CANDIDATE = VerificationPolicy("candidate", pending_ok=True)


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
    policy: VerificationPolicy,
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
    7. ``now`` is inside the manifest's validity window (or before it, when the
       policy's ``pending_ok``: a run registered ahead of its start waits as pending).
                                                                        -> ManifestExpired
    8. The manifest pins the policy's ``expected_policy``, the bundle that will judge
       it; only for a policy that names one (``VerificationPolicy.registration``).
                                                                        -> PolicyMismatch
    9. Left to the caller, after every other step passed: ``admit_rollback_mark``.

    ``now`` is the one decision time: no step reads the clock. Nothing is written.
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
        raise SignatureInvalid(_why_no_signer(trust, signature.claimed_keyid, now))
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
            f" (abcctl trust add --tenant {manifest.metadata.tenant})"
        )
    if manifest.enforcement not in signer.modes:
        raise ShadowNotAllowed(
            f"key {signer.keyid} may not sign {manifest.enforcement!r} manifests"
            f" (its trust entry needs --mode {manifest.enforcement})"
        )

    # (7)
    if now >= manifest.expires_at or (now < manifest.not_before and not policy.pending_ok):
        raise ManifestExpired(
            f"manifest valid from {manifest.metadata.not_before} to {manifest.metadata.expires_at},"
            f" not at {format_timestamp(now)}: freeze the intent again (abcctl freeze)"
        )

    # (8)
    expected = policy.expected_policy
    if expected is not None and manifest.policy.bundle_digest != expected:
        raise PolicyMismatch(
            f"manifest pins policy {manifest.policy.bundle_digest}, the PDP runs {expected}:"
            " freeze again with the PDP's policies (abcctl freeze --policies DIR),"
            " or start the PDP with the bundle the manifest pins"
        )

    return VerifiedManifest(payload, digest(payload), manifest, signer.keyid)


def _why_no_signer(trust: TrustStore, claimed: str, now: datetime) -> str:
    """What to tell the operator when no trusted key verifies: which key, and what to do."""
    why = "no usable trusted key verifies the signature"
    if not claimed:
        return f"{why} (the envelope names no key id)"
    entry = next((e for e in trust.entries if e.keyid == claimed), None)
    if entry is None:
        return (
            f"{why}: the envelope's key {claimed} is not in the trust store;"
            " trust it with `abcctl trust add --pub KEY.pub --tenant TENANT`"
        )
    if entry.revoked:
        return f"{why}: the envelope's key {claimed} is revoked in the trust store"
    if not entry.usable_at(now):
        return (
            f"{why}: the envelope's key {claimed} is trusted from"
            f" {format_timestamp(entry.not_before)} to {format_timestamp(entry.not_after)},"
            f" not at {format_timestamp(now)}"
        )
    return f"{why}: the signature does not verify under key {claimed} (changed after signing?)"


def admit_rollback_mark(verified: VerifiedManifest, high_water: HighWater) -> None:
    """Step 9, the one that writes: admit ``verified`` above its lineage's high-water mark.

    The version must be above the highest already admitted for the lineage (or be the
    same manifest again), and the mark is raised to it. Taken only after
    ``verify_envelope`` passed, so a manifest refused for any other reason never moves
    the mark.                                                           -> ManifestRollback
    """
    manifest = verified.manifest
    high_water.admit(mark_lineage(manifest), manifest.metadata.version, verified.digest)
