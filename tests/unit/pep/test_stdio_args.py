"""``abc-pep mcp-stdio`` flags: what cannot be honoured on stdio is refused at start-up."""

from __future__ import annotations

import pytest

from pdp.errors import ConfigError
from pep.main import _stdio_args


def test_a_narrower_is_refused_on_stdio_where_no_run_key_can_name_a_run() -> None:
    argv = ["--server", "kb", "--manifest", "m.json", "--narrower", "n.json", "--", "srv"]
    with pytest.raises(ConfigError, match="mcp-stdio takes no --narrower"):
        _stdio_args(argv)


def test_stdio_flags_without_a_narrower_are_read() -> None:
    config, server, command = _stdio_args(["--server", "kb", "--run", "run_1", "--", "srv", "-v"])
    assert (server, command, config.run, config.narrower) == ("kb", ["srv", "-v"], "run_1", None)
