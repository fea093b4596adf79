"""Issue 18's goals as ratios of one bench_pep run, and the run as a compact table.

Each goal is read per scenario (json / stream, 1 / 16 clients) where it applies; a ratio
that misses its goal is reported MISS, never a failure: the benchmark reports, the issue
judges.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PROCESSES = (
    "floor", "floor_ack", "ack", "sidecar", "sidecar_grpc", "sidecar_ack", "sidecar_tls", "pdp",
    "pdp_tls", "upstream", "client",
)  # fmt: skip
# The targets that proxy to the upstream: their added latency and their own sleeps are read.
PROXIES = ("floor", "floor_ack", "sidecar", "sidecar_grpc", "sidecar_ack", "sidecar_tls")
Scenario = dict[str, Any]


def _cpu(result: Scenario, target: str, process: str) -> float:
    return float(result[target]["cpu_ms_per_request"][process])


def _ratio(mine: float, theirs: float) -> float | None:
    return round(mine / theirs, 3) if theirs > 0 else None


def _added(result: Scenario, q: str) -> float | None:
    """Sidecar's added latency over the least any durable remote decision adds: the floor's,
    one bare gRPC Check's and one fsync's. Streams compare time to first byte. A floor that
    beat direct (a negative added p99: noise in the tail) adds 0, not less."""
    if "sync" not in result:
        return None
    key = f"added_ttfb_{q}_ms" if result["stream"] else f"added_{q}_ms"
    bare = (result[name]["total"][f"{q}_ms"] for name in ("grpc_check", "sync"))
    least = max(result["floor"][key], 0.0) + sum(bare)
    return _ratio(result["sidecar"][key], least)


@dataclass(frozen=True)
class Goal:
    name: str
    text: str
    op: str  # "<=" or ">="
    limit: float
    value: Callable[[Scenario], float | None]

    def verdict(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        compare = operator.le if self.op == "<=" else operator.ge
        return "PASS" if compare(value, self.limit) else "MISS"


GOALS = (
    Goal(
        "sidecar_cpu_vs_floor",
        "sidecar CPU / floor CPU",
        "<=",
        1.5,
        lambda r: _ratio(_cpu(r, "sidecar", "sidecar"), _cpu(r, "floor", "floor")),
    ),
    Goal(
        "pdp_cpu_vs_health_check",
        "PDP CPU per request / per health Check",
        "<=",
        2.0,
        lambda r: _ratio(_cpu(r, "sidecar", "pdp"), _cpu(r, "grpc_check", "pdp")),
    ),
    # The same two over gRPC: what a sidecar whose PDP is not on its host costs.
    Goal(
        "grpc_sidecar_cpu_vs_floor",
        "over gRPC: sidecar CPU / floor CPU",
        "<=",
        1.5,
        lambda r: _ratio(_cpu(r, "sidecar_grpc", "sidecar_grpc"), _cpu(r, "floor", "floor")),
    ),
    Goal(
        "grpc_pdp_cpu_vs_health_check",
        "over gRPC: PDP CPU per request / per Check",
        "<=",
        2.0,
        lambda r: _ratio(_cpu(r, "sidecar_grpc", "pdp"), _cpu(r, "grpc_check", "pdp")),
    ),
    # And over the decide socket's TLS port: a PDP elsewhere, without gRPC. Its PDP is one of
    # its own (TLS on), held to the plaintext Check of the first.
    Goal(
        "tls_sidecar_cpu_vs_floor",
        "over TLS: sidecar CPU / floor CPU",
        "<=",
        1.5,
        lambda r: _ratio(_cpu(r, "sidecar_tls", "sidecar_tls"), _cpu(r, "floor", "floor")),
    ),
    Goal(
        "tls_pdp_cpu_vs_health_check",
        "over TLS: PDP CPU per request / per Check",
        "<=",
        2.0,
        lambda r: _ratio(_cpu(r, "sidecar_tls", "pdp_tls"), _cpu(r, "grpc_check", "pdp")),
    ),
    Goal(
        "upstream_cpu_sidecar_vs_floor",
        "upstream CPU via sidecar / via floor",
        "<=",
        1.1,
        lambda r: _ratio(_cpu(r, "sidecar", "upstream"), _cpu(r, "floor", "upstream")),
    ),
    Goal(
        "added_p50_vs_least",
        "added p50 / (floor + Check + fsync)",
        "<=",
        1.3,
        lambda r: _added(r, "p50"),
    ),
    Goal(
        "added_p99_vs_least",
        "added p99 / (floor + Check + fsync)",
        "<=",
        3.0,
        lambda r: _added(r, "p99"),
    ),
    Goal(
        "throughput_vs_floor",
        "throughput sidecar / floor, 16 clients",
        ">=",
        0.35,
        lambda r: r["sidecar_vs_floor_throughput"] if r["clients"] > 1 else None,
    ),
    Goal(
        "grpc_throughput_vs_floor",
        "over gRPC: throughput / floor, 16 clients",
        ">=",
        0.35,
        lambda r: r["sidecar_grpc_vs_floor_throughput"] if r["clients"] > 1 else None,
    ),
    Goal(
        "tls_throughput_vs_floor",
        "over TLS: throughput / floor, 16 clients",
        ">=",
        0.35,
        lambda r: r["sidecar_tls_vs_floor_throughput"] if r["clients"] > 1 else None,
    ),
    Goal(
        "fsyncs_per_request",
        "PDP fsyncs per enforced request",
        "<=",
        1.0,
        lambda r: r["pdp_writes_per_sidecar_request"]["fsyncs"],
    ),
)


@dataclass(frozen=True)
class Yardstick:
    """A ratio beside the goals, with no limit of its own: what the goals' figures are made
    of on this machine."""

    name: str
    text: str
    value: Callable[[Scenario], float | None]


YARDSTICKS = (
    # The goal's floor never waits for anyone. A proxy that waits on a local answer pays
    # for the wait (its loop goes idle and is woken): the waiting floor says how much.
    Yardstick(
        "floor_ack_cpu_vs_floor",
        "floor waiting on a durable ack / floor CPU",
        lambda r: _ratio(_cpu(r, "floor_ack", "floor_ack"), _cpu(r, "floor", "floor")),
    ),
    Yardstick(
        "sidecar_cpu_vs_floor_ack",
        "sidecar CPU / floor waiting on a durable ack",
        lambda r: _ratio(_cpu(r, "sidecar", "sidecar"), _cpu(r, "floor_ack", "floor_ack")),
    ),
    # The same sidecar deciding against the ack server's canned allow: its own cost (the
    # first), and what waiting on the real PDP's answer adds to it (the second).
    Yardstick(
        "sidecar_ack_cpu_vs_floor",
        "sidecar deciding against the ack server / floor",
        lambda r: _ratio(_cpu(r, "sidecar_ack", "sidecar_ack"), _cpu(r, "floor", "floor")),
    ),
    Yardstick(
        "sidecar_cpu_vs_sidecar_ack",
        "sidecar CPU / the same against the ack server",
        lambda r: _ratio(_cpu(r, "sidecar", "sidecar"), _cpu(r, "sidecar_ack", "sidecar_ack")),
    ),
    # The upstream spends more per request the longer it idles between requests: the
    # waiting floor forwards the floor's bytes but spaces them by its wait, so the upstream's
    # cost through it tells the cadence's share from the bytes'.
    Yardstick(
        "upstream_via_floor_ack_vs_floor",
        "upstream CPU via the waiting floor / via floor",
        lambda r: _ratio(_cpu(r, "floor_ack", "upstream"), _cpu(r, "floor", "upstream")),
    ),
    Yardstick(
        "pdp_cpu_vs_ack",
        "PDP CPU per request / the ack server's",
        lambda r: _ratio(_cpu(r, "sidecar", "pdp"), _cpu(r, "floor_ack", "ack")),
    ),
)


def goals(results: dict[str, Scenario]) -> dict[str, Any]:
    """Every goal's value and verdict in each scenario it applies to."""
    table: dict[str, Any] = {}
    for goal in GOALS:
        per: dict[str, Any] = {}
        for scenario, result in results.items():
            value = goal.value(result)
            if value is not None or goal.name == "fsyncs_per_request":
                per[scenario] = {"value": value, "verdict": goal.verdict(value)}
        table[goal.name] = {"goal": f"{goal.op} {goal.limit}", "text": goal.text, **per}
    return table


