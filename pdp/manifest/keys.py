"""Ed25519 keys: generation, files, key ids, and the small-order check.

OpenSSL (and so ``cryptography``) accepts any 32-byte public key. Under a
small-order key such as the identity point, the signature R=identity, S=0
verifies for every message, so such keys are refused on import, by the curve
arithmetic below rather than a hand-copied blocklist.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from pdp.errors import ConfigError, SignatureInvalid

__all__ = [
    "is_small_order",
    "keyid",
    "load_private_key",
    "load_public_key",
    "public_key_from_raw",
    "raw_public_key",
    "verify_signature",
    "write_keypair",
]

_P = 2**255 - 19
_D = (-121665 * pow(121666, -1, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)

_Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T)


def _decode_point(raw: bytes) -> _Point | None:
    """RFC 8032 5.1.3 point decoding; None for a non-canonical or off-curve encoding."""
    if len(raw) != 32:
        return None
    encoded = int.from_bytes(raw, "little")
    sign = encoded >> 255
    y = encoded & ((1 << 255) - 1)
    if y >= _P:
        return None
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    if (v * x * x - u) % _P != 0:
        x = (x * _SQRT_M1) % _P
        if (v * x * x - u) % _P != 0:
            return None
    if x == 0 and sign == 1:
        return None
    if x & 1 != sign:
        x = _P - x
    return (x, y, 1, (x * y) % _P)


def _double(point: _Point) -> _Point:
    x1, y1, z1, _ = point
    a = x1 * x1 % _P
    b = y1 * y1 % _P
    c = 2 * z1 * z1 % _P
    h = (a + b) % _P
    e = (h - (x1 + y1) * (x1 + y1)) % _P
    g = (a - b) % _P
    f = (c + g) % _P
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def is_small_order(raw: bytes) -> bool:
    """True if ``raw`` is not a canonical encoding of a point of large order.

    A point P has small order when [8]P is the identity (X = 0, Y = Z).
    Undecodable and non-canonical encodings count as unusable too.
    """
    point = _decode_point(raw)
    if point is None:
        return True
    for _ in range(3):
        point = _double(point)
    x, y, z, _ = point
    return x % _P == 0 and (y - z) % _P == 0


def keyid(raw_public_key: bytes) -> str:
    """The key id: ``sha256:`` of the raw 32-byte public key. Only ever a hint."""
    return "sha256:" + hashlib.sha256(raw_public_key).hexdigest()


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    """Import a raw public key, refusing small-order and malformed keys (``ConfigError``)."""
    if len(raw) != 32:
        raise ConfigError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    if is_small_order(raw):
        raise ConfigError("small-order or malformed Ed25519 public key refused")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_signature(key: Ed25519PublicKey, signature: bytes, message: bytes) -> None:
    """Raise ``SignatureInvalid`` unless ``signature`` is ``key``'s over ``message``."""
    try:
        key.verify(signature, message)
    except InvalidSignature as exc:
        raise SignatureInvalid("signature does not verify") from exc


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a PKCS#8 PEM Ed25519 private key."""
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PKCS#8 PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a SubjectPublicKeyInfo PEM Ed25519 public key, refusing small-order keys."""
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    try:
        return public_key_from_raw(raw_public_key(key))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def write_keypair(directory: Path, name: str) -> tuple[Path, Path, str]:
    """Write ``DIR/NAME.key`` (PKCS#8 PEM, 0600) and ``DIR/NAME.pub``; return paths and key id.

    Refuses to overwrite: replacing a signing key silently is never what was meant.
    """
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"invalid key name {name!r}")
    directory.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (key_path, pub_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL + 0600 at creation: the key is never readable by others, not even briefly.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public = private.public_key()
    pub_path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_path, pub_path, keyid(raw_public_key(public))
