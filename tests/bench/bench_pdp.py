"""PDP benchmark: Decide against the same server's bare health Check, one run, one client.

Prints p50/p99 for Check and for Decide (allowed and refused; 5 and 1,000 tools; decisions
served from the cache and forced past it with unique arguments), the ratios, and
throughput with 4 client threads; then the OPA REST door against the same server's gRPC
Decide (same inputs, one keep-alive connection, turns taken batch by batch).
Writes bench-results/pdp.json.
"""

from __future__ import annotations

import http.client
import itertools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.bench.conftest import percentile, summary_ms, write_results
from tests.harness import Signer, start_pdp

ROUNDS, BATCH, WARMUP = 10, 200, 300
THREADS, THROUGHPUT_CALLS = 4, 2000
REST_ROUNDS, REST_BATCH = 5, 60  # per door and input kind: 600 REST calls in all


def intent(tools: int) -> str:
    lines = [
        "tenant: acme",
        "agent: bench",
        f"lineage: acme/bench-{tools}",
        "version: 1",
        "lifetime: 1h",
        "models: []",
        "tools:",
    ]
    for i in range(tools):
        lines += [
            "  - server: bench",
            f"    name: t{i}",
            "    args:",
            "      query: {type: string, required: true, maxLength: 200}",
        ]
    lines += [
        "budgets: {tokens: 1000000000, usd_micros: 1000000000,"
        " tool_calls: 1000000000, requests: 1000000000}",
        "steps:",
        "  - id: work",
        "    uses: [" + ", ".join(f"tool:bench/t{i}" for i in range(tools)) + "]",
    ]
    return "\n".join(lines) + "\n"


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


@pytest.mark.timeout(600)
def test_bench_pdp(tmp_path: Path) -> None:
    signer = Signer(tmp_path)
    pdp = start_pdp(signer, tmp_path / "state", http=True)
    channel = pdp.channel()
    decide = pdp_pb2_grpc.DecisionServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    runs = {
        n: decide.RegisterManifest(
            pdp_pb2.RegisterManifestRequest(envelope=signer.freeze(intent(n), f"bench{n}")),
            timeout=30,
        ).run_id
        for n in (5, 1000)
    }
    ids = itertools.count()

    def request(tools: int, allowed: bool, unique: bool) -> pdp_pb2.DecideRequest:
        i = next(ids)
        query = f"q{i}" if unique else "q"
        name = f"t{tools - 1}" if allowed else "not_in_manifest"
        return pdp_pb2.DecideRequest(
            run_id=runs[tools],
            request_id=f"b{i}",
            action=pdp_pb2.Action(
                kind="tool",
                target=f"tool:bench/{name}",
                args_json=json.dumps({"query": query}).encode(),
            ),
        )

    check = health_pb2.HealthCheckRequest()
    targets: dict[str, Callable[[], object]] = {"check": lambda: health.Check(check, timeout=5)}
    for tools in (5, 1000):
        for allowed in (True, False):
            for unique in (False, True):
                verdict = "allow" if allowed else "deny"
                label = f"decide_{tools}_{verdict}_{'uncached' if unique else 'cached'}"
                targets[label] = lambda t=tools, a=allowed, u=unique: decide.Decide(
                    request(t, a, u), timeout=5
                )
    for target in targets.values():  # warm-up, unmeasured
        for _ in range(WARMUP // 4):
            target()
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(ROUNDS):  # targets take turns batch by batch, so drift hits all alike
        for name, target in targets.items():
            samples[name].extend(timed(target) for _ in range(BATCH))
    for name in targets:
        if name != "check":
            assert decide.Decide(request(5, True, False), timeout=5).allow

    results: dict[str, object] = {"latency": {n: summary_ms(s) for n, s in samples.items()}}
    check_p50 = percentile(samples["check"], 0.5)
    ratios = {
        name: round(percentile(s, 0.5) / check_p50, 3)
        for name, s in samples.items()
        if name != "check"
    }
    results["ratio_p50_vs_check"] = ratios
    results["ratio_p50_1000_vs_5_tools"] = {
        kind: round(
            percentile(samples[f"decide_1000_{kind}"], 0.5)
            / percentile(samples[f"decide_5_{kind}"], 0.5),
            3,
        )
        for kind in ("allow_cached", "deny_cached", "allow_uncached", "deny_uncached")
    }

    def throughput(call: Callable[[], object]) -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(lambda _: call(), range(THROUGHPUT_CALLS)))
        return round(THROUGHPUT_CALLS / (time.perf_counter() - started), 1)

    results["throughput_per_s_4_threads"] = {
        "check": throughput(targets["check"]),
        "decide_5_allow_cached": throughput(targets["decide_5_allow_cached"]),
        "decide_5_allow_uncached": throughput(targets["decide_5_allow_uncached"]),
        "decide_1000_deny_uncached": throughput(targets["decide_1000_deny_uncached"]),
    }
    results["rest_vs_grpc"] = rest_vs_grpc(pdp.http_address, runs[5], decide, ids)
    channel.close()
    assert pdp.stop() == 0
    path = write_results("pdp", results)
    print(f"\nPDP benchmark ({path})")
    for name, stats in results["latency"].items():  # type: ignore[union-attr]
        ratio = ratios.get(name)
        print(
            f"  {name:<30} p50 {stats['p50_ms']:7.3f} ms  p99 {stats['p99_ms']:7.3f} ms"
            + (f"  x{ratio} of check" if ratio else "")
        )
    print(f"  1000 vs 5 tools (p50): {results['ratio_p50_1000_vs_5_tools']}")
    print(f"  throughput, {THREADS} threads: {results['throughput_per_s_4_threads']}")
    rest = results["rest_vs_grpc"]
    for name, stats in rest["latency"].items():  # type: ignore[index]
        print(f"  {name:<30} p50 {stats['p50_ms']:7.3f} ms  p99 {stats['p99_ms']:7.3f} ms")
    print(f"  REST / gRPC Decide (p50): {rest['ratio_p50_rest_vs_grpc']}")  # type: ignore[index]


