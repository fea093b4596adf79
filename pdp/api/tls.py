"""The TLS material of the gRPC contract, loaded the same way by both ends.

Files are parsed before they reach grpc: grpc accepts any bytes and only fails at the
first handshake, with an error that names neither the file nor the problem. Here a
wrong file stops start-up with one line naming it. Messages never quote key material.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["TlsFileError", "is_loopback", "load_certificates", "load_key_pair"]


class TlsFileError(ValueError):
    """A certificate or key file that cannot serve; each side turns it into its ConfigError."""


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"cannot read {flag} {path}: {exc.strerror}") from exc


def load_certificates(path: Path, flag: str) -> bytes:
    """PEM bytes holding at least one certificate (a chain or a CA bundle)."""
    data = _read(path, flag)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TlsFileError(f"{flag} {path}: not a PEM certificate file") from exc
    return data


def load_key_pair(
    cert_path: Path, key_path: Path, cert_flag: str, key_flag: str, now: datetime
) -> tuple[bytes, bytes]:
    """(certificate chain PEM, private key PEM), checked to belong together and be in date
    at ``now`` (the caller's clock read)."""
    chain = load_certificates(cert_path, cert_flag)
    key_pem = _read(key_path, key_flag)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        # TypeError: an encrypted key; grpc has no way to ask for its passphrase.
        raise TlsFileError(f"{key_flag} {key_path}: not an unencrypted PEM private key") from exc
    leaf = x509.load_pem_x509_certificates(chain)[0]
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise TlsFileError(f"{key_flag} {key_path} is not the key of {cert_flag} {cert_path}")
    if leaf.not_valid_after_utc <= now:
        # Every handshake would fail anyway; say so once, at start-up, by name.
        raise TlsFileError(
            f"{cert_flag} {cert_path} expired at {leaf.not_valid_after_utc.isoformat()}"
        )
    return chain, key_pem


def is_loopback(address: str) -> bool:
    """True when ``HOST:PORT`` can only be reached from this machine."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that DNS resolves elsewhere, or a wildcard: assume reachable
