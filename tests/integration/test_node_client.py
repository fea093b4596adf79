"""examples/node: a Node client (@grpc/grpc-js, the .proto loaded at run time) against a real PDP.

The packages come from examples/node/package-lock.json through ``npm ci``; ``node`` and
``npm`` are on the machine image (make test installs Debian's when they are missing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.harness import PdpProcess, locked_node_example


@pytest.fixture(scope="module")
def node_example() -> Path:
    for tool in ("node", "npm"):
        assert shutil.which(tool), f"{tool} is missing: see scripts/system-tools.sh"
    with locked_node_example() as example:
        # Exactly the locked versions; no install scripts (none is needed to load a .proto).
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=example,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    return example


def node_client(*args: str) -> subprocess.CompletedProcess[str]:
    """``node client.js ARGS`` in examples/node, held so no other worker's npm ci runs under
    it (held per run, not per module: a worker idle at the end may keep a module open)."""
    with locked_node_example() as example:
        return subprocess.run(
            ["node", "client.js", *args],
            cwd=example,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def test_node_client_registers_and_gets_an_allowed_and_a_refused_decision(
    node_example: Path, pdp: PdpProcess, demo_envelope: bytes, tmp_path: Path
) -> None:
    envelope = tmp_path / "envelope.json"
    envelope.write_bytes(demo_envelope + b"\n")
    done = node_client(pdp.address, str(envelope))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["allowed"]["allow"] is True and answer["allowed"]["codes"] == []
    assert answer["refused"]["allow"] is False
    assert answer["refused"]["codes"] == ["tool_not_allowed"]
    assert answer["allowed"]["decision_id"].startswith("dec_")
    # The same manifest is the same run, whichever language registered it.
    stub = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())
    run = stub.RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=demo_envelope), timeout=10)
    assert answer["run_id"] == run.run_id


def test_node_client_fails_loudly_without_a_pdp(node_example: Path, tmp_path: Path) -> None:
    from tests.harness import free_port

    envelope = tmp_path / "envelope.json"
    envelope.write_text("{}")
    done = node_client(f"127.0.0.1:{free_port()}", str(envelope))
    assert done.returncode == 1 and done.stderr.startswith("abc node client:")
