"""Restart time against history: abc-pdp start-up (process start to SERVING) on a decision log
of 1,000,000 records against one of 100,000, both written by the PDP's own log writer
(``DecisionLog``, rotating into segments as the PDP does). Writes bench-results/restart.json.

Each log is a real PDP's registration of a grant and four runs started under it, then
history appended by the writer: decisions of those runs (each reserving one tool
call, kept as the answer to its request id) and their settlements. Both histories end with
the same live state: runs whose answers windows (10,000 request ids each) are full,
so the comparison is of history, which snapshots make irrelevant, not of live state, which
a restart must rebuild whatever it loads from.

The first start after writing replays the appended records (``cold``: the figure without
snapshots) and snapshots the state; the restarts that follow load that snapshot and replay
the tail. The log lives on tmpfs when there is one: the bench measures the PDP, not this
machine's fsync (the writer fsyncs every append). ``ABC_BENCH_RESTART_RECORDS`` sets the
large count (default 1,000,000); the small one is a tenth of it, and the number of runs
is what the small one fills (five for the default, one below 200,000).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest

from pdp.api import pdp_pb2, pdp_pb2_grpc
from pdp.bundle import load_bundle
from pdp.clock import utc_now
from pdp.decisionlog import DecisionLog, DecisionRecord, SettlementRecord
from pdp.manifest.keys import load_private_key
from tests.bench.bench_pdp import intent
from tests.bench.conftest import percentile, summary_ms, write_results
from tests.harness import (
    BIN,
    POLICIES,
    PdpProcess,
    Signer,
    free_port,
    pdp_flags,
    serving_within,
    start_pdp,
)

LARGE = int(os.environ.get("ABC_BENCH_RESTART_RECORDS", "1000000"))
RESTARTS = 5
# The grant's default run and started ones: as many as the smaller history fills the
# answers windows of (10,000 decisions a run, two records each), five at most.
RUNS = max(1, min(5, LARGE // 10 // 20_000))
SEGMENT_BYTES = 64 * 1024 * 1024  # the PDP's default


def _base() -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="abc-restart-", dir=shm if shm.is_dir() else None))


def _registered(signer: Signer, state: Path) -> tuple[list[str], str]:
    """A real PDP's records: the grant and its runs; the run ids and the manifest digest."""
    pdp = start_pdp(signer, state)
    stub = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())
    registered = stub.RegisterManifest(
        pdp_pb2.RegisterManifestRequest(envelope=signer.freeze(intent(1), "restart")), timeout=30
    )
    digest = registered.manifest_digest
    runs = [registered.run_id] + [
        stub.StartRun(pdp_pb2.StartRunRequest(manifest_digest=digest, run_key=f"task-{k}")).run_id
        for k in range(RUNS - 1)
    ]
    assert pdp.stop() == 0
    return runs, digest


def _history(state: Path, runs: list[str], digest: str, records: int) -> None:
    """Append decisions and their settlements until the log holds ``records`` records."""
    log = DecisionLog(
        state / "decisions.log", load_private_key(state / "pdp-log.key"),
        segment_bytes=SEGMENT_BYTES,
    )  # fmt: skip
    policy = load_bundle(POLICIES).digest
    action = {"kind": "tool", "target": "tool:bench/t0", "args": {"query": "q"}}
    allow = {"allow": True, "reasons": [], "obligations": {}}
    cost = {"tokens": 0, "usd_micros": 0, "tool_calls": 1, "requests": 0}
    i = 0
    while log.position().seq < records:
        now = utc_now()
        run_id, reservation = runs[i % RUNS], f"rsv_h{i}"
        log.append(
            DecisionRecord(
                time=now, decision_id=f"dec_h{i}", request_id=f"h{i}", run_id=run_id,
                manifest_digest=digest, policy_digest=policy,
                input={"action": action, "run": {"step": "research", "completed_steps": []}},
                result=allow, reservation_id=reservation, policy_result=allow, cost=cost,
                expires=now + timedelta(minutes=10),
            )
        )  # fmt: skip
        log.append(
            SettlementRecord(
                time=now, run_id=run_id, reservation_id=reservation, tokens=0, usd_micros=0
            )
        )
        i += 1
    log.close()


def _start_seconds(signer: Signer, state: Path) -> tuple[float, str]:
    """Process start to SERVING, and what it printed (a full replay may take minutes: no
    harness timeout here)."""
    address = f"127.0.0.1:{free_port()}"
    output = state.parent / "pdp.out"
    began = time.perf_counter()
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [str(BIN / "abc-pdp"), *pdp_flags(signer.trust, state, listen=address)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    pdp = PdpProcess(process, address, "", output)
    with pdp.channel() as channel:
        serving = serving_within(channel, process, 3600)
    took = time.perf_counter() - began
    assert serving, pdp.output()
    assert pdp.stop(timeout=600) == 0
    return took, pdp.output()


@pytest.mark.timeout(7200)
def test_bench_restart(tmp_path: Path) -> None:
    signer = Signer(tmp_path)
    counts = (LARGE // 10, LARGE)
    states: dict[int, Path] = {}
    results: dict[str, dict[str, object]] = {}
    for records in counts:
        state = _base() / "state"
        runs, digest = _registered(signer, state)
        began = time.perf_counter()
        _history(state, runs, digest, records)
        written = time.perf_counter() - began
        cold, output = _start_seconds(signer, state)
        replayed = re.search(r"and (\d+) decision-log records", output)
        # The whole history (checkpoints are not counted as applied).
        assert replayed and int(replayed.group(1)) >= records * 0.99
        states[records] = state
        results[str(records)] = {
            "write_seconds": round(written, 1),
            "segments": len(list(state.glob("decisions.log*"))),
            "cold_start_full_replay_s": round(cold, 2),
        }
    # Restarts taken in turns, so the machine's other load falls on both alike.
    restarts: dict[int, list[float]] = {records: [] for records in counts}
    for _ in range(RESTARTS):
        for records in counts:
            took, output = _start_seconds(signer, states[records])
            assert "restored state from the snapshot at seq" in output
            restarts[records].append(took)
    for records in counts:
        results[str(records)]["restart_from_snapshot"] = summary_ms(restarts[records])
        shutil.rmtree(states[records].parent)
    ratio = percentile(restarts[LARGE], 0.5) / percentile(restarts[LARGE // 10], 0.5)
    path = write_results(
        "restart", {"records": results, f"ratio_p50_restart_{LARGE}_vs_{LARGE // 10}": ratio}
    )
    print(f"\nRestart benchmark ({path})")
    print(json.dumps(results, indent=2))
    print(f"  ratio p50 restart {LARGE} vs {LARGE // 10} records: {ratio:.3f} (bound 1.5)")
    assert ratio <= 1.5
