"""The Dockerfile, checked without a container engine: lint, references, locks, healthcheck."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.support import (
    DEPLOY,
    ROOT,
    Stage,
    check_invocation,
    dockerfile_stages,
    run,
    tool,
)
from tests.harness import PdpProcess, Signer, free_port, start_pdp

DOCKERFILE = DEPLOY / "Dockerfile"
FINAL_STAGES = ("demo", "runtime")
# In a final image these would mean build tools or package managers at work.
BUILD_TOOLS = re.compile(r"\b(pip|pip3|apt-get|apt|gcc|cc|make|uv|setuptools)\b")


def stages() -> dict[str, Stage]:
    return {stage.name: stage for stage in dockerfile_stages()}


def ancestry(name: str) -> list[Stage]:
    chain, all_stages = [], stages()
    while name in all_stages:
        chain.append(all_stages[name])
        name = all_stages[name].base
    return chain


def test_hadolint_passes() -> None:
    done = run(tool("hadolint"), DOCKERFILE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_careless_dockerfile(tmp_path: Path) -> None:
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN apt-get install gcc\nRUN pip install regopy\n")
    done = run(tool("hadolint"), careless)
    assert done.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013"):
        assert rule in done.stdout, done.stdout


def test_every_copied_path_exists_and_every_from_names_a_stage() -> None:
    names = set(stages())
    for stage in dockerfile_stages():
        assert stage.base in names or re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", stage.base)
        for copy in stage.arguments("COPY"):
            words = copy.split()
            sources = [w for w in words[:-1] if not w.startswith("--")]
            origin = [w.split("=", 1)[1] for w in words if w.startswith("--from=")]
            if origin:
                assert origin[0] in names, copy
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the project"


def test_the_default_image_is_the_runtime_and_final_images_are_lean_and_non_root() -> None:
    assert dockerfile_stages()[-1].name == "runtime"  # what `docker build` gives by default
    for name in FINAL_STAGES:
        users = ancestry(name)[0].arguments("USER")
        assert users and all(int(u.split(":")[0]) > 0 for u in users), name
        for stage in ancestry(name):
            for script in stage.arguments("RUN"):
                assert not BUILD_TOOLS.search(script), f"{stage.name}: RUN {script}"
        copied_from = {
            w.split("=", 1)[1]
            for copy in ancestry(name)[0].arguments("COPY")
            for w in copy.split()
            if w.startswith("--from=")
        }
        # Only the venv comes from a build stage, and it was made without pip.
        assert all(origin.startswith("build") for origin in copied_from), copied_from
    build_runs = " ".join(stages()["build"].arguments("RUN"))
    assert "python -m venv --without-pip /opt/abc" in build_runs


def test_every_lock_is_installed_with_hashes_from_wheels_only() -> None:
    installs = [
        script
        for stage in dockerfile_stages()
        for script in stage.arguments("RUN")
        if "-r /locks/" in script
    ]
    locks = {m for script in installs for m in re.findall(r"-r /locks/(\S+)", script)}
    assert locks == {p.name for p in (DEPLOY / "image").glob("*.lock")}
    for script in installs:
        for command in script.split("&&"):
            if "-r /locks/" in command:
                assert "--require-hashes" in command and "--only-binary=:all:" in command


def test_the_commands_name_our_programs_and_their_flags() -> None:
    for name in FINAL_STAGES:
        (cmd,) = ancestry(name)[0].arguments("CMD")
        assert check_invocation(json.loads(cmd)) == []


def _lock(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    pins: dict[str, tuple[str, frozenset[str]]] = {}
    name = ""
    for line in path.read_text().splitlines():
        pinned = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if pinned:
            name = re.sub(r"[-_.]+", "-", pinned.group(1).lower())
            pins[name] = (pinned.group(2), frozenset())
        for digest in re.findall(r"--hash=(sha256:[0-9a-f]{64})", line):
            pins[name] = (pins[name][0], pins[name][1] | {digest})
    return pins


def _names(requirements: list[str]) -> set[str]:
    """Normalised project names of requirement lines ("PyYAML>=6.0" -> "pyyaml")."""
    names = (re.findall(r"^[A-Za-z0-9_.-]+", r.strip()) for r in requirements)
    return {re.sub(r"[-_.]+", "-", found[0].lower()) for found in names if found}


def test_image_locks_pin_the_same_versions_and_hashes_as_requirements_lock() -> None:
    full = _lock(ROOT / "requirements.lock")
    image = {
        name: _lock(DEPLOY / "image" / f"{name}.lock") for name in ("build", "runtime", "demo")
    }
    for lock, pins in image.items():
        for package, (version, hashes) in pins.items():
            assert package in full, f"{lock}.lock: {package} is not in requirements.lock"
            assert version == full[package][0], f"{lock}.lock: {package}=={version}"
            assert hashes and hashes <= full[package][1], f"{lock}.lock: {package} hashes"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _names(project["dependencies"]) <= set(image["runtime"])
    assert set(image["runtime"]) <= set(image["demo"])
    assert _names((DEPLOY / "image" / "demo.in").read_text().splitlines()) <= set(image["demo"])
    assert "setuptools" in image["build"]


@pytest.fixture(scope="module")
def pdp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PdpProcess]:
    signer = Signer(tmp_path_factory.mktemp("signer"))
    pdp = start_pdp(signer, tmp_path_factory.mktemp("state") / "state")
    yield pdp
    pdp.stop()


def healthcheck(*args: str) -> int:
    return run(sys.executable, DEPLOY / "docker" / "healthcheck.py", *args, timeout=30).returncode


def test_the_compose_healthcheck_sees_a_serving_pdp_and_its_metrics(pdp: PdpProcess) -> None:
    assert healthcheck("grpc", pdp.address) == 0
    assert healthcheck("http", f"http://{pdp.metrics_address}/metrics") == 0


def test_the_compose_healthcheck_fails_on_nothing_listening() -> None:
    closed = f"127.0.0.1:{free_port()}"
    assert healthcheck("grpc", closed) == 1
    assert healthcheck("http", f"http://{closed}/metrics") == 1
    assert healthcheck("tcp", closed) == 2
