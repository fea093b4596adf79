"""compose.yaml, checked without a container engine: every path, port, program and flag it
names exists in the project, and the services' addresses line up with each other."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from tests.deploy.support import (
    DEPLOY,
    ROOT,
    check_invocation,
    dockerfile_stages,
    in_image,
    option_value,
    port_of,
    under,
)

COMPOSE = DEPLOY / "compose.yaml"
SHELL_BUILTINS = {"test"}


def services() -> dict[str, dict[str, Any]]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def ours() -> dict[str, dict[str, Any]]:
    """The services that run our image (built from deploy/Dockerfile)."""
    return {name: s for name, s in services().items() if "build" in s}


def invocations(service: dict[str, Any]) -> list[list[str]]:
    command = list(service["command"])
    if command[:2] != ["sh", "-c"]:
        return [command]
    # A small script: commands joined by &&, || and ;, grouped with { }.
    parts = re.split(r"&&|\|\||;|[{}]", command[2])
    return [words for part in parts if (words := shlex.split(part))]


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a named volume, or a host path relative to deploy/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def listen_ports(name: str) -> set[int]:
    service = services()[name]
    command = [str(c) for c in service.get("command", [])]
    addresses = [
        *option_value(command, "--listen"),
        *option_value(command, "--metrics"),
        *option_value(command, "--web.listen-address"),
    ]
    ports = {port_of(a) for a in addresses}
    if "GF_SERVER_HTTP_PORT" in service.get("environment", {}):
        ports.add(int(service["environment"]["GF_SERVER_HTTP_PORT"]))
    return ports


def test_the_services_the_issue_asks_for() -> None:
    assert set(services()) == {"init", "pdp", "pep", "upstreams", "prometheus", "grafana"}
    for name in ("prometheus", "grafana"):
        image = services()[name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: pin the image version"


def test_builds_use_the_dockerfile_and_its_stages() -> None:
    stage_names = {stage.name for stage in dockerfile_stages()}
    for name, service in ours().items():
        build = service["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        assert build["target"] in ("runtime", "demo") and build["target"] in stage_names


def test_host_paths_exist() -> None:
    for name, service in services().items():
        for target, source in volume_mounts(service).items():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} -> {target}"


def test_depends_on_names_services() -> None:
    for name, service in services().items():
        assert set(service.get("depends_on", [])) <= set(services()) - {name}
    assert services()["upstreams"]["network_mode"] == "service:pep"


def test_commands_name_our_programs_subcommands_and_flags() -> None:
    for name, service in ours().items():
        for argv in invocations(service):
            if argv[0] in SHELL_BUILTINS:
                continue
            assert check_invocation(argv) == [], f"{name}: {argv}"


def test_container_paths_exist_in_the_image_or_a_mounted_volume() -> None:
    for name, service in ours().items():
        target, mounted = service["build"]["target"], set(volume_mounts(service))
        words = [w for argv in invocations(service) for w in argv]
        words += service.get("healthcheck", {}).get("test", [])
        paths = [v for w in words for v in (w.split("=", 1)[-1],) if v.startswith("/")]
        assert paths or name == "upstreams"
        for path in paths:
            assert under(path, mounted) or in_image(path, target), (
                f"{name}: {path} is neither in the image nor mounted"
            )


def test_published_ports_are_loopback_and_served() -> None:
    for name, service in services().items():
        for published in service.get("ports", []):
            host, _, container = published.split(":")
            assert host == "127.0.0.1", f"{name}: publish on the host's loopback only"
            assert int(container) in listen_ports(name), f"{name}: nothing on {container}"


def test_the_dockerfile_exposes_the_ports_the_programs_listen_on() -> None:
    exposed = {
        int(p)
        for stage in dockerfile_stages()
        for expose in stage.arguments("EXPOSE")
        for p in expose.split()
    }
    assert exposed == listen_ports("pdp") | listen_ports("pep")


def test_the_sidecar_reaches_the_pdp_and_the_fake_upstreams() -> None:
    pep = [str(c) for c in services()["pep"]["command"]]
    (pdp,) = option_value(pep, "--pdp")
    host, port = pdp.rsplit(":", 1)
    assert host in services() and int(port) in set(
        map(port_of, option_value(services()["pdp"]["command"], "--listen"))
    )
    fakes = [str(c) for c in services()["upstreams"]["command"]]
    fake_ports = {
        "openai": option_value(fakes, "--openai-port"),
        "anthropic": option_value(fakes, "--anthropic-port"),
        "http": option_value(fakes, "--http-port"),
        "mcp": option_value(fakes, "--mcp-port"),
    }
    upstreams = option_value(pep, "--upstream")
    assert {u.split("=", 1)[0].split(":")[0] for u in upstreams} == set(fake_ports)
    for upstream in upstreams:
        kind, url = upstream.split("=", 1)
        parts = urlsplit(url)
        # The fakes listen on 127.0.0.1 only: they share the sidecar's network namespace.
        assert parts.hostname == "127.0.0.1"
        assert [str(parts.port)] == fake_ports[kind.split(":")[0]], upstream
        if kind.startswith("mcp:"):
            assert parts.path == "/mcp"


def test_healthchecks_probe_the_service_s_own_ports() -> None:
    for name in ("pdp", "pep"):
        test = services()[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "/opt/abc/healthcheck.py"]
        assert port_of(test[4].removeprefix("http://")) in listen_ports(name)


def test_prometheus_scrapes_the_pdp_and_sidecar_metrics_and_loads_the_alerts() -> None:
    prometheus = services()["prometheus"]
    mounts = volume_mounts(prometheus)
    config_path = option_value(prometheus["command"], "--config.file")[0]
    config = yaml.safe_load((DEPLOY / mounts[config_path]).read_text())
    for rule_file in config["rule_files"]:
        inside = str(Path(config_path).parent / rule_file)
        assert mounts[inside] == "./prometheus/alerts.yml"
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets == {"abc-pdp": ["pdp:9464"], "abc-pep": ["pep:15090"]}
    for name, (target,) in (("pdp", targets["abc-pdp"]), ("pep", targets["abc-pep"])):
        service_command = [str(c) for c in services()[name]["command"]]
        assert port_of(target) == port_of(option_value(service_command, "--metrics")[0])


def test_grafana_provisioning_lines_up() -> None:
    grafana = services()["grafana"]
    mounts = volume_mounts(grafana)
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and url.port in listen_ports("prometheus")
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "abc.yml").read_text())["providers"]
    dashboards = provider["options"]["path"]
    assert (DEPLOY / mounts[dashboards]).is_dir()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / mounts[dashboards] / Path(home).relative_to(dashboards)).is_file()
