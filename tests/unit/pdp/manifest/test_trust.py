"""Trust store files: round trip, refusal of bad entries and small-order keys."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.errors import ConfigError
from pdp.manifest.keys import keyid
from pdp.manifest.trust import TrustStore, load_trust_store, save_trust_store
from tests.factories import NOW, trust_entry


def _saved(tmp_path: Path, store: TrustStore) -> Path:
    path = tmp_path / "trust.yaml"
    save_trust_store(store, path)
    return path


def test_round_trip(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    entry = trust_entry(key, ("acme", "globex"), modes=("enforce", "shadow"))
    loaded = load_trust_store(_saved(tmp_path, TrustStore((entry,))))
    (only,) = loaded.entries
    assert only.keyid == entry.keyid
    assert only.tenants == {"acme", "globex"}
    assert only.modes == {"enforce", "shadow"}
    assert only.usable_at(NOW)


def test_revoke(tmp_path: Path) -> None:
    entry = trust_entry(Ed25519PrivateKey.generate())
    path = _saved(tmp_path, TrustStore((entry,)).revoke(entry.keyid))
    assert not load_trust_store(path).entries[0].usable_at(NOW)


def _edit(tmp_path: Path, change: object) -> Path:
    path = _saved(tmp_path, TrustStore((trust_entry(Ed25519PrivateKey.generate()),)))
    document = yaml.safe_load(path.read_text())
    change(document["keys"][0])  # type: ignore[operator]
    path.write_text(yaml.safe_dump(document))
    return path


IDENTITY = bytes([1]) + bytes(31)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda e: e.update(
                public_key=base64.b64encode(IDENTITY).decode(), keyid=keyid(IDENTITY)
            ),
            "small-order",
        ),
        (
            lambda e: e.update(
                public_key=base64.b64encode(bytes(32)).decode(), keyid=keyid(bytes(32))
            ),
            "small-order",
        ),
        (lambda e: e.update(keyid="sha256:" + "0" * 64), "keyid does not match"),
        (lambda e: e.update(tenants=[]), "tenants"),
        (lambda e: e.update(not_after=e["not_before"]), "not_after"),
        (lambda e: e.update(not_after="tomorrow"), "not_after"),
        (lambda e: e.update(modes=["yolo"]), "modes"),
        (lambda e: e.update(public_key="!!"), "base64"),
        (lambda e: e.update(revoked="no"), "revoked"),
    ],
    ids=[
        "identity-key",
        "zero-key",
        "keyid-mismatch",
        "no-tenants",
        "empty-window",
        "bad-timestamp",
        "unknown-mode",
        "bad-base64",
        "revoked-not-bool",
    ],
)
def test_bad_entries_stop_loading(tmp_path: Path, change: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_trust_store(_edit(tmp_path, change))


def test_same_key_twice_refused(tmp_path: Path) -> None:
    entry = trust_entry(Ed25519PrivateKey.generate())
    with pytest.raises(ConfigError, match="already"):
        TrustStore((entry,)).with_entry(entry)


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_trust_store(tmp_path / "absent.yaml")


def test_empty_file_trusts_nothing(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("")
    assert load_trust_store(tmp_path / "t.yaml").entries == ()
