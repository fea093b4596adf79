"""Helpers every ``abcctl`` command module shares: times, file reading and writing."""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from pdp.clock import utc_now
from pdp.errors import ConfigError
from pdp.manifest.model import parse_timestamp

__all__ = ["STATE_DB", "now", "timestamp_arg", "write_file"]

STATE_DB = "abc.db"


def now() -> datetime:
    # Whole seconds: manifests and trust entries spell their times without fractions.
    return utc_now().replace(microsecond=0)


def timestamp_arg(text: str) -> datetime:
    try:
        return parse_timestamp(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` whole or not at all (a temporary file renamed over ``path``)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(data)
        temporary.replace(path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
