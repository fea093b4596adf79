"""The decision log's chain: one canonical JSON line per record, each naming the hash of the
one before. What each kind of record holds is ``records.py``.

A line is a JSON object with a version field ``v``. Its hash is ``sha256:`` of its
RFC 8785 bytes (what is written, minus the newline), so any edit changes it and breaks
the next record's ``prev``. A record holds numbers as the agent sent them, fractions
included (RFC 8785 spells every finite double one way); only signed manifests forbid floats.
Checkpoints are records too, signed with the PDP's key over their own canonical bytes
without ``sig``.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pdp.decisionlog.records import RECORD_VERSION, CheckpointRecord, line_fields
from pdp.manifest.canonical import canonical_record_bytes, digest
from pdp.manifest.keys import keyid, raw_public_key, verify_signature

__all__ = [
    "GENESIS",
    "RECORD_VERSION",
    "record_hash",
    "sign_checkpoint",
    "verify_checkpoint",
]

GENESIS = "sha256:" + "0" * 64  # the `prev` of record 0


def record_hash(record: dict[str, Any]) -> str:
    return digest(canonical_record_bytes(record))


def _unsigned(record: dict[str, Any]) -> bytes:
    return canonical_record_bytes({k: v for k, v in record.items() if k != "sig"})


def sign_checkpoint(
    seq: int, prev: str, time: datetime, key: Ed25519PrivateKey, *, macs: bool = True
) -> CheckpointRecord:
    """The checkpoint at ``seq`` signing the head ``prev``: ``sig`` is base64 Ed25519 over
    its whole line's canonical bytes without ``sig``. ``macs``: the records after it carry
    MACs (False only to write a log as versions before them did)."""
    unsigned = CheckpointRecord(
        time=time, head=prev, keyid=keyid(raw_public_key(key.public_key())), sig="", macs=macs
    )
    signature = key.sign(_unsigned(line_fields(unsigned, seq, prev)))
    return unsigned.model_copy(update={"sig": base64.b64encode(signature).decode("ascii")})


def verify_checkpoint(record: dict[str, Any], key: Ed25519PublicKey) -> None:
    """Raise ``SignatureInvalid`` unless ``record`` is a checkpoint signed by ``key``."""
    signature = base64.b64decode(str(record.get("sig", "")), validate=True)
    verify_signature(key, signature, _unsigned(record))
