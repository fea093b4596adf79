"""``abcctl certs``: a development CA and the PDP's server and the PEP's client certificates.

ECDSA P-256 keys: every TLS stack accepts them (grpc's BoringSSL included), which is not
yet true of Ed25519 certificates. The CA may sign only end-entity certificates
(``pathLen 0``); the server certificate is good only for server authentication and the
client certificate only for client authentication, so a stolen PEP key cannot pose as
the PDP and the other way round.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdp.clock import utc_now
from pdp.errors import ConfigError

__all__ = ["CERT_FILES", "DEFAULT_DAYS", "DEFAULT_PDP_HOSTS", "PEP_NAME", "write_dev_certs"]

CERT_FILES = ("ca.pem", "ca.key", "pdp.pem", "pdp.key", "pep.pem", "pep.key")
DEFAULT_PDP_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 365
MAX_DAYS = 3650
PEP_NAME = "abc-pep"
# Certificates start a little in the past so that a peer whose clock is slightly behind
# does not refuse a certificate made a second ago.
_BACKDATE = timedelta(minutes=5)
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

_Key = ec.EllipticCurvePrivateKey


def _host_name(host: str) -> x509.GeneralName:
    """A SAN entry: an IP address where ``host`` is one, else a validated DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"--pdp-host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.rstrip(".").lower())


def _builder(
    subject: str, issuer: x509.Name, key: _Key, now: datetime, days: int
) -> x509.CertificateBuilder:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _ca(key: _Key, now: datetime, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ABC development CA")])
    return (
        _builder("ABC development CA", name, key, now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .sign(key, hashes.SHA256())
    )


def _leaf(
    ca: x509.Certificate,
    ca_key: _Key,
    key: _Key,
    subject: str,
    names: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    now: datetime,
    days: int,
) -> x509.Certificate:
    return (
        _builder(subject, ca.subject, key, now, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _key_pem(key: _Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start: a key is never readable by others."""
    path.unlink(missing_ok=True)  # with --force: O_EXCL below then applies the mode afresh
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_dev_certs(
    out: Path,
    pdp_hosts: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> list[Path]:
    """Write ``CERT_FILES`` into ``out``; return their paths.

    Refuses (before writing anything) to replace existing files unless ``force``: a new CA
    silently invalidates every certificate the old one signed.
    """
    if not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"--days must be between 1 and {MAX_DAYS}, got {days}")
    hosts = list(dict.fromkeys([*DEFAULT_PDP_HOSTS, *pdp_hosts]))
    names = [_host_name(host) for host in hosts]
    paths = [out / name for name in CERT_FILES]
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise ConfigError(
            f"refusing to overwrite existing {', '.join(existing)} (--force replaces them)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {out}: {exc.strerror}") from exc
    now = utc_now().replace(microsecond=0)
    ca_key, pdp_key, pep_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _ca(ca_key, now, days)
    pdp = _leaf(ca, ca_key, pdp_key, "abc-pdp", names, ExtendedKeyUsageOID.SERVER_AUTH, now, days)
    pep = _leaf(
        ca,
        ca_key,
        pep_key,
        PEP_NAME,
        [x509.DNSName(PEP_NAME)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        now,
        days,
    )
    contents = {
        "ca.pem": (_cert_pem(ca), 0o644),
        "ca.key": (_key_pem(ca_key), 0o600),
        "pdp.pem": (_cert_pem(pdp), 0o644),
        "pdp.key": (_key_pem(pdp_key), 0o600),
        "pep.pem": (_cert_pem(pep), 0o644),
        "pep.key": (_key_pem(pep_key), 0o600),
    }
    try:
        for path in paths:
            data, mode = contents[path.name]
            _write(path, data, mode)
    except OSError as exc:
        raise ConfigError(f"cannot write into {out}: {exc.strerror}") from exc
    return paths
