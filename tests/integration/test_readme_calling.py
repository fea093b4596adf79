"""The README's "Calling the PDP" examples, run as written against a real PDP.

Only the addresses are changed (to the test's free ports); a drifted example fails here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT, PdpProcess, Signer, locked_node_example, start_pdp

SECTION = (ROOT / "README.md").read_text().split("\n## Calling the PDP\n", 1)[1].split("\n## ")[0]
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", SECTION, re.DOTALL)


def block(language: str, marker: str) -> str:
    [code] = [code for lang, code in BLOCKS if lang == language and marker in code]
    return code


@pytest.fixture(scope="module")
def rest_pdp(signer: Signer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PdpProcess]:
    process = start_pdp(signer, tmp_path_factory.mktemp("readme-pdp") / "state", http=True)
    yield process
    process.stop()


@pytest.fixture
def workdir(tmp_path: Path, demo_envelope: bytes) -> Path:
    """Where a reader stands: envelope.json here, the repository's examples beside it."""
    (tmp_path / "envelope.json").write_bytes(demo_envelope + b"\n")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


def run(command: list[str], workdir: Path, **env: str) -> str:
    done = subprocess.run(
        command,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def grpc_run(pdp: PdpProcess, workdir: Path) -> str:
    code = block("python", "pdp_pb2_grpc").replace("127.0.0.1:9191", pdp.address)
    run_id, allow, codes, decision = run([sys.executable, "-c", code], workdir).split(" ", 3)
    assert (allow, codes) == ("True", "[]") and decision.startswith("dec_")
    return run_id


def test_python_grpc_example(rest_pdp: PdpProcess, workdir: Path) -> None:
    assert grpc_run(rest_pdp, workdir).startswith("run_")


def test_node_example(rest_pdp: PdpProcess, workdir: Path) -> None:
    command = block("sh", "node examples/node").replace("127.0.0.1:9191", rest_pdp.address)
    with locked_node_example():  # its npm ci replaces examples/node/node_modules
        answer = json.loads(run(["bash", "-c", command], workdir).splitlines()[-1])  # after npm's
    assert answer["allowed"]["allow"] is True
    assert answer["refused"]["codes"] == ["tool_not_allowed"]
    source = (ROOT / "examples" / "node" / "client.js").read_text()
    for line in block("js", "protoLoader").splitlines():
        assert line in source, f"README line not in client.js: {line}"


def test_curl_example(rest_pdp: PdpProcess, workdir: Path) -> None:
    command = block("sh", "curl").replace("127.0.0.1:8181", rest_pdp.http_address)
    answer = json.loads(run(["bash", "-c", command], workdir, RUN=grpc_run(rest_pdp, workdir)))
    assert answer["result"]["allow"] is True and answer["result"]["reasons"] == []
    assert answer["decision_id"] == answer["result"]["decision_id"]


def test_opa_python_client_example(rest_pdp: PdpProcess, workdir: Path) -> None:
    host, port = rest_pdp.http_address.rsplit(":", 1)
    code = block("python", "OpaClient").replace(
        'host="127.0.0.1", port=8181', f'host="{host}", port={port}'
    )
    assert code != block("python", "OpaClient")
    out = run([sys.executable, "-c", code], workdir, RUN=grpc_run(rest_pdp, workdir))
    assert out.startswith("True [] dec_")