def rest_vs_grpc(
    address: str,
    run_id: str,
    decide: pdp_pb2_grpc.DecisionServiceStub,
    ids: itertools.count[int],
) -> dict[str, object]:
    """The same allowed tool call through OPA's REST door and through gRPC Decide."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=5)  # kept alive

    def args(unique: bool) -> dict[str, str]:
        return {"query": f"q{next(ids)}" if unique else "q"}

    def rest(unique: bool) -> None:
        doc = {
            "run_id": run_id,
            "request_id": f"rest{next(ids)}",
            "action": {"kind": "tool", "target": "tool:bench/t4", "args": args(unique)},
        }
        connection.request(
            "POST",
            "/v1/data/abc/authz/decision",
            json.dumps({"input": doc}),
            {"Content-Type": "application/json"},
        )
        answer = json.loads(connection.getresponse().read())
        assert answer["result"]["allow"] is True

    def grpc(unique: bool) -> None:
        action = pdp_pb2.Action(
            kind="tool", target="tool:bench/t4", args_json=json.dumps(args(unique)).encode()
        )
        request = pdp_pb2.DecideRequest(run_id=run_id, request_id=f"g{next(ids)}", action=action)
        assert decide.Decide(request, timeout=5).allow

    targets: dict[str, Callable[[], object]] = {
        "grpc_decide_5_allow_cached": lambda: grpc(False),
        "rest_decide_5_allow_cached": lambda: rest(False),
        "grpc_decide_5_allow_uncached": lambda: grpc(True),
        "rest_decide_5_allow_uncached": lambda: rest(True),
    }
    for target in targets.values():  # warm-up: the connection, the pool's threads
        for _ in range(20):
            target()
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(REST_ROUNDS):
        for name, target in targets.items():
            samples[name].extend(timed(target) for _ in range(REST_BATCH))
    connection.close()
    return {
        "latency": {name: summary_ms(s) for name, s in samples.items()},
        "ratio_p50_rest_vs_grpc": {
            kind: round(
                percentile(samples[f"rest_decide_5_allow_{kind}"], 0.5)
                / percentile(samples[f"grpc_decide_5_allow_{kind}"], 0.5),
                3,
            )
            for kind in ("cached", "uncached")
        },
    }
