"""What both entry points share about their configuration: the one ``ConfigError``,
``HOST:PORT`` addresses, and reading a signed manifest (envelope) file an operator names.

Only entry points (``abc-pdp``, ``abc-pep``, ``abcctl``) read files and flags; they stop
with one line naming a ``ConfigError``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ConfigError", "host_port", "read_envelope_file", "split_host_port"]


class ConfigError(Exception):
    """A misconfiguration (bad trust store, missing key file, invalid flag).

    Not an ``AbcError``: it stops start-up loudly instead of becoming a denial.
    """


def host_port(value: str, flag: str) -> str:
    """``value``, checked to be HOST:PORT with a port in 1..65535; ``ConfigError`` naming
    ``flag`` otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag} must be HOST:PORT, got {value!r}")
    return value


def split_host_port(checked: str) -> tuple[str, int]:
    """(host, port) of an address ``host_port`` checked; an IPv6 host without its brackets."""
    host, _, port = checked.rpartition(":")
    return host.strip("[]"), int(port)


def read_envelope_file(path: Path) -> bytes:
    """The envelope in ``path``; ``ConfigError`` if it cannot be read.

    A file's last newline is how files end, not part of the envelope: it is dropped.
    """
    try:
        return path.read_bytes().rstrip(b"\n")
    except OSError as exc:
        raise ConfigError(f"cannot read envelope {path}: {exc.strerror}") from exc
