"""The decision log's one spelling of a moment: fast, and the same as the format it names."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from pdp.clock import LOG_TIME_FORMAT, log_time, parse_log_time


def test_log_time_spells_every_moment_as_its_format_does_and_reads_back() -> None:
    rng = random.Random(18)
    span = int(
        (datetime(9999, 12, 31, tzinfo=UTC) - datetime(1000, 1, 1, tzinfo=UTC)).total_seconds()
    )
    for index in range(5000):
        moment = datetime(1000, 1, 1, tzinfo=UTC) + timedelta(
            seconds=rng.randrange(span), microseconds=rng.choice((0, rng.randrange(10**6)))
        )
        if index % 2:  # any zone: the log writes UTC
            moment = moment.astimezone(timezone(timedelta(minutes=rng.randrange(-720, 841))))
        spelled = log_time(moment)
        assert spelled == moment.astimezone(UTC).strftime(LOG_TIME_FORMAT)
        assert parse_log_time(spelled) == moment
