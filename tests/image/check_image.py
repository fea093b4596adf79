"""The container image as users run it: built from deploy/Dockerfile, started as its user.

The runtime and demo targets are built with podman on a stand-in for the official base image,
then run from their own filesystems (how, and what differs from the official base:
tests/image/support.py). The compose story is replayed by hand from compose.yaml's own
commands, volumes and health checks: init, the fake upstreams from the demo image, abc-pdp and
abc-pep from the runtime image, one allowed and one refused call, `abcctl audit verify`.

Slow (a Debian root and two builds, minutes): `make image-test`, not `make test`. Skips, loudly,
only where podman or mmdebstrap is missing (scripts/image-tools.sh installs them as root).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import openai
import pytest
import yaml

from tests.deploy.support import DEPLOY
from tests.harness import free_port, serving_within
from tests.image.support import (
    BASE_CONFIG,
    ImageTestError,
    Podman,
    Rootfs,
    Volume,
    base_name,
    make_base_tarball,
    missing_tools,
    owned_directory,
    qualified,
    serve_directory,
    wait_for_port,
    wheel_index,
)

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
RUNTIME_IMAGE = SERVICES["pdp"]["image"]
DEMO_IMAGE = SERVICES["upstreams"]["image"]
MIB = 1024 * 1024
PUB = "/var/lib/abc/pdp-log.pub"


@dataclass(frozen=True)
class Built:
    runtime: Rootfs
    demo: Rootfs


def report(line: str) -> None:
    """A measured figure, shown by `make image-test` (pytest -s)."""
    print(f"\nimage-test: {line}", flush=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    missing = missing_tools()
    if missing:
        pytest.skip(
            f"IMAGE NOT BUILT OR RUN: {', '.join(missing)} missing "
            "(scripts/image-tools.sh installs them from Debian as root)"
        )
    if os.geteuid() != 0:
        pytest.skip("IMAGE NOT BUILT OR RUN: mounting the image's filesystem needs root")
    work = tmp_path_factory.mktemp("image")
    podman = Podman(work / "store")
    server: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        # pip's downloads wait on the network while mmdebstrap's dpkg works: side by side.
        with ThreadPoolExecutor(max_workers=1) as pool:
            wheels = pool.submit(wheel_index, work)
            make_base_tarball(work / "base.tar")
            index_root = wheels.result()
        base = qualified(base_name())
        podman("import", *(f"--change={c}" for c in BASE_CONFIG), work / "base.tar", base)
        (work / "base.tar").unlink()
        report(
            f"stand-in base made and imported, wheels fetched: {time.monotonic() - started:.0f} s"
        )
        started = time.monotonic()
        server, port = serve_directory(index_root)
        index = f"http://127.0.0.1:{port}/simple"
        podman.build("runtime", RUNTIME_IMAGE, index)
        podman.build("demo", DEMO_IMAGE, index)
        report(f"runtime and demo targets built in {time.monotonic() - started:.0f} s")
        sizes = {name: podman.size(name) for name in (base, RUNTIME_IMAGE, DEMO_IMAGE)}
        report(
            ", ".join(f"{name} {size / MIB:.0f} MiB" for name, size in sizes.items())
            + f"; the runtime target adds {(sizes[RUNTIME_IMAGE] - sizes[base]) / MIB:.0f} MiB"
        )
        yield Built(
            runtime=podman.mount(RUNTIME_IMAGE, "abc-runtime"),
            demo=podman.mount(DEMO_IMAGE, "abc-demo"),
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        podman.remove_everything()
        shutil.rmtree(work, ignore_errors=True)


def test_every_native_library_the_image_ships_resolves_in_it(built: Built) -> None:
    # The image's own ldd, in its own root: a library the base lacks (libatomic.so.1 was
    # one) shows as "not found" here before anything imports it.
    for rootfs in (built.runtime, built.demo):
        # The stand-in base must not hide what the official one lacks.
        assert not list(rootfs.path.glob("usr/lib/*/libatomic.so*"))
        done = rootfs.run(["sh", "-c", "find /opt/abc -name '*.so*' -type f -exec ldd {} +"])
        assert "libopabridge.so" in done.stdout, done.stdout + done.stderr
        assert "not found" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_the_three_commands_start_as_the_image_user(built: Built) -> None:
    rootfs = built.runtime
    assert rootfs.user == "10001:10001"
    who = rootfs.run(["python", "-c", "import os; print(os.getuid(), os.getgid(), os.getcwd())"])
    assert who.stdout.split() == ["10001", "10001", "/var/lib/abc"], who.stdout + who.stderr
    for command in ("abc-pdp", "abc-pep", "abcctl"):
        started = time.monotonic()
        done = rootfs.run([command, "--help"])
        assert done.returncode == 0, f"{command} --help:\n{done.stdout}{done.stderr}"
        assert done.stdout.startswith(f"usage: {command}"), done.stdout
        report(f"`{command} --help` in the image: {time.monotonic() - started:.2f} s")
    # The runtime venv ships no installer.
    assert rootfs.run(["python", "-m", "pip", "--version"]).returncode != 0


class Ports:
    """Compose's fixed ports, each mapped to a free loopback port (other tests run here too).

    In compose every service has a network namespace of its own, listens on 0.0.0.0 and finds
    the PDP by its service name; here all share the host's loopback.
    """

    def __init__(self) -> None:
        self.mapped: dict[int, int] = {}

    def __getitem__(self, port: int) -> int:
        if port not in self.mapped:
            fresh = free_port()
            while fresh in self.mapped.values():
                fresh = free_port()
            self.mapped[port] = fresh
        return self.mapped[port]

    def localise(self, args: list[str]) -> list[str]:
        def address(match: re.Match[str]) -> str:
            return f"127.0.0.1:{self[int(match[1])]}"

        def port_flag(match: re.Match[str]) -> str:
            return f"{match[1]}{self[int(match[2])]}"

        localised = [re.sub(r"\b(?:0\.0\.0\.0|127\.0\.0\.1|pdp):(\d+)\b", address, a) for a in args]
        ported = [re.sub(r"^(--[a-z]+-port=)(\d+)$", port_flag, a) for a in localised]
        # The fake MCP servers beside --mcp-port default to the two ports after it, which
        # need not be free here: each gets a free port of its own too.
        for arg in args:
            if mcp := re.fullmatch(r"--mcp-port=(\d+)", arg):
                base = int(mcp[1])
                ported += [
                    f"--mcp-json-port={self[base + 1]}",
                    f"--mcp-stateless-port={self[base + 2]}",
                ]
        return ported


def compose_volumes(service: str, named: dict[str, Path]) -> list[Volume]:
    volumes = []
    for spec in SERVICES[service].get("volumes", []):
        source, target, *mode = spec.split(":")
        path = named[source] if source in named else (DEPLOY / source).resolve()
        volumes.append(Volume(path, target, read_only=mode == ["ro"]))
    return volumes


def healthcheck(service: str, ports: Ports) -> list[str]:
    kind, *command = SERVICES[service]["healthcheck"]["test"]
    assert kind == "CMD"
    return ports.localise(command)


def wait_serving(address: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    with grpc.insecure_channel(address) as channel:
        if serving_within(channel, process, timeout):
            return
    assert process.poll() is None, f"abc-pdp exited {process.returncode}"
    raise ImageTestError(f"abc-pdp not SERVING on {address} after {timeout:.0f} s")


def wait_metrics(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"abc-pep exited {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise ImageTestError(f"abc-pep metrics not served at {url} after {timeout:.0f} s")


def stop(process: subprocess.Popen[bytes]) -> int:
    """What `docker compose down` does: SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        raise


