"""abc-pep configuration: flags over environment over file over defaults; mistakes stop start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from pep.config import ConfigError, parse_config, transport_warnings


def test_defaults_are_loopback_and_fail_closed() -> None:
    config = parse_config([], environ={})
    assert config.listen == "127.0.0.1:15001" and config.metrics == "127.0.0.1:15090"
    assert config.pdp_deadline_seconds == 0.25 and config.settle_linger_seconds == 0.1
    assert parse_config([], {"ABC_PEP_SETTLE_LINGER_MS": "2000"}).settle_linger_seconds == 2.0
    assert config.run is None and config.upstreams == {}
    assert config.pdp_ca is config.pdp_cert is config.pdp_key is config.pdp_server_name is None
    assert transport_warnings(config) == []  # a loopback PDP in plaintext is the dev setup


def test_pdp_tls_from_flags_environment_and_file(tmp_path: Path) -> None:
    file = tmp_path / "pep.yaml"
    file.write_text("pdp_ca: /f/ca.pem\npdp_cert: /f/pep.pem\npdp_key: /f/pep.key\n")
    from_file = parse_config(["--config", str(file)], environ={})
    assert (from_file.pdp_ca, from_file.pdp_cert, from_file.pdp_key) == (
        Path("/f/ca.pem"),
        Path("/f/pep.pem"),
        Path("/f/pep.key"),
    )
    mixed = parse_config(
        ["--config", str(file), "--pdp-key", "/flag/pep.key"],
        environ={"ABC_PEP_PDP_CERT": "/env/pep.pem", "ABC_PEP_PDP_SERVER_NAME": "abc-pdp"},
    )
    assert mixed.pdp_ca == Path("/f/ca.pem")
    assert mixed.pdp_cert == Path("/env/pep.pem") and mixed.pdp_key == Path("/flag/pep.key")
    assert mixed.pdp_server_name == "abc-pdp"


@pytest.mark.parametrize(
    ("pdp", "tls", "warned"),
    [
        ("127.0.0.1:9191", [], False),
        ("abc-pdp:9191", [], True),
        ("10.0.0.7:9191", [], True),
        ("abc-pdp:9191", ["--pdp-ca", "ca.pem"], False),
    ],
)
def test_a_remote_pdp_in_plaintext_is_warned_about(pdp: str, tls: list[str], warned: bool) -> None:
    warnings = transport_warnings(parse_config(["--pdp", pdp, *tls], environ={}))
    assert bool(warnings) is warned
    assert all(pdp in warning and "without TLS" in warning for warning in warnings)


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
        (["--upstream", "openai=https://u:p@api.example"], "credentials in the URL"),
        (["--upstream", "mcp:=http://x"], "expected openai"),
        (["--listen", "nowhere"], "HOST:PORT"),
        (["--run", "r", "--manifest", "m.json"], "not both"),
        (["--narrower", "n.json"], "--narrower narrows the runs of --manifest"),
        (["--pdp-deadline-ms", "0"], "1..60000"),
        (["--settle-linger-ms", "60000"], "--settle-linger-ms must be 0..10000"),
        (["--config", "/nonexistent/pep.yaml"], "cannot read"),
        (["--pdp-ca", "ca", "--pdp-cert", "c"], "--pdp-cert and --pdp-key go together"),
        (["--pdp-ca", "ca", "--pdp-key", "k"], "--pdp-cert and --pdp-key go together"),
        (["--pdp-cert", "c", "--pdp-key", "k"], "need --pdp-ca"),
        (["--pdp-server-name", "abc-pdp"], "--pdp-server-name needs --pdp-ca"),
        (["--pdp-decide", "pdp:9193", "--pdp-ca", "ca"], "--pdp-decide needs --pdp-ca, --pdp-"),
        (["--pdp-decide", "pdp:9193"], "--pdp-decide needs --pdp-ca, --pdp-cert"),
        (["--pdp-decide", "pdp"], "--pdp-decide must be HOST:PORT"),
        (
            ["--pdp-decide", "pdp:9193", "--pdp-socket", "/run/abc/d.sock"],
            "--pdp-socket or --pdp-decide, not both",
        ),
    ],
    ids=[
        "unknown-kind",
        "bad-scheme",
        "credentials-in-url",
        "empty-server",
        "bad-listen",
        "run-and-manifest",
        "narrower-without-manifest",
        "zero-deadline",
        "linger-too-long",
        "missing-file",
        "tls-cert-without-key",
        "tls-key-without-cert",
        "tls-client-pair-without-ca",
        "tls-server-name-without-ca",
        "decide-tls-without-client-certificate",
        "decide-tls-without-tls",
        "decide-tls-without-port",
        "decide-tls-and-socket",
    ],
)
def test_mistakes_are_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(argv, environ={})


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("openai=https://api.openai.com/v1", ("openai", "https://api.openai.com")),
        ("openai=http://gw:8/openai/v1/", ("openai", "http://gw:8/openai")),
        ("openai=https://api.openai.com", ("openai", "https://api.openai.com")),
        ("anthropic=https://api.anthropic.com/v1", ("anthropic", "https://api.anthropic.com")),
        ("http:billing=http://b:1/v1", ("http:billing", "http://b:1/v1")),
    ],
)
def test_model_upstreams_take_the_sdk_base_url_form(given: str, kept: tuple[str, str]) -> None:
    # The agent's path already starts with /v1/: a base URL ending in /v1 (what the OpenAI SDK
    # documents) would forward to /v1/v1/chat/completions, an allowed and charged 404.
    assert parse_config(["--upstream", given]).upstreams == dict([kept])


def test_the_decide_socket_is_off_unless_given_by_flag_environment_or_file(
    tmp_path: Path,
) -> None:
    assert parse_config([], environ={}).pdp_socket is None
    file = tmp_path / "pep.yaml"
    file.write_text("pdp_socket: /run/abc/file.sock\n")
    assert parse_config(["--config", str(file)], environ={}).pdp_socket == Path(
        "/run/abc/file.sock"
    )
    environ = {"ABC_PEP_PDP_SOCKET": "/run/abc/env.sock"}
    assert parse_config([], environ=environ).pdp_socket == Path("/run/abc/env.sock")
    flag = parse_config(["--pdp-socket", "/run/abc/flag.sock"], environ=environ)
    assert flag.pdp_socket == Path("/run/abc/flag.sock")


def test_a_socket_path_longer_than_a_unix_socket_takes_stops_start_up() -> None:
    longest = "/" + "s" * 106
    assert parse_config(["--pdp-socket", longest], environ={}).pdp_socket == Path(longest)
    with pytest.raises(ConfigError, match="at most 107 bytes"):
        parse_config(["--pdp-socket", longest + "s"], environ={})


def test_decisions_over_tls_take_the_pdp_channels_files() -> None:
    tls = ["--pdp-ca", "ca.pem", "--pdp-cert", "pep.pem", "--pdp-key", "pep.key"]
    config = parse_config(["--pdp-decide", "abc-pdp:9193", *tls], environ={})
    assert config.pdp_decide == "abc-pdp:9193" and config.pdp_socket is None
    environ = {"ABC_PEP_PDP_DECIDE": "[::1]:9193"}
    assert parse_config(tls, environ=environ).pdp_decide == "[::1]:9193"
    assert parse_config(tls, environ={}).pdp_decide is None
