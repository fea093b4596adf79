"""abc-pep configuration: flags over environment over file over defaults; mistakes stop start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from pep.config import ConfigError, parse_config


def test_defaults_are_loopback_and_fail_closed() -> None:
    config = parse_config([], environ={})
    assert config.listen == "127.0.0.1:15001" and config.metrics == "127.0.0.1:15090"
    assert config.pdp_deadline_seconds == 0.25
    assert config.run is None and config.upstreams == {}


def test_precedence(tmp_path: Path) -> None:
    file = tmp_path / "pep.yaml"
    file.write_text("pdp: 10.0.0.1:1\nrun: from-file\nupstreams:\n  openai: http://file:1\n")
    config = parse_config(
        ["--config", str(file), "--pdp", "127.0.0.1:2"],
        environ={"ABC_PEP_PDP": "127.0.0.1:3", "ABC_PEP_RUN": "from-env"},
    )
    assert config.pdp == "127.0.0.1:2"  # flag beats environment
    assert config.run == "from-env"  # environment beats file
    assert config.upstreams == {"openai": "http://file:1"}  # file beats nothing


def test_upstreams_from_flags_and_environment() -> None:
    config = parse_config(
        ["--upstream", "mcp:kb=http://127.0.0.1:9/mcp", "--upstream", "http:billing=http://b:1/"],
        environ={},
    )
    assert config.upstreams == {"mcp:kb": "http://127.0.0.1:9/mcp", "http:billing": "http://b:1"}
    env = parse_config([], environ={"ABC_PEP_UPSTREAMS": "openai=http://o:1,anthropic=http://a:2"})
    assert set(env.upstreams) == {"openai", "anthropic"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--upstream", "gemini=http://x"], "expected openai"),
        (["--upstream", "openai=ftp://x"], "not an http"),
        (["--upstream", "mcp:=http://x"], "expected openai"),
        (["--listen", "nowhere"], "HOST:PORT"),
        (["--run", "r", "--manifest", "m.json"], "not both"),
        (["--pdp-deadline-ms", "0"], "1..60000"),
        (["--config", "/nonexistent/pep.yaml"], "cannot read"),
    ],
    ids=[
        "unknown-kind",
        "bad-scheme",
        "empty-server",
        "bad-listen",
        "run-and-manifest",
        "zero-deadline",
        "missing-file",
    ],
)
def test_mistakes_are_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(argv, environ={})
