"""What both entry points share about their configuration: the one ``ConfigError``, and
reading a signed manifest (envelope) file an operator names.

Only entry points (``abc-pdp``, ``abc-pep``, ``abcctl``) read files and flags; they stop
with one line naming a ``ConfigError``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ConfigError", "read_envelope_file"]


class ConfigError(Exception):
    """A misconfiguration (bad trust store, missing key file, invalid flag).

    Not an ``AbcError``: it stops start-up loudly instead of becoming a denial.
    """


def read_envelope_file(path: Path) -> bytes:
    """The envelope in ``path``; ``ConfigError`` if it cannot be read.

    A file's last newline is how files end, not part of the envelope: it is dropped.
    """
    try:
        return path.read_bytes().rstrip(b"\n")
    except OSError as exc:
        raise ConfigError(f"cannot read envelope {path}: {exc.strerror}") from exc
