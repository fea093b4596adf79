"""No validating regular expression admits a trailing newline (``$`` does; fullmatch does not)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pdp.action import validate_action
from pdp.certs import _host_name
from pdp.errors import BadRequest, ConfigError
from pdp.manifest.intent import _duration
from pdp.manifest.model import parse_timestamp


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (parse_timestamp, "2026-11-22T10:00:00Z\n"),
        (_duration, "8h\n"),
        (_host_name, "pdp.internal\n"),
    ],
    ids=["timestamp", "duration", "dns-name"],
)
def test_a_trailing_newline_is_refused(check: Callable[[str], Any], value: str) -> None:
    check(value.rstrip("\n"))  # the same value without it is fine
    with pytest.raises((ValueError, ConfigError)):
        check(value)


@pytest.mark.parametrize(
    ("kind", "target"),
    [("model", "model:openai/gpt-4o-mini\n"), ("tool", "tool:kb/search\n"), ("step", "step:a\n")],
)
def test_a_target_with_a_trailing_newline_is_a_bad_request(kind: str, target: str) -> None:
    validate_action(kind, target.rstrip("\n"))
    with pytest.raises(BadRequest):
        validate_action(kind, target)
