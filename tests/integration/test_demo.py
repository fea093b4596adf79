"""`make demo` keeps working: the README's first command runs the whole story."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import ROOT


def test_demo_runs_end_to_end() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "demo" / "run.py")],
        capture_output=True,
        text=True,
        timeout=120,
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
    assert out.rstrip().endswith("demo: done (PDP, PEP and upstreams stopped)")
