"""Builders for test documents: a valid manifest, keys, trust stores, envelopes."""

from __future__ import annotations

import base64
import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.manifest.canonical import canonical_bytes
from pdp.manifest.envelope import PAYLOAD_TYPE, pae
from pdp.manifest.keys import keyid, raw_public_key
from pdp.manifest.trust import TrustEntry, TrustStore

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
BUNDLE_DIGEST = "sha256:" + "ab" * 32


def manifest_document(**metadata: Any) -> dict[str, Any]:
    """A valid RunManifest document for tenant acme, valid 10:00-18:00 on 2026-11-22."""
    document: dict[str, Any] = {
        "apiVersion": "abc/v1",
        "kind": "RunManifest",
        "metadata": {
            "lineage": "acme/support-bot",
            "version": 7,
            "tenant": "acme",
            "agent": "support-bot",
            "goal": "answer tickets",
            "issued_at": "2026-11-22T10:00:00Z",
            "not_before": "2026-11-22T10:00:00Z",
            "expires_at": "2026-11-22T18:00:00Z",
        },
        "enforcement": "enforce",
        "policy": {"bundle_digest": BUNDLE_DIGEST},
        "capabilities": {
            "models": [{"provider": "openai", "model": "gpt-4o-mini", "max_tokens_per_call": 2048}],
            "tools": [
                {
                    "server": "kb",
                    "name": "search",
                    "args": {"query": {"type": "string", "required": True, "maxLength": 200}},
                }
            ],
            "http": [{"host": "billing.internal", "methods": ["GET"], "path_prefix": "/v1/"}],
        },
        "budgets": {"tokens": 200000, "usd_micros": 5000000, "tool_calls": 100, "requests": 500},
        "assembly": {
            "steps": [
                {"id": "research", "uses": ["model:openai/gpt-4o-mini", "tool:kb/search"]},
                {"id": "answer", "uses": ["model:openai/gpt-4o-mini"], "after": ["research"]},
            ]
        },
    }
    document["metadata"].update(metadata)
    return copy.deepcopy(document)


def padded_document() -> dict[str, Any]:
    """A manifest whose canonical length is 1 mod 3: its base64 ends in "==" and the last
    character before the padding has four unused bits, for the base64 strictness tests."""
    document = manifest_document()
    while len(canonical_bytes(document)) % 3 != 1:
        document["metadata"]["goal"] += "."
    return document


def trust_entry(
    key: Ed25519PrivateKey,
    tenants: tuple[str, ...] = ("acme",),
    *,
    modes: tuple[str, ...] = ("enforce",),
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=1),
    revoked: bool = False,
) -> TrustEntry:
    public = key.public_key()
    return TrustEntry(
        keyid=keyid(raw_public_key(public)),
        public_key=public,
        tenants=frozenset(tenants),
        modes=frozenset(modes),
        not_before=not_before,
        not_after=not_after,
        revoked=revoked,
    )


def trust_store(*entries: TrustEntry) -> TrustStore:
    return TrustStore(tuple(entries))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def envelope_from_payload(
    payload: bytes,
    key: Ed25519PrivateKey,
    *,
    payload_type: str = PAYLOAD_TYPE,
    claimed_keyid: str | None = None,
) -> bytes:
    """Sign arbitrary payload bytes (canonical or not) into an envelope."""
    signature = key.sign(pae(payload_type, payload))
    return canonical_bytes(
        {
            "payloadType": payload_type,
            "payload": b64(payload),
            "signatures": [
                {
                    "keyid": claimed_keyid
                    if claimed_keyid is not None
                    else keyid(raw_public_key(key.public_key())),
                    "sig": b64(signature),
                }
            ],
        }
    )


def signed_envelope(key: Ed25519PrivateKey, document: dict[str, Any] | None = None) -> bytes:
    return envelope_from_payload(canonical_bytes(document or manifest_document()), key)


_MCP_GRANTS = """
resources:
  - server: kb
    uri_prefix: file:///docs/
prompts:
  - server: kb
    name: summarize

budgets:"""


def with_resources_and_prompts(intent_text: str) -> str:
    """The demo intent granting an MCP resource prefix and a prompt, used in its first step."""
    return intent_text.replace("\nbudgets:", _MCP_GRANTS, 1).replace(
        "uses: [model:openai/gpt-4o-mini, tool:kb/search,",
        "uses: [model:openai/gpt-4o-mini, resource:kb/file:///docs/, prompt:kb/summarize,"
        " tool:kb/search,",
    )
