"""`make demo` keeps working: the README's first command runs the whole story, and with
KEEP=DIR leaves what it made, its decision log verified and its refusal explained."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.harness import ROOT, abcctl


def test_demo_runs_end_to_end_and_keeps_its_state(tmp_path: Path) -> None:
    kept = tmp_path / "demo"
    done = subprocess.run(
        # -o: the .venv running this test is the one make would build; do not rebuild it.
        ["make", "-s", "-C", str(ROOT), "-o", ".venv/.installed", "demo", f"KEEP={kept}"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "REFUSED  model_not_allowed" in out and "REFUSED  tool_not_allowed" in out
    assert "SHOWN    fetch_article, search" in out
    assert 'abc_pep_denials_total{reason="http_not_allowed",route="http"} 1.0' in out
    # ..%2f..%2f: an escape an upstream decodes to another path, refused before the PDP.
    assert 'abc_pep_denials_total{reason="bad_request",route="http"} 1.0' in out
    assert "tools that reached the MCP server: search\n" in out
    # The end: the log verifies, and the refused gpt-5 call is explained from it.
    refused = re.search(r"openai gpt-5 \(not in the manifest\)\s+REFUSED\s+\S+\s+(dec_\w+)", out)
    assert refused is not None, out
    assert "$ abcctl audit verify" in out and "  intact: " in out
    assert f"$ abcctl explain {refused.group(1)}" in out
    assert f"decision {refused.group(1)} at " in out and ": DENY" in out
    assert 'closest: ["model:openai/gpt-4o-mini"]' in out
    assert out.rstrip().endswith("demo: done (PDP, PEP and upstreams stopped)")
    # What it made is still there, and the README's commands work on it.
    state = kept / "state"
    assert (kept / "envelope.json").is_file() and (kept / "keys" / "signer.key").is_file()
    replayed = abcctl(
        "replay", state / "decisions.log", "--bundles", state / "bundles",
        "--pub", state / "pdp-log.pub",
    )  # fmt: skip
    assert " 0 divergent" in replayed.stdout


def test_demo_refuses_a_kept_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "old").write_text("x")
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "-o", ".venv/.installed", "demo", f"KEEP={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "is not empty" in done.stderr
