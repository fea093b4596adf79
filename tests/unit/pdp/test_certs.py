"""``abcctl certs``: a chain that verifies, the right key usages and names, private keys."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from pdp.certs import CERT_FILES, write_dev_certs
from pdp.cli.main import main as abcctl
from pdp.errors import ConfigError


def cert(directory: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / name).read_bytes())


def store(directory: Path) -> verification.Store:
    return verification.Store([cert(directory, "ca.pem")])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    write_dev_certs(out, ["abc-pdp.abc.svc.cluster.local", "10.1.2.3"], days=30)
    return out


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("abc-pdp.abc.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
    ],
    ids=["localhost", "ipv4-loopback", "ipv6-loopback", "extra-dns", "extra-ip"],
)
def test_the_pdp_certificate_verifies_as_a_server_for_each_name(
    certs: Path, name: x509.GeneralName
) -> None:
    verifier = verification.PolicyBuilder().store(store(certs)).build_server_verifier(name)
    chain = verifier.verify(cert(certs, "pdp.pem"), [])
    assert chain[-1] == cert(certs, "ca.pem")


def test_the_pdp_certificate_is_not_good_for_other_names(certs: Path) -> None:
    verifier = (
        verification.PolicyBuilder()
        .store(store(certs))
        .build_server_verifier(x509.DNSName("evil.example"))
    )
    with pytest.raises(verification.VerificationError):
        verifier.verify(cert(certs, "pdp.pem"), [])


def test_the_pep_certificate_verifies_as_a_client_only(certs: Path) -> None:
    builder = verification.PolicyBuilder().store(store(certs))
    verified = builder.build_client_verifier().verify(cert(certs, "pep.pem"), [])
    assert verified.chain[-1] == cert(certs, "ca.pem")
    # Each leaf is good for its own side only: the EKU check refuses the swap.
    with pytest.raises(verification.VerificationError):
        builder.build_server_verifier(x509.DNSName("abc-pep")).verify(cert(certs, "pep.pem"), [])
    with pytest.raises(verification.VerificationError):
        builder.build_client_verifier().verify(cert(certs, "pdp.pem"), [])


def test_another_ca_does_not_verify_them(certs: Path, tmp_path: Path) -> None:
    write_dev_certs(tmp_path)
    builder = verification.PolicyBuilder().store(store(tmp_path))
    with pytest.raises(verification.VerificationError):
        builder.build_client_verifier().verify(cert(certs, "pep.pem"), [])
    with pytest.raises(verification.VerificationError):
        builder.build_server_verifier(x509.DNSName("localhost")).verify(cert(certs, "pdp.pem"), [])


def test_extensions_and_keys(certs: Path) -> None:
    ca, pdp, pep = (cert(certs, f"{name}.pem") for name in ("ca", "pdp", "pep"))
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_usage.key_cert_sign and not ca_usage.digital_signature
    for leaf, usage in (
        (pdp, ExtendedKeyUsageOID.SERVER_AUTH),
        (pep, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        assert leaf.issuer == ca.subject
        key = leaf.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert 30 * 86400 <= lifetime.total_seconds() <= 30 * 86400 + 3600
    names = pdp.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {
        "localhost",
        "abc-pdp.abc.svc.cluster.local",
    }
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "::1",
        "10.1.2.3",
    }


def test_private_keys_are_0600(certs: Path) -> None:
    modes = {name: stat.S_IMODE((certs / name).stat().st_mode) for name in CERT_FILES}
    assert {name for name, mode in modes.items() if mode & 0o077} <= {
        "ca.pem",
        "pdp.pem",
        "pep.pem",
    }
    assert modes["ca.key"] == modes["pdp.key"] == modes["pep.key"] == 0o600


def test_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert abcctl(["certs", "--out", str(tmp_path), "--days", "2"]) == 0
    before = {name: (tmp_path / name).read_bytes() for name in CERT_FILES}
    (tmp_path / "pep.key").unlink()  # one missing: still nothing is replaced
    capsys.readouterr()
    assert abcctl(["certs", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("abcctl: error: refusing to overwrite") and "ca.key" in err
    assert not (tmp_path / "pep.key").exists()
    assert all((tmp_path / n).read_bytes() == before[n] for n in CERT_FILES if n != "pep.key")

    (tmp_path / "ca.key").chmod(0o644)
    assert abcctl(["certs", "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() != before["ca.pem"]  # a new CA
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600  # re-created, not reused


@pytest.mark.parametrize(
    ("hosts", "days", "message"),
    [
        (["bad_name"], 30, "neither an IP address nor a DNS name"),
        (["-leading.example"], 30, "neither an IP address nor a DNS name"),
        ([], 0, "--days"),
        ([], 3651, "--days"),
    ],
    ids=["underscore", "leading-dash", "zero-days", "too-many-days"],
)
def test_bad_arguments_write_nothing(
    tmp_path: Path, hosts: list[str], days: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        write_dev_certs(tmp_path / "out", hosts, days=days)
    assert not (tmp_path / "out").exists()
