"""TLS files are checked at start-up, by name, before grpc would fail at the first handshake."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pdp.api.tls import TlsFileError, is_loopback, load_certificates, load_key_pair
from pdp.certs import write_dev_certs

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    write_dev_certs(out)
    return out


def test_a_matching_pair_loads(certs: Path) -> None:
    chain, key = load_key_pair(certs / "pdp.pem", certs / "pdp.key", "--tls-cert", "--tls-key", NOW)
    assert chain == (certs / "pdp.pem").read_bytes() and key == (certs / "pdp.key").read_bytes()
    assert load_certificates(certs / "ca.pem", "--pdp-ca") == (certs / "ca.pem").read_bytes()


def test_a_key_of_another_certificate_is_refused(certs: Path) -> None:
    with pytest.raises(TlsFileError, match=r"pep\.key is not the key of --tls-cert .*pdp\.pem"):
        load_key_pair(certs / "pdp.pem", certs / "pep.key", "--tls-cert", "--tls-key", NOW)


def test_files_swapped_or_missing_are_named(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(TlsFileError, match=r"--tls-cert .*pdp\.key: not a PEM certificate"):
        load_key_pair(certs / "pdp.key", certs / "pdp.pem", "--tls-cert", "--tls-key", NOW)
    with pytest.raises(TlsFileError, match=r"--tls-key .*: not an unencrypted PEM private key"):
        load_key_pair(certs / "pdp.pem", certs / "pdp.pem", "--tls-cert", "--tls-key", NOW)
    with pytest.raises(TlsFileError, match=r"cannot read --pdp-ca .*absent\.pem"):
        load_certificates(tmp_path / "absent.pem", "--pdp-ca")


def test_an_encrypted_key_is_refused_without_quoting_it(certs: Path, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key((certs / "pep.key").read_bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / "pep.key").write_bytes(encrypted)
    with pytest.raises(TlsFileError) as caught:
        load_key_pair(certs / "pep.pem", tmp_path / "pep.key", "--pdp-cert", "--pdp-key", NOW)
    assert "unencrypted" in str(caught.value) and "BEGIN" not in str(caught.value)


def test_an_expired_certificate_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = datetime.now(UTC)
    old = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=10))
        .not_valid_after(now - timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "old.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "old.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(TlsFileError, match="expired at"):
        load_key_pair(tmp_path / "old.pem", tmp_path / "old.key", "--tls-cert", "--tls-key", NOW)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:9191", True),
        ("127.3.4.5:9191", True),
        ("localhost:9191", True),
        ("[::1]:9191", True),
        ("0.0.0.0:9191", False),
        ("[::]:9191", False),
        ("10.0.0.7:9191", False),
        ("abc-pdp:9191", False),
        ("localhost.evil.example:9191", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback
