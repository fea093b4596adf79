"""The clock, and the one spelling of a moment in the decision log.

Only servers and the CLI read the clock, once per request, and pass ``now`` down; every
layer below takes time as an argument (a decision can then be replayed at its time).
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["LOG_TIME_FORMAT", "log_time", "parse_log_time", "utc_now"]

# Microseconds, always UTC: records written within one second still order by time.
LOG_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC: the default clock of every door."""
    return datetime.now(UTC)


def log_time(moment: datetime) -> str:
    """``moment`` as the decision log writes it (``LOG_TIME_FORMAT``)."""
    # isoformat, not strftime: the same spelling for years 1000 to 9999, at a tenth of the
    # cost, and each request writes several.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def parse_log_time(text: str) -> datetime:
    """A decision-log time back as an aware UTC datetime; ``ValueError`` if malformed."""
    return datetime.strptime(text, LOG_TIME_FORMAT).replace(tzinfo=UTC)
