"""DSSE v1 envelopes around canonical manifest bytes.

The signature covers PAE = "DSSEv1" SP len(type) SP type SP len(body) SP body.
Parsing here is structural only; nothing inside the payload is read before the
signature verifies (see ``verify.py``).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.errors import BadRequest, SignatureInvalid
from pdp.manifest.canonical import canonical_bytes, parse_strict_json
from pdp.manifest.keys import keyid, raw_public_key

__all__ = [
    "MAX_ENVELOPE_BYTES",
    "PAYLOAD_TYPE",
    "RawEnvelope",
    "UnverifiedSignature",
    "pae",
    "parse_envelope",
    "sign_payload",
    "strict_b64decode",
]

PAYLOAD_TYPE = "application/vnd.abc.manifest.v1+json"
MAX_ENVELOPE_BYTES = 1 << 20


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    encoded_type = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(encoded_type), encoded_type, len(body), body)


def strict_b64decode(text: str) -> bytes:
    """Standard base64 with padding, no whitespace, and no non-zero trailing bits.

    Re-encoding and comparing refuses every alternative spelling of the same bytes.
    """
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise SignatureInvalid("invalid base64") from exc
    if base64.b64encode(data).decode("ascii") != text:
        raise SignatureInvalid("non-canonical base64")
    return data


@dataclass(frozen=True)
class UnverifiedSignature:
    claimed_keyid: str
    sig: bytes


@dataclass(frozen=True)
class RawEnvelope:
    """An envelope parsed for structure only: nothing in it is trusted yet."""

    payload_type: str
    unverified_payload: bytes
    signatures: tuple[UnverifiedSignature, ...]


def parse_envelope(raw_envelope: bytes) -> RawEnvelope:
    """Parse the envelope's structure; raise ``SignatureInvalid`` for any malformation.

    Exactly the keys ``payloadType``, ``payload`` and ``signatures``; strict base64.
    """
    if len(raw_envelope) > MAX_ENVELOPE_BYTES:
        raise SignatureInvalid(f"envelope over {MAX_ENVELOPE_BYTES} bytes")
    try:
        document = parse_strict_json(raw_envelope)
    except BadRequest as exc:
        raise SignatureInvalid(f"envelope is not strict JSON: {exc}") from exc
    if not isinstance(document, dict) or set(document) != {"payloadType", "payload", "signatures"}:
        raise SignatureInvalid("envelope must hold exactly payloadType, payload and signatures")
    payload_type, payload, signatures = (
        document["payloadType"],
        document["payload"],
        document["signatures"],
    )
    if not isinstance(payload_type, str) or not isinstance(payload, str):
        raise SignatureInvalid("payloadType and payload must be strings")
    if not isinstance(signatures, list) or not signatures:
        raise SignatureInvalid("envelope has no signatures")
    parsed: list[UnverifiedSignature] = []
    for entry in signatures:
        if (
            not isinstance(entry, dict)
            or not set(entry) <= {"keyid", "sig"}
            or not isinstance(entry.get("sig"), str)
            or not isinstance(entry.get("keyid", ""), str)
        ):
            raise SignatureInvalid("malformed signature entry")
        parsed.append(UnverifiedSignature(entry.get("keyid", ""), strict_b64decode(entry["sig"])))
    return RawEnvelope(payload_type, strict_b64decode(payload), tuple(parsed))


def sign_payload(payload: bytes, key: Ed25519PrivateKey) -> bytes:
    """Sign canonical manifest bytes into a DSSE envelope (canonical JSON bytes)."""
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [
            {
                "keyid": keyid(raw_public_key(key.public_key())),
                "sig": base64.b64encode(signature).decode("ascii"),
            }
        ],
    }
    return canonical_bytes(envelope)
