"""``abcctl run narrow``: the effective grant of a narrower, or its refusal, without a PDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.cli.main import main
from pdp.manifest.canonical import canonical_bytes, digest
from pdp.manifest.model import Manifest
from tests.factories import manifest_document, signed_envelope


def _files(tmp_path: Path, narrower: object) -> tuple[str, str]:
    envelope = tmp_path / "envelope.json"
    envelope.write_bytes(signed_envelope(Ed25519PrivateKey.generate()))
    path = tmp_path / "narrower.json"
    path.write_text(json.dumps(narrower))
    return str(envelope), str(path)


def test_run_narrow_prints_the_effective_grant_and_its_digest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "narrow", *_files(tmp_path, {"budgets": {"tokens": 4000}})]) == 0
    first, _, document = capsys.readouterr().out.partition("\n")
    effective = json.loads(document)
    assert effective["budgets"]["tokens"] == 4000
    document_in = manifest_document()
    document_in["budgets"]["tokens"] = 4000
    expected = Manifest.model_validate_json(json.dumps(document_in)).document()
    assert effective == expected
    assert first == f"effective grant {digest(canonical_bytes(expected))}"


def test_run_narrow_refuses_a_widening_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "narrow", *_files(tmp_path, {"budgets": {"tokens": 10**9}})]) == 1
    assert capsys.readouterr().err == (
        "abcctl: error: budgets.tokens: 1000000000 is more than the grant's 200000\n"
    )
