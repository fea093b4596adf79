"""Manifests and signing: intent → frozen RunManifest → DSSE envelope → verified manifest."""

from pdp.manifest.freeze import freeze, sign_manifest
from pdp.manifest.highwater import HighWater, SqliteHighWater
from pdp.manifest.intent import Intent, IntentError, load_intent, parse_intent
from pdp.manifest.model import Manifest
from pdp.manifest.trust import TrustEntry, TrustStore, load_trust_store, save_trust_store
from pdp.manifest.verify import (
    VerificationPolicy,
    VerifiedManifest,
    admit_rollback_mark,
    mark_lineage,
    verify_envelope,
)

__all__ = [
    "HighWater",
    "Intent",
    "IntentError",
    "Manifest",
    "SqliteHighWater",
    "TrustEntry",
    "TrustStore",
    "VerificationPolicy",
    "VerifiedManifest",
    "admit_rollback_mark",
    "freeze",
    "load_intent",
    "load_trust_store",
    "mark_lineage",
    "parse_intent",
    "save_trust_store",
    "sign_manifest",
    "verify_envelope",
]