def test_the_compose_story_by_hand(built: Built, tmp_path: Path) -> None:
    runtime, demo, ports = built.runtime, built.demo, Ports()
    named = {name: owned_directory(tmp_path / name, runtime.uid()) for name in COMPOSE["volumes"]}
    logs = tmp_path / "logs"
    logs.mkdir()
    running: list[subprocess.Popen[bytes]] = []

    def start(rootfs: Rootfs, service: str) -> subprocess.Popen[bytes]:
        command = ports.localise(SERVICES[service]["command"])
        volumes = compose_volumes(service, named)
        process = rootfs.start(command, volumes, logs / f"{service}.log")
        running.append(process)
        return process

    def log_of(service: str) -> str:
        return (logs / f"{service}.log").read_text(errors="replace")

    try:
        init = runtime.run(SERVICES["init"]["command"], compose_volumes("init", named))
        assert init.returncode == 0, init.stdout + init.stderr
        assert (named["abc-config"] / "envelope.json").stat().st_uid == runtime.uid()

        upstreams = start(demo, "upstreams")
        started = time.monotonic()
        pdp = start(runtime, "pdp")
        wait_serving(f"127.0.0.1:{ports[9191]}", pdp)
        pdp_ready = time.monotonic() - started
        started = time.monotonic()
        pep = start(runtime, "pep")
        wait_metrics(f"http://127.0.0.1:{ports[15090]}/metrics", pep)
        pep_ready = time.monotonic() - started
        report(f"abc-pdp SERVING {pdp_ready:.1f} s after start, abc-pep ready in {pep_ready:.1f} s")
        assert "decisions on /run/abc/decide.sock" in log_of("pep")  # not over gRPC
        for service in ("pdp", "pep"):
            health = runtime.run(healthcheck(service, ports))
            assert health.returncode == 0, f"{service} healthcheck: {health.stderr}"
        for port in (18001, 18003):
            wait_for_port(ports[port], upstreams, timeout=30)

        sidecar = f"http://127.0.0.1:{ports[15001]}"
        client = openai.OpenAI(base_url=f"{sidecar}/openai/v1", api_key="sk-demo", max_retries=0)
        reply = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Where is my invoice?"}]
        )
        allowed_id = reply.headers["x-abc-decision-id"]
        assert reply.parse().choices[0].message.content
        refused = httpx.get(f"{sidecar}/http/billing.internal/admin/secrets", timeout=10)
        assert refused.status_code == 403, refused.text
        assert refused.json()["reason"] == "http_not_allowed"
        refused_id = refused.headers["x-abc-decision-id"]

        assert stop(pep) == 0, log_of("pep")
        assert stop(pdp) == 0, log_of("pdp")
        state = named["pdp-state"]
        verify = runtime.run(
            ["abcctl", "audit", "verify", "/var/lib/abc/decisions.log", "--pub", PUB],
            compose_volumes("pdp", named),
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        log = (state / "decisions.log").read_text()
        assert allowed_id in log and refused_id in log
        assert (state / "decisions.log").stat().st_uid == runtime.uid()
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