def yardsticks(results: dict[str, Scenario]) -> dict[str, Any]:
    """Every yardstick's value in each scenario."""
    return {
        stick.name: {
            "text": stick.text,
            **{scenario: stick.value(result) for scenario, result in results.items()},
        }
        for stick in YARDSTICKS
    }


def _num(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.3f}"


def lines(results: dict[str, Scenario], table: dict[str, Any], beside: dict[str, Any]) -> list[str]:
    """The run as printed: per scenario and target latency, throughput and CPU per request
    of each process; then how often each proxy slept, the PDP's writes, the latency split,
    the goals and the yardsticks beside them."""
    out: list[str] = []
    for scenario, result in results.items():
        stream = "_ttfb" if result["stream"] else ""
        first = ", time to first byte" if stream else ""
        out.append(f"  {scenario} (added: over direct{first}; CPU: ms per request, by process)")
        out.append(
            f"    {'':<12} {'p50 ms':>8} {'p99 ms':>8} {'ttfb p50':>9} {'req/s':>8}"
            f" {'added p50':>9} {'added p99':>9} |"
            + "".join(f" {p:>{max(8, len(p))}}" for p in PROCESSES)
        )
        for name, entry in result.items():
            if not isinstance(entry, dict) or "total" not in entry:
                continue
            added = "".join(
                f" {_num(entry.get(f'added{stream}_{q}_ms'), 9)}" for q in ("p50", "p99")
            )
            cpu = "".join(
                f" {_num(entry['cpu_ms_per_request'].get(p), max(8, len(p)))}" for p in PROCESSES
            )
            out.append(
                f"    {name:<12} {entry['total']['p50_ms']:8.3f} {entry['total']['p99_ms']:8.3f}"
                f" {entry['ttfb']['p50_ms']:9.3f} {entry['throughput_per_s']:8.1f}{added} |{cpu}"
            )
        out.append(
            "    sleeps per request (the proxy's own): "
            + ", ".join(
                f"{name} {result[name]['sleeps_per_request'][name]}"
                for name in PROXIES
                if name in result
            )
        )
        writes = result["pdp_writes_per_sidecar_request"]
        records = ", ".join(f"{kind} {n}" for kind, n in writes["log_records"].items())
        fsyncs = "n/a (perf could not count)" if writes["fsyncs"] is None else writes["fsyncs"]
        out.append(
            f"    PDP per sidecar request: fsyncs {fsyncs}, write syscalls"
            f" {writes['write_syscalls']}, log records: {records}"
        )
        if "split_p50_ms" in result:
            cut = result["split_p50_ms"]
            out.append(
                f"    sidecar added p50 = floor {cut['floor_added']:.3f} + Decide"
                f" {cut['decide_rpc']:.3f} + the rest {cut['rest']:.3f} ms; floor + bare gRPC"
                f" Check + fsync = {cut['durable_remote_decision_floor']:.3f} ms"
            )
    scenarios = list(results)
    out.append(f"  {'goal (issue 18)':<48}" + "".join(f"{s:>22}" for s in scenarios))
    for goal in GOALS:
        row = table[goal.name]
        cells = "".join(
            f"{_num(row[s]['value'], 0) + ' ' + row[s]['verdict'] if s in row else '':>22}"
            for s in scenarios
        )
        out.append(f"  {goal.text:<40} {row['goal']:<7}{cells}")
    out.append(f"  {'beside the goals':<48}" + "".join(f"{s:>22}" for s in scenarios))
    for stick in YARDSTICKS:
        row = beside[stick.name]
        out.append(f"  {stick.text:<48}" + "".join(_num(row[s], 22) for s in scenarios))
    return out
