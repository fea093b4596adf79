"""The demo: keys, trust, freeze the demo intent, verify it, and show what verification refuses.

Run with ``make demo``. Everything happens in a fresh temporary directory; nothing is left behind.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ABCCTL = str(Path(sys.executable).parent / "abcctl")


def run(*args: object, expect: int = 0) -> str:
    command = [ABCCTL, *map(str, args)]
    shown = " ".join(str(a) for a in args)
    print(f"\n$ abcctl {shown}")
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    output = (done.stdout + done.stderr).rstrip()
    if output:
        print("  " + output.replace("\n", "\n  "))
    if done.returncode != expect:
        sys.exit(f"demo: expected exit {expect}, got {done.returncode}")
    return done.stdout


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="abc-demo-") as tmp:
        work = Path(tmp)
        print("== 1. A signing key, trusted for tenant acme")
        run("keygen", "--out", work / "keys", "--name", "signer")
        run(
            "trust",
            "add",
            "--store",
            work / "trust.yaml",
            "--pub",
            work / "keys/signer.pub",
            "--tenant",
            "acme",
        )
        print("\n== 2. Freeze the demo intent into a signed manifest")
        envelope = work / "envelope.json"
        run(
            "freeze",
            ROOT / "deploy/demo/intent.yaml",
            "--key",
            work / "keys/signer.key",
            "--policies",
            ROOT / "policies",
            "-o",
            envelope,
        )
        run("inspect", envelope)
        print("\n== 3. Verify it (and record the lineage's high-water mark)")
        run("verify", envelope, "--trust", work / "trust.yaml", "--state", work / "state")
        print("\n== 4. What verification refuses")
        print("-- the budget raised tenfold inside the signed payload:")
        document = json.loads(envelope.read_bytes())
        payload = base64.b64decode(document["payload"])
        forged = payload.replace(b'"tokens":200000', b'"tokens":2000000')
        document["payload"] = base64.b64encode(forged).decode()
        tampered = work / "tampered.json"
        tampered.write_text(json.dumps(document))
        run("verify", tampered, "--trust", work / "trust.yaml", expect=1)
        print("-- the same envelope, a day later (past its 8h lifetime):")
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        run("verify", envelope, "--trust", work / "trust.yaml", "--at", tomorrow, expect=1)
        print("\ndemo: done")


if __name__ == "__main__":
    main()
