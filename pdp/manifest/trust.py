"""The trust store: the only source of keys a PDP accepts.

YAML, one entry per key::

    apiVersion: abc/v1
    kind: TrustStore
    keys:
      - keyid: sha256:...          # checked against public_key on load
        public_key: <base64 of the raw 32-byte key>
        tenants: [acme]            # scope: manifests of these tenants only
        modes: [enforce]           # add "shadow" to let this key sign shadow manifests
        not_before: 2026-11-22T00:00:00Z
        not_after: 2027-11-22T00:00:00Z
        revoked: false

Loading refuses (``ConfigError``) a malformed entry, a key id that does not match
its key, and small-order keys: a bad trust store stops start-up, it never
quietly trusts less or more.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import Field, ValidationError

from pdp.errors import ConfigError
from pdp.manifest._yaml import load_yaml
from pdp.manifest.keys import keyid, public_key_from_raw, raw_public_key
from pdp.manifest.model import Name, Timestamp, _Strict, format_timestamp, parse_timestamp

__all__ = ["TrustEntry", "TrustStore", "load_trust_store", "save_trust_store"]


class _EntryDoc(_Strict):
    keyid: str
    public_key: str
    tenants: tuple[Name, ...] = Field(min_length=1)
    modes: tuple[Literal["enforce", "shadow"], ...] = ("enforce",)
    not_before: Timestamp
    not_after: Timestamp
    revoked: bool = False
    comment: Annotated[str, Field(max_length=500)] = ""


class _StoreDoc(_Strict):
    apiVersion: Literal["abc/v1"] = "abc/v1"  # noqa: N815 - wire name
    kind: Literal["TrustStore"] = "TrustStore"
    keys: tuple[_EntryDoc, ...] = ()


@dataclass(frozen=True)
class TrustEntry:
    keyid: str
    public_key: Ed25519PublicKey
    tenants: frozenset[str]
    modes: frozenset[str]
    not_before: datetime
    not_after: datetime
    revoked: bool
    comment: str = ""

    def usable_at(self, now: datetime) -> bool:
        """Not revoked and inside its validity window at ``now``."""
        return not self.revoked and self.not_before <= now < self.not_after


@dataclass(frozen=True)
class TrustStore:
    entries: tuple[TrustEntry, ...]

    def candidates(self, claimed_keyid: str, now: datetime) -> list[TrustEntry]:
        """Keys usable at ``now``, the one the (unauthenticated) key id names first.

        The key id only orders the search; every usable key is still a candidate,
        so a wrong or missing hint cannot make a good signature fail.
        """
        usable = [entry for entry in self.entries if entry.usable_at(now)]
        return sorted(usable, key=lambda entry: entry.keyid != claimed_keyid)

    def with_entry(self, entry: TrustEntry) -> TrustStore:
        if any(existing.keyid == entry.keyid for existing in self.entries):
            raise ConfigError(f"key {entry.keyid} is already in the trust store")
        return TrustStore((*self.entries, entry))

    def revoke(self, key_id: str) -> TrustStore:
        if not any(entry.keyid == key_id for entry in self.entries):
            raise ConfigError(f"key {key_id} is not in the trust store")
        return TrustStore(
            tuple(replace(e, revoked=True) if e.keyid == key_id else e for e in self.entries)
        )


def _entry(doc: _EntryDoc, where: str) -> TrustEntry:
    try:
        raw = base64.b64decode(doc.public_key, validate=True)
    except binascii.Error as exc:
        raise ConfigError(f"{where}: public_key is not base64") from exc
    try:
        key = public_key_from_raw(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if keyid(raw) != doc.keyid:
        raise ConfigError(f"{where}: keyid does not match public_key")
    not_before, not_after = parse_timestamp(doc.not_before), parse_timestamp(doc.not_after)
    if not_after <= not_before:
        raise ConfigError(f"{where}: not_after must be after not_before")
    return TrustEntry(
        keyid=doc.keyid,
        public_key=key,
        tenants=frozenset(doc.tenants),
        modes=frozenset(doc.modes),
        not_before=not_before,
        not_after=not_after,
        revoked=doc.revoked,
        comment=doc.comment,
    )


def load_trust_store(path: Path) -> TrustStore:
    """Load and check a trust store file; ``ConfigError`` names the file and entry."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read trust store {path}: {exc}") from exc
    document = load_yaml(text, str(path))
    try:
        store = _StoreDoc.model_validate_json(
            json.dumps(document.data if document.data is not None else {})
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        dotted = ".".join(str(part) for part in loc)
        raise ConfigError(f"{document.where(loc)}: {dotted}: {first['msg']}") from exc
    entries = tuple(_entry(doc, f"{path}: keys[{i}]") for i, doc in enumerate(store.keys))
    if len({entry.keyid for entry in entries}) != len(entries):
        raise ConfigError(f"{path}: the same key is listed twice")
    return TrustStore(entries)


def save_trust_store(store: TrustStore, path: Path) -> None:
    """Write the trust store atomically (write a temporary file, then rename)."""
    document = {
        "apiVersion": "abc/v1",
        "kind": "TrustStore",
        "keys": [
            {
                "keyid": entry.keyid,
                "public_key": base64.b64encode(raw_public_key(entry.public_key)).decode("ascii"),
                "tenants": sorted(entry.tenants),
                "modes": sorted(entry.modes),
                "not_before": format_timestamp(entry.not_before),
                "not_after": format_timestamp(entry.not_after),
                "revoked": entry.revoked,
                **({"comment": entry.comment} if entry.comment else {}),
            }
            for entry in store.entries
        ],
    }
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    temporary.replace(path)
