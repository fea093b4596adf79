"""The demo: the whole story on the embedded defaults, in a temporary directory, under a minute.

keys → trust → freeze the demo intent → PDP, PEP and local fake upstreams up → allowed and
refused model, tool and HTTP calls with the official SDKs → denial counters → clean stop →
the decision log verified and the refused model call explained.
Run with ``make demo``; ``make demo KEEP=DIR`` (``run.py --keep DIR``) keeps the keys, the
envelope and the PDP's state in DIR, to try ``abcctl audit verify``, ``replay`` and
``explain`` on what the demo just did.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the fake upstreams live with the tests

import anthropic  # noqa: E402
import httpx2  # noqa: E402
import openai  # noqa: E402
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from tests.fakes.serve import FakeUpstreams  # noqa: E402
from tests.harness import PdpProcess, PepProcess, Signer, start_pdp, start_pep  # noqa: E402

BIN = Path(sys.executable).parent


def abcctl(*args: object, expect: int = 0) -> str:
    shown = " ".join(str(a) for a in args)
    print(f"\n$ abcctl {shown}")
    done = subprocess.run(  # noqa: S603 - our own console script, arguments from this file
        [str(BIN / "abcctl"), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    output = (done.stdout + done.stderr).rstrip()
    if output:
        print("  " + output.replace("\n", "\n  "))
    if done.returncode != expect:
        sys.exit(f"demo: expected exit {expect}, got {done.returncode}")
    return done.stdout


def show(label: str, outcome: str) -> None:
    print(f"  {label:<58} {outcome}")


def refused(reason: str, decision_id: str) -> str:
    return f"REFUSED  {reason:<18} {decision_id}"


def model_calls(pep: PepProcess) -> str:
    """The calls; returns the decision id of the refused gpt-5 call, explained at the end."""
    client = openai.OpenAI(base_url=f"{pep.url}/openai/v1", api_key="sk-demo", max_retries=0)
    reply = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Where is my invoice?"}],
        max_tokens=100_000,
    )
    show(
        "openai gpt-4o-mini, max_tokens=100000 (capped to 2048)",
        f"ALLOWED  {reply.headers['x-abc-decision-id']}",
    )
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream it"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    show("openai gpt-4o-mini, streamed", f"ALLOWED  {text[:40]!r}")
    try:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
        sys.exit("demo: gpt-5 was not refused")
    except openai.PermissionDeniedError as exc:
        refused_id: str = exc.body["decision_id"]  # type: ignore[index]
        show("openai gpt-5 (not in the manifest)", refused(str(exc.code), refused_id))
    claude = anthropic.Anthropic(base_url=f"{pep.url}/anthropic", api_key="ak-demo", max_retries=0)
    try:
        claude.messages.create(
            model="claude-haiku-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        )
    except anthropic.PermissionDeniedError as exc:
        abc = exc.body["abc"]  # type: ignore[index]
        show(
            "anthropic claude-haiku-4-5 (only in step 'answer')",
            refused(abc["reason"], abc["decision_id"]),
        )
    return refused_id


async def tool_calls(pep: PepProcess) -> None:
    async with (
        streamable_http_client(f"{pep.url}/mcp/kb") as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        listed = sorted(t.name for t in (await session.list_tools()).tools)
        show("mcp kb tools/list (server has 4 tools)", f"SHOWN    {', '.join(listed)}")
        await session.call_tool("search", {"query": "refund policy", "top_k": 3})
        show("mcp kb search(query='refund policy')", "ALLOWED")
        for name, args in (("delete_everything", {}), ("search", {"query": "x" * 500})):
            # A refused call is the tool's error result (the model reads why and goes on).
            result = await session.call_tool(name, args)
            data: dict[str, Any] = result.meta or {}
            show(
                f"mcp kb {name}({', '.join(f'{k}=...' for k in args)})",
                refused(data["abc/reason"], data["abc/decision_id"]),
            )


def http_calls(pep: PepProcess) -> None:
    base = f"{pep.url}/http/billing.internal"
    ok = httpx2.get(f"{base}/v1/invoices/42")
    show("GET billing.internal/v1/invoices/42", f"ALLOWED  {ok.headers['x-abc-decision-id']}")
    for method, path in (
        ("GET", "/admin/secrets"),
        ("GET", "/v1/invoices/..%2f..%2fadmin/secrets"),
    ):
        reply = httpx2.request(method, base + path).json()
        show(f"{method} billing.internal{path}", refused(reply["reason"], reply["decision_id"]))


def counters(text: str, prefix: str) -> None:
    for line in text.splitlines():
        if line.startswith(prefix) and not line.endswith(" 0.0"):
            print(f"  {line}")


@contextlib.contextmanager
def workplace(keep: Path | None) -> Iterator[Path]:
    """A temporary directory, or ``keep`` (new or empty), left in place afterwards."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="abc-demo-") as tmp:
            yield Path(tmp)
        return
    if keep.exists() and any(keep.iterdir()):
        # A second run over old state would be refused as a rollback (same lineage, v1).
        sys.exit(f"demo: {keep} is not empty; give a new directory to KEEP=")
    keep.mkdir(parents=True, exist_ok=True)
    yield keep.resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep keys, envelope and PDP state here")
    keep = parser.parse_args().keep
    with workplace(keep) as work:
        print("== 1. A signing key, trusted for tenant acme; the demo intent frozen and verified")
        abcctl("keygen", "--out", work / "keys", "--name", "signer")
        abcctl(
            "trust",
            "add",
            "--store",
            work / "trust.yaml",
            "--pub",
            work / "keys/signer.pub",
            "--tenant",
            "acme",
        )
        envelope = work / "envelope.json"
        abcctl(
            "freeze",
            ROOT / "deploy/demo/intent.yaml",
            "--key",
            work / "keys/signer.key",
            "--policies",
            ROOT / "policies",
            "-o",
            envelope,
        )
        abcctl("inspect", envelope)
        abcctl("verify", envelope, "--trust", work / "trust.yaml")
        document = json.loads(envelope.read_bytes())
        forged = base64.b64decode(document["payload"]).replace(
            b'"tokens":200000', b'"tokens":2000000'
        )
        (work / "tampered.json").write_text(
            json.dumps({**document, "payload": base64.b64encode(forged).decode()})
        )
        print("\n-- the budget raised tenfold inside the signed payload:")
        abcctl("verify", work / "tampered.json", "--trust", work / "trust.yaml", expect=1)
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        print("-- the same envelope a day later (past its 8h lifetime):")
        abcctl("verify", envelope, "--trust", work / "trust.yaml", "--at", tomorrow, expect=1)

        print("\n== 2. PDP (gRPC), fake upstreams and the PEP sidecar, all on 127.0.0.1")
        signer = Signer.existing(work)
        pdp: PdpProcess | None = None
        pep: PepProcess | None = None
        with FakeUpstreams() as fakes:
            try:
                pdp = start_pdp(signer, work / "state")
                pep = start_pep(
                    pdp.address,
                    {
                        "openai": fakes.openai_url,  # the SDK's base URL form, /v1 included
                        "anthropic": fakes.anthropic_url,
                        "mcp:kb": fakes.mcp_sse_url,
                        "http:billing.internal": fakes.http_url,
                    },
                    work,
                    "--manifest",
                    str(envelope),
                )
                print(f"  PDP {pdp.address}, PEP {pep.url}, metrics {pep.metrics_url}")
                print("\n== 3. The agent's calls, through the sidecar")
                refused_id = model_calls(pep)
                asyncio.run(tool_calls(pep))
                http_calls(pep)
                print("\n== 4. What the sidecar counted (abc_pep_denials_total, non-zero)")
                counters(pep.metrics(), "abc_pep_denials_total{")
                counters(pep.metrics(), "abc_pep_requests_total{")
                forwarded = sorted(
                    {r.tool_name for r in fakes.recorder.find("mcp-sse") if r.tool_name}
                )
                print(f"\n  tools that reached the MCP server: {', '.join(forwarded)}")
            finally:
                for process in (pep, pdp):
                    if process is not None:
                        process.stop()
        state = work / "state"
        log = ["--pub", state / "pdp-log.pub"]
        print("\n== 5. The PDP's decision log: verified, and the refused gpt-5 call explained")
        abcctl("audit", "verify", state / "decisions.log", *log)
        abcctl("explain", refused_id, "--log", state / "decisions.log", *log)
        if keep is None:
            print("\n  (make demo KEEP=DIR keeps the keys, the envelope and this state)")
        else:
            print(f"\n  kept in {work}: keys/, trust.yaml, envelope.json, state/; try")
            print(f"  .venv/bin/abcctl replay {state}/decisions.log --bundles {state}/bundles \\")
            print(f"      --pub {state}/pdp-log.pub")
        print("\ndemo: done (PDP, PEP and upstreams stopped)")


if __name__ == "__main__":
    main()
