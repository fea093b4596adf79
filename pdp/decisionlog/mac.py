"""Record MACs: what lets the PDP tell its own unsigned tail from one written by others.

Checkpoints sign the chain, so anything before the last one is the PDP's. The records
after it (a crash's tail) are signed by nothing, and at start-up the PDP replays them and
its next checkpoint signs them: a line appended while it was stopped would be adopted
and laundered. So every record the writer appends carries a MAC, ``~mac``: HMAC-SHA256
(cut to 128 bits) over the record's canonical line without it, keyed by a secret derived
from the log's private key. ``~`` sorts after every other key, so the line stays the
canonical JSON of its fields and ends with it. Only the PDP holds the key: start-up checks
the tail's MACs; ``audit verify``, holding the public key only, checks checkpoints as ever.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["MAC_FIELD", "carries_mac", "mac_key", "with_mac"]

MAC_FIELD = "~mac"
_PREFIX = b',"' + MAC_FIELD.encode() + b'":"'
_HEX = 32  # 128 bits
_SUFFIX_LENGTH = len(_PREFIX) + _HEX + 2  # ,"~mac":"<hex>"}


def mac_key(log_key: Ed25519PrivateKey) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"abc decision-log record mac v1"
    ).derive(log_key.private_bytes_raw())


def _mac(key: bytes, line: bytes) -> bytes:
    return hmac.new(key, line, hashlib.sha256).hexdigest()[:_HEX].encode("ascii")


def with_mac(line: bytes, key: bytes) -> bytes:
    """``line`` (a record's canonical JSON object) with its MAC as the last field."""
    return line[:-1] + _PREFIX + _mac(key, line) + b'"}'


def carries_mac(line: bytes, key: bytes) -> bool:
    """Whether ``line`` carries a MAC made with ``key`` over the rest of it."""
    if len(line) <= _SUFFIX_LENGTH or not line.endswith(b'"}'):
        return False
    body, suffix = line[:-_SUFFIX_LENGTH] + b"}", line[-_SUFFIX_LENGTH:]
    if not suffix.startswith(_PREFIX):
        return False
    return hmac.compare_digest(suffix[len(_PREFIX) : -2], _mac(key, body))
