"""Manifests and signing: intent → frozen RunManifest → DSSE envelope → verified manifest."""

from pdp.manifest.freeze import freeze, sign_manifest
from pdp.manifest.highwater import HighWater, SqliteHighWater
from pdp.manifest.intent import Intent, IntentError, load_intent, parse_intent
from pdp.manifest.model import Manifest
from pdp.manifest.trust import TrustEntry, TrustStore, load_trust_store, save_trust_store
from pdp.manifest.verify import VerifiedManifest, mark_lineage, verify_envelope

__all__ = [
    "HighWater",
    "Intent",
    "IntentError",
    "Manifest",
    "SqliteHighWater",
    "TrustEntry",
    "TrustStore",
    "VerifiedManifest",
    "freeze",
    "load_intent",
    "load_trust_store",
    "mark_lineage",
    "parse_intent",
    "save_trust_store",
    "sign_manifest",
    "verify_envelope",
]
