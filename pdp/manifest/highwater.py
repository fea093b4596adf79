"""Rollback protection: the highest manifest version accepted per lineage, persisted.

A version is admitted when it is above the lineage's mark, or equal to it with the
same manifest digest (the very manifest presented again, e.g. after a PDP restart,
is not a rollback). Anything else is refused with ``ManifestRollback``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Protocol

from pdp.errors import ManifestRollback

__all__ = ["HighWater", "SqliteHighWater"]


class HighWater(Protocol):
    def admit(self, lineage: str, version: int, manifest_digest: str) -> None:
        """Atomically check ``version`` against the mark and raise it.

        Raises ``ManifestRollback`` when the version is not admitted.
        """


class SqliteHighWater:
    """High-water marks in an SQLite file (WAL), safe across processes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS lineage_high_water ("
                " lineage TEXT PRIMARY KEY, version INTEGER NOT NULL,"
                " manifest_digest TEXT NOT NULL)"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self._path, timeout=10, isolation_level=None)

    def admit(self, lineage: str, version: int, manifest_digest: str) -> None:
        db = self._connect()
        try:
            # IMMEDIATE takes the write lock before reading: two admissions of the same
            # lineage cannot both read the old mark.
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT version, manifest_digest FROM lineage_high_water WHERE lineage = ?",
                (lineage,),
            ).fetchone()
            if row is not None:
                mark, mark_digest = int(row[0]), str(row[1])
                if version < mark or (version == mark and manifest_digest != mark_digest):
                    raise ManifestRollback(
                        f"lineage {lineage!r} version {version} is not above"
                        f" accepted version {mark}: raise version in the intent, freeze again"
                    )
            db.execute(
                "INSERT INTO lineage_high_water (lineage, version, manifest_digest)"
                " VALUES (?, ?, ?)"
                " ON CONFLICT(lineage) DO UPDATE SET version = excluded.version,"
                " manifest_digest = excluded.manifest_digest",
                (lineage, version, manifest_digest),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def mark(self, lineage: str) -> int | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT version FROM lineage_high_water WHERE lineage = ?", (lineage,)
            ).fetchone()
        return None if row is None else int(row[0])
