"""abc-pdp's front-door flags: the OPA REST door (--http) and the ext_authz route prefixes."""

from __future__ import annotations

import pytest

from pdp.errors import ConfigError
from pdp.server.config import parse_config, transport_warnings

REQUIRED = ["--trust", "t.yaml", "--policies", "p", "--state", "s"]


def test_rest_is_off_by_default_and_on_opas_port_when_asked() -> None:
    assert parse_config(REQUIRED, environ={}).http is None
    assert parse_config([*REQUIRED, "--http"], environ={}).http == "127.0.0.1:8181"
    assert parse_config([*REQUIRED, "--http", "127.0.0.1:9000"], environ={}).http == (
        "127.0.0.1:9000"
    )
    assert parse_config(REQUIRED, environ={"ABC_PDP_HTTP": "127.0.0.1:81"}).http == "127.0.0.1:81"
    with pytest.raises(ConfigError, match="--http must be HOST:PORT"):
        parse_config([*REQUIRED, "--http", "8181"], environ={})


@pytest.mark.parametrize(
    ("tls", "warned"),
    [
        ([], "without TLS"),
        (["--tls-cert", "c", "--tls-key", "k"], "accepts any TLS client"),
        (["--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca"], None),
    ],
)
def test_an_exposed_rest_door_is_warned_about_like_the_grpc_port(
    tls: list[str], warned: str | None
) -> None:
    config = parse_config([*REQUIRED, "--http", "0.0.0.0:8181", *tls], environ={})
    warnings = transport_warnings(config)
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0] and "--http 0.0.0.0:8181" in warnings[0]


def test_ext_authz_model_prefixes() -> None:
    config = parse_config(REQUIRED, environ={})
    assert (config.ext_authz_openai_prefix, config.ext_authz_anthropic_prefix) == (
        "/openai/",
        "/anthropic/",
    )
    config = parse_config(
        [*REQUIRED, "--ext-authz-openai-prefix", "/llm/oai/"],
        environ={"ABC_PDP_EXT_AUTHZ_ANTHROPIC_PREFIX": "off"},
    )
    assert (config.ext_authz_openai_prefix, config.ext_authz_anthropic_prefix) == (
        "/llm/oai/",
        None,
    )


@pytest.mark.parametrize(
    ("openai", "anthropic", "message"),
    [
        ("openai", "/anthropic/", "must be off or a path like /openai/"),
        ("/openai", "/anthropic/", "must be off or a path like /openai/"),
        ("/openai/", "/a%2f/", "must be off or a path like /anthropic/"),
        ("/llm/", "/llm/anthropic/", "overlap"),
        ("/", "/anthropic/", "overlap"),
    ],
)
def test_bad_or_overlapping_prefixes_stop_start_up(
    openai: str, anthropic: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(
            [
                *REQUIRED,
                "--ext-authz-openai-prefix",
                openai,
                "--ext-authz-anthropic-prefix",
                anthropic,
            ],
            environ={},
        )
