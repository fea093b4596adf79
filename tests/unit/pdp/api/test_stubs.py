"""The committed stubs are exactly what protoc makes from proto/ today."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pdp.api.generate import ROOT, generate

GENERATED = ("pdp_pb2.py", "pdp_pb2.pyi", "pdp_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / "pdp/api/abc/pdp/v1" / name).read_bytes()
        committed = (ROOT / "pdp/api/abc/pdp/v1" / name).read_bytes()
        assert fresh == committed, f"{name} is stale: run python -m pdp.api.generate"
    assert os.getcwd() == str(ROOT)
