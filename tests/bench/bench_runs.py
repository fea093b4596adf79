"""Many runs of one grant: StartRun against Decide, and Decide with 10,000 live runs against
Decide with one, on one real abc-pdp (memory store), with its RSS as runs accumulate; then,
on a second abc-pdp that releases ended runs at once (``--run-retention 0``), its RSS after
1,000 and after 100,000 runs started and ended (``ABC_ENDED_RUNS`` for fewer).

A third abc-pdp has grants registered 20 a second, each valid for three seconds (a
manifest per task; about 60 held at any moment): its RSS after 200 and after 1,000 such
grants (``ABC_EXPIRED_GRANTS`` for another count), each released once expired as later
ones register; then the same on an abc-pdp whose Go runtime has ``GOMEMLIMIT=256MiB``.

Baselines are taken in the same run: the server's bare health Check, and Decide on a
grant with a single started run. Writes bench-results/runs.json.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdp.api import pdp_pb2, pdp_pb2_grpc
from pdp.bundle import load_bundle
from pdp.manifest.keys import load_private_key
from tests.bench.bench_engine import rss_mb
from tests.bench.bench_pdp import intent
from tests.bench.conftest import percentile, summary_ms, write_results
from tests.factories import manifest_document, signed_envelope
from tests.harness import POLICIES, Signer, start_pdp

LIVE_RUNS, SAMPLES, WARMUP = 10_000, 2_000, 300
ENDED_RUNS = int(os.environ.get("ABC_ENDED_RUNS", "100000"))
EXPIRED_GRANTS = int(os.environ.get("ABC_EXPIRED_GRANTS", "1000"))


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


@pytest.mark.timeout(900)
def test_bench_runs(tmp_path: Path) -> None:
    signer = Signer(tmp_path)
    pdp = start_pdp(signer, tmp_path / "state")
    channel = pdp.channel()
    stub = pdp_pb2_grpc.DecisionServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    envelope = signer.freeze(intent(5), "runs")
    digest = stub.RegisterManifest(
        pdp_pb2.RegisterManifestRequest(envelope=envelope), timeout=30
    ).manifest_digest
    ids = itertools.count()

    def start(key: str) -> str:
        request = pdp_pb2.StartRunRequest(manifest_digest=digest, run_key=key)
        return str(stub.StartRun(request, timeout=10).run_id)

    def decide(run_id: str) -> None:
        request = pdp_pb2.DecideRequest(
            run_id=run_id,
            request_id=f"b{next(ids)}",
            action=pdp_pb2.Action(
                kind="tool", target="tool:bench/t4", args_json=json.dumps({"query": "q"}).encode()
            ),
        )
        assert stub.Decide(request, timeout=10).allow

    check = health_pb2.HealthCheckRequest()
    solo = start("solo")
    for _ in range(WARMUP):
        health.Check(check, timeout=5)
        decide(solo)
    check_one = [_timed(lambda: health.Check(check, timeout=5)) for _ in range(SAMPLES)]
    decide_one = [_timed(lambda: decide(solo)) for _ in range(SAMPLES)]
    rss = {"1": rss_mb(pdp.process.pid)}

    started: list[str] = []
    start_samples: list[float] = []
    for n in range(LIVE_RUNS - 1):
        began = time.perf_counter()
        started.append(start(f"task-{n}"))
        start_samples.append(time.perf_counter() - began)
        if len(started) + 1 in (1_000, LIVE_RUNS):
            rss[str(len(started) + 1)] = rss_mb(pdp.process.pid)
    live = [solo, *started]
    check_many = [_timed(lambda: health.Check(check, timeout=5)) for _ in range(SAMPLES)]
    decide_many = [_timed(lambda: decide(random.choice(live))) for _ in range(SAMPLES)]
    channel.close()
    assert pdp.stop() == 0
    rss_ended = _ended_runs_rss(signer, tmp_path)
    rss_grants = _expired_grants_rss(signer, tmp_path / "grants")
    rss_grants_limited = _expired_grants_rss(signer, tmp_path / "limited", "256MiB")

    def p50(samples: list[float]) -> float:
        return percentile(samples, 0.5)

    # Each Decide against the Check taken beside it, so drift between the phases cancels.
    decide_ratio = (p50(decide_many) / p50(check_many)) / (p50(decide_one) / p50(check_one))
    results = {
        "latency": {
            "check_one_run": summary_ms(check_one),
            "decide_one_run": summary_ms(decide_one),
            "start_run": summary_ms(start_samples),
            "check_10000_runs": summary_ms(check_many),
            "decide_10000_runs": summary_ms(decide_many),
        },
        "ratio_p50_decide_10000_vs_1_run": round(decide_ratio, 3),
        "ratio_p50_start_run_vs_decide": round(p50(start_samples) / p50(decide_one), 3),
        "rss_mb_by_live_runs": {k: round(v, 1) for k, v in rss.items()},
        "ratio_rss_10000_vs_1000_runs": round(rss[str(LIVE_RUNS)] / rss["1000"], 3),
        "rss_mb_by_runs_started_and_ended": {k: round(v, 1) for k, v in rss_ended.items()},
        f"ratio_rss_{ENDED_RUNS}_vs_1000_ended_runs": round(
            rss_ended[str(ENDED_RUNS)] / rss_ended["1000"], 3
        ),
        "rss_mb_by_grants_registered_and_expired": {k: round(v, 1) for k, v in rss_grants.items()},
        f"ratio_rss_{EXPIRED_GRANTS}_vs_200_expired_grants": round(
            rss_grants[str(EXPIRED_GRANTS)] / rss_grants["200"], 3
        ),
        "rss_mb_by_grants_registered_and_expired_gomemlimit_256mib": {
            k: round(v, 1) for k, v in rss_grants_limited.items()
        },
    }
    path = write_results("runs", results)
    print(f"\nRuns benchmark ({path})")
    for name, stats in results["latency"].items():  # type: ignore[union-attr]
        print(f"  {name:<22} p50 {stats['p50_ms']:7.3f} ms  p99 {stats['p99_ms']:7.3f} ms")
    for name in (
        "ratio_p50_decide_10000_vs_1_run",
        "ratio_p50_start_run_vs_decide",
        "rss_mb_by_live_runs",
        "ratio_rss_10000_vs_1000_runs",
        "rss_mb_by_runs_started_and_ended",
        f"ratio_rss_{ENDED_RUNS}_vs_1000_ended_runs",
        "rss_mb_by_grants_registered_and_expired",
        f"ratio_rss_{EXPIRED_GRANTS}_vs_200_expired_grants",
        "rss_mb_by_grants_registered_and_expired_gomemlimit_256mib",
    ):
        print(f"  {name}: {results[name]}")


def _ended_runs_rss(signer: Signer, tmp_path: Path) -> dict[str, float]:
    """RSS of an abc-pdp after 1,000 and after ENDED_RUNS runs were started, used once and
    ended (four clients at once); each StartRun releases runs that ended before it."""
    pdp = start_pdp(signer, tmp_path / "ended", POLICIES, "--run-retention", "0")
    channel = pdp.channel()
    stub = pdp_pb2_grpc.DecisionServiceStub(channel)
    envelope = signer.freeze(intent(5).replace("acme/bench-5", "acme/bench-ended"), "ended")
    digest = stub.RegisterManifest(
        pdp_pb2.RegisterManifestRequest(envelope=envelope), timeout=30
    ).manifest_digest

    def one_run(n: int) -> None:
        start = pdp_pb2.StartRunRequest(manifest_digest=digest, run_key=f"task-{n}")
        run_id = stub.StartRun(start, timeout=10).run_id
        call = pdp_pb2.Action(
            kind="tool", target="tool:bench/t1", args_json=json.dumps({"query": "q"}).encode()
        )
        assert stub.Decide(
            pdp_pb2.DecideRequest(run_id=run_id, request_id=f"c{n}", action=call), timeout=10
        ).allow
        end = pdp_pb2.Action(kind="step", target="step:@completed")
        assert stub.Decide(
            pdp_pb2.DecideRequest(run_id=run_id, request_id=f"e{n}", action=end), timeout=10
        ).allow

    rss: dict[str, float] = {}
    try:
        with ThreadPoolExecutor(4) as pool:
            done = 0
            for upto in (1_000, ENDED_RUNS):
                list(pool.map(one_run, range(done, upto)))
                done = upto
                rss[str(upto)] = rss_mb(pdp.process.pid)
    finally:
        channel.close()
        assert pdp.stop() == 0
    return rss


def _expired_grants_rss(signer: Signer, state: Path, go_memory_limit: str = "") -> dict[str, float]:
    """RSS of an abc-pdp after 200 and after EXPIRED_GRANTS grants were registered, 20 a
    second, each valid for three seconds: each registration releases grants that expired
    before it, their compiled policies included, so about the last three seconds' grants
    are held. ``go_memory_limit``: the Go runtime's GOMEMLIMIT in abc-pdp, if any."""
    saved = os.environ.get("GOMEMLIMIT")
    if go_memory_limit:
        os.environ["GOMEMLIMIT"] = go_memory_limit
    try:
        pdp = start_pdp(signer, state, POLICIES, "--run-retention", "0")
    finally:
        if saved is None:
            os.environ.pop("GOMEMLIMIT", None)
        else:
            os.environ["GOMEMLIMIT"] = saved
    channel = pdp.channel()
    stub = pdp_pb2_grpc.DecisionServiceStub(channel)
    key = load_private_key(signer.key)
    bundle_digest = load_bundle(POLICIES).digest

    def register(n: int) -> None:
        now = datetime.now(UTC).replace(microsecond=0)
        document = manifest_document(
            lineage=f"acme/task-{n}",
            version=1,
            issued_at=_iso(now - timedelta(seconds=1)),
            not_before=_iso(now - timedelta(seconds=1)),
            expires_at=_iso(now + timedelta(seconds=3)),
        )
        document["policy"]["bundle_digest"] = bundle_digest
        request = pdp_pb2.RegisterManifestRequest(envelope=signed_envelope(key, document))
        stub.RegisterManifest(request, timeout=30)

    rss: dict[str, float] = {}
    try:
        began = time.monotonic()
        for n in range(EXPIRED_GRANTS):
            time.sleep(max(0.0, began + n / 20 - time.monotonic()))  # 20 a second
            register(n)
            if n + 1 in (200, EXPIRED_GRANTS):
                rss[str(n + 1)] = rss_mb(pdp.process.pid)
    finally:
        channel.close()
        assert pdp.stop() == 0
    return rss


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
