"""abc-pdp configuration: TLS flags come in valid combinations; an exposed port is warned about."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdp.errors import ConfigError
from pdp.server.config import parse_config, transport_warnings

REQUIRED = ["--trust", "t.yaml", "--policies", "p", "--state", "s"]


def test_defaults_are_loopback_plaintext_without_warning() -> None:
    config = parse_config(REQUIRED, environ={})
    assert config.listen == "127.0.0.1:9191"
    assert config.tls_cert is config.tls_key is config.tls_client_ca is None
    assert transport_warnings(config) == []


def test_tls_from_flags_and_from_environment() -> None:
    flags = parse_config(
        [*REQUIRED, "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"],
        environ={},
    )
    env = parse_config(
        REQUIRED,
        environ={
            "ABC_PDP_TLS_CERT": "c.pem",
            "ABC_PDP_TLS_KEY": "k.pem",
            "ABC_PDP_TLS_CLIENT_CA": "ca.pem",
        },
    )
    for config in (flags, env):
        assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (
            Path("c.pem"),
            Path("k.pem"),
            Path("ca.pem"),
        )


@pytest.mark.parametrize(
    ("extra", "environ", "message"),
    [
        (["--tls-cert", "c.pem"], {}, "--tls-cert and --tls-key go together"),
        (["--tls-key", "k.pem"], {}, "--tls-cert and --tls-key go together"),
        ([], {"ABC_PDP_TLS_KEY": "k.pem"}, "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], {}, "--tls-client-ca needs --tls-cert and --tls-key"),
    ],
    ids=["cert-only", "key-only", "key-only-env", "client-ca-without-tls"],
)
def test_incomplete_tls_is_a_config_error(
    extra: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config([*REQUIRED, *extra], environ=environ)


@pytest.mark.parametrize(
    ("listen", "tls", "warned"),
    [
        ("127.0.0.1:9191", [], None),
        ("[::1]:9191", [], None),
        ("0.0.0.0:9191", [], "without TLS"),
        ("[::]:9191", [], "without TLS"),
        ("abc-pdp:9191", [], "without TLS"),
        ("0.0.0.0:9191", ["--tls-cert", "c", "--tls-key", "k"], "accepts any TLS client"),
        ("0.0.0.0:9191", ["--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca"], None),
    ],
)
def test_an_exposed_port_without_mtls_is_warned_about(
    listen: str, tls: list[str], warned: str | None
) -> None:
    warnings = transport_warnings(parse_config([*REQUIRED, "--listen", listen, *tls], environ={}))
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0] and listen in warnings[0]


def test_run_retention_defaults_to_an_hour_and_is_never_negative() -> None:
    assert parse_config(REQUIRED, environ={}).run_retention_seconds == 3600
    assert parse_config(REQUIRED, environ={"ABC_PDP_RUN_RETENTION": "0"}).run_retention_seconds == 0
    with pytest.raises(ConfigError, match="--run-retention >= 0"):
        parse_config([*REQUIRED, "--run-retention", "-1"], environ={})
    with pytest.raises(ConfigError, match="--run-retention are"):
        parse_config([*REQUIRED, "--run-retention", "soon"], environ={})


def test_the_decide_socket_is_off_unless_given() -> None:
    assert parse_config(REQUIRED, environ={}).decide_socket is None
    environ = {"ABC_PDP_DECIDE_SOCKET": "/run/abc/env.sock"}
    assert parse_config(REQUIRED, environ=environ).decide_socket == Path("/run/abc/env.sock")
    flag = parse_config([*REQUIRED, "--decide-socket", "/run/abc/pdp.sock"], environ=environ)
    assert flag.decide_socket == Path("/run/abc/pdp.sock")


def test_decide_over_tls_needs_client_certificates() -> None:
    tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem"]
    listen = ["--decide-listen", "0.0.0.0:9193"]
    for missing in ([], tls):  # no plaintext door, and no TLS door open to any client
        with pytest.raises(ConfigError, match="--decide-listen needs --tls-cert, --tls-key"):
            parse_config([*REQUIRED, *missing, *listen], environ={})
    config = parse_config([*REQUIRED, *tls, "--tls-client-ca", "ca.pem", *listen], environ={})
    assert config.decide_listen == "0.0.0.0:9193"
    assert parse_config(REQUIRED, environ={}).decide_listen is None
    with pytest.raises(ConfigError, match="--decide-listen must be HOST:PORT"):
        parse_config(
            [*REQUIRED, *tls, "--tls-client-ca", "ca.pem", "--decide-listen", "x"], environ={}
        )
