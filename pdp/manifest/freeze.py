"""Freeze: an intent becomes a RunManifest pinned to one policy bundle, then is signed."""

from __future__ import annotations

from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.manifest.canonical import canonical_bytes
from pdp.manifest.envelope import sign_payload
from pdp.manifest.intent import Intent
from pdp.manifest.model import (
    Assembly,
    Manifest,
    ManifestMetadata,
    PolicyPin,
    format_timestamp,
    parse_timestamp,
)

__all__ = ["freeze", "sign_manifest"]


def freeze(intent: Intent, bundle_digest: str, now: datetime) -> Manifest:
    """The manifest: issued at ``now``, valid from ``not_before`` (or now) for its lifetime."""
    not_before = parse_timestamp(intent.not_before) if intent.not_before else now
    return Manifest(
        apiVersion="abc/v1",
        kind="RunManifest",
        metadata=ManifestMetadata(
            lineage=intent.lineage_name,
            version=intent.version,
            tenant=intent.tenant,
            agent=intent.agent,
            goal=intent.goal,
            issued_at=format_timestamp(now),
            not_before=format_timestamp(not_before),
            expires_at=format_timestamp(not_before + intent.lifetime_delta),
        ),
        enforcement=intent.enforcement,
        policy=PolicyPin(bundle_digest=bundle_digest),
        capabilities=intent.capabilities,
        budgets=intent.budgets,
        fleet=intent.fleet,
        assembly=Assembly(steps=intent.steps),
    )


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> bytes:
    """The DSSE envelope (canonical JSON bytes) around the manifest's canonical bytes."""
    return sign_payload(canonical_bytes(manifest.document()), key)
