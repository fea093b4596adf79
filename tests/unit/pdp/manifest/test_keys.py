"""Ed25519 keys: small-order refusal (the OpenSSL forgery trap), files, key ids."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pdp.errors import ConfigError
from pdp.manifest.keys import (
    is_small_order,
    keyid,
    load_private_key,
    load_public_key,
    public_key_from_raw,
    raw_public_key,
    write_keypair,
)

IDENTITY = bytes([1]) + bytes(31)
P = 2**255 - 19
# Every encoding of a point of order 1, 2, 4 or 8, canonical and not (y >= p), with both signs.
SMALL_ORDER = {
    "all-zero (order 4)": bytes(32),
    "identity (order 1)": IDENTITY,
    "order 8 a": bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    "order 8 b": bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    "order 8 a, sign set": bytes.fromhex(
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"
    ),
    "p-1 (order 2)": (P - 1).to_bytes(32, "little"),
    "p (non-canonical zero)": P.to_bytes(32, "little"),
    "p+1 (non-canonical identity)": (P + 1).to_bytes(32, "little"),
}
FORGED_SIGNATURE = IDENTITY + bytes(32)  # R = identity, S = 0


@pytest.mark.parametrize("raw", SMALL_ORDER.values(), ids=SMALL_ORDER.keys())
def test_small_order_keys_detected(raw: bytes) -> None:
    assert is_small_order(raw)
    with pytest.raises(ConfigError):
        public_key_from_raw(raw)


@pytest.mark.parametrize("raw", [IDENTITY, bytes(32)], ids=["identity", "all-zero"])
def test_the_trap_is_real_cryptography_verifies_forgeries_under_small_order_keys(
    raw: bytes,
) -> None:
    # If this ever stops verifying, the trap is fixed upstream; our refusal stays regardless.
    Ed25519PublicKey.from_public_bytes(raw).verify(FORGED_SIGNATURE, b"any message at all")


def test_generated_keys_are_not_small_order() -> None:
    for _ in range(64):
        raw = raw_public_key(Ed25519PrivateKey.generate().public_key())
        assert not is_small_order(raw)
        public_key_from_raw(raw)


@pytest.mark.parametrize("length", [0, 31, 33], ids=["empty", "short", "long"])
def test_wrong_length_key_refused(length: int) -> None:
    with pytest.raises(ConfigError):
        public_key_from_raw(bytes(length))


def test_keyid_is_sha256_of_raw_key() -> None:
    raw = raw_public_key(Ed25519PrivateKey.generate().public_key())
    import hashlib

    assert keyid(raw) == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_keypair_files_round_trip_with_private_mode(tmp_path: Path) -> None:
    key_path, pub_path, key_id = write_keypair(tmp_path / "keys", "signer")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in key_path.read_bytes()  # PKCS#8
    private, public = load_private_key(key_path), load_public_key(pub_path)
    assert raw_public_key(private.public_key()) == raw_public_key(public)
    assert keyid(raw_public_key(public)) == key_id


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    write_keypair(tmp_path, "signer")
    with pytest.raises(ConfigError, match="already exists"):
        write_keypair(tmp_path, "signer")


def test_small_order_public_key_file_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = Ed25519PublicKey.from_public_bytes(IDENTITY).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "evil.pub").write_bytes(pem)
    with pytest.raises(ConfigError, match="small-order"):
        load_public_key(tmp_path / "evil.pub")


@pytest.mark.parametrize(
    "content", [b"", b"not a key", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"]
)
def test_garbage_key_files_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "k").write_bytes(content)
    with pytest.raises(ConfigError):
        load_public_key(tmp_path / "k")
    with pytest.raises(ConfigError):
        load_private_key(tmp_path / "k")


def test_missing_key_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_private_key(tmp_path / "absent.key")
