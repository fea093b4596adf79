"""A client generated from the .proto alone (not our stubs) registers and gets decisions."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from grpc_tools import protoc

from tests.harness import ROOT, PdpProcess

CLIENT = textwrap.dedent(
    """
    import json, sys
    import grpc
    from client.abc.pdp.v1 import pdp_pb2, pdp_pb2_grpc

    address, envelope_path = sys.argv[1], sys.argv[2]
    stub = pdp_pb2_grpc.DecisionServiceStub(grpc.insecure_channel(address))
    with open(envelope_path, "rb") as f:
        run = stub.RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=f.read()), timeout=10)
    out = {}
    for name, tool in (("allowed", "search"), ("refused", "drop_tables")):
        action = pdp_pb2.Action(kind="tool", target="tool:kb/" + tool)
        action.args.update({"query": "where is my invoice"})
        request = pdp_pb2.DecideRequest(run_id=run.run_id, request_id=name, action=action)
        reply = stub.Decide(request, timeout=10)
        out[name] = {"allow": reply.allow, "codes": [r.code for r in reply.reasons]}
    print(json.dumps(out))
    """
)


def test_client_from_proto_alone(pdp: PdpProcess, demo_envelope: bytes, tmp_path: Path) -> None:
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    # A different virtual root than ours: nothing of the pdp package is used.
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{include}",
                f"-Iclient={ROOT / 'proto'}",
                f"--python_out={tmp_path}",
                f"--grpc_python_out={tmp_path}",
                "client/abc/pdp/v1/pdp.proto",
            ]
        )
        == 0
    )
    for package in ("client", "client/abc", "client/abc/pdp", "client/abc/pdp/v1"):
        (tmp_path / package / "__init__.py").touch()
    (tmp_path / "client_main.py").write_text(CLIENT)
    (tmp_path / "envelope.json").write_bytes(demo_envelope)
    done = subprocess.run(
        [
            sys.executable,
            "-E",
            "-s",
            str(tmp_path / "client_main.py"),
            pdp.address,
            str(tmp_path / "envelope.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(done.stdout)
    assert result["allowed"] == {"allow": True, "codes": []}
    assert result["refused"] == {"allow": False, "codes": ["tool_not_allowed"]}
