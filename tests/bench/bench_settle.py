"""Settlement benchmark: what a call costs when the agent's calls come further apart than the
settle linger, so that no decision carries the last call's usage.

One client makes one json call every ``PACE`` seconds (an agent that reads each answer
before its next call) through four targets, taking turns batch by batch against one PDP:

- ``floor``: the bare aiohttp pass-through (``floor_proxy``), the yardstick;
- ``settle_grpc``: a sidecar whose settlements go over gRPC, as before they could go on the
  decide socket: its socket is a relay that passes the PDP decisions and closes any other
  connection, as a PDP of before does (the sidecar then settles over gRPC);
- ``settle_socket``: a sidecar on the PDP's decide socket, the default linger (100 ms):
  each call's usage travels alone, on the socket, and the PDP holds its answer until the
  next decision's commit makes it durable (at most ``SETTLE_WAIT_SECONDS``);
- ``linger_1s``: the same with ``--settle-linger-ms 1000``: the next decision carries it.

For each: CPU ms per call of the sidecar and the PDP (``cpu.py``), the PDP's fsyncs and
records per call, p50 and p99 latency. Writes bench-results/settle.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.bench.bench_pep import one, spawn_quiet, unbounded_envelope, wait_port, wait_socket
from tests.bench.conftest import summary_ms, write_results
from tests.bench.cpu import CpuMeter
from tests.harness import POLICIES, DecideRelay, Signer, free_port, start_pdp, start_pep

PACE = 0.15  # longer than the default linger (0.1 s)
BATCH, BATCHES, WARMUP = 30, 4, 10
SIDECARS = ("settle_grpc", "settle_socket", "linger_1s")


async def _paced(session: aiohttp.ClientSession, url: str, count: int, took: list[float]) -> None:
    for _ in range(count):
        started = time.perf_counter()
        took.append((await one(session, url, False))[1])
        await asyncio.sleep(max(0.0, PACE - (time.perf_counter() - started)))


async def _load(urls: dict[str, str], meters: dict[str, CpuMeter]) -> dict[str, list[float]]:
    took: dict[str, list[float]] = {name: [] for name in urls}
    async with aiohttp.ClientSession() as session:
        for url in urls.values():
            await _paced(session, url, WARMUP, [])
        await meters["floor"].settled()  # the warm-up's last settlements are no batch's
        for _ in range(BATCHES):
            for name, url in urls.items():
                await meters[name].measure(name, _paced(session, url, BATCH, took[name]))
    return took


@pytest.mark.timeout(600)
def test_bench_settle(tmp_path: Path) -> None:
    with contextlib.ExitStack() as started:
        results = _run(tmp_path, started)
    path = write_results("settle", results)
    print(f"\nSettlement benchmark, one call every {PACE * 1000:.0f} ms ({path})")
    print(
        f"  {'':14s} {'p50 ms':>8s} {'p99 ms':>8s} {'sidecar ms':>11s} {'x floor':>8s}"
        f" {'pdp ms':>8s} {'fsyncs':>7s}  records per call"
    )
    for name, row in results["targets"].items():
        print(
            f"  {name:14s} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f} {row['proxy_cpu_ms']:11.3f}"
            f" {row['proxy_cpu_vs_floor']:8.3f} {row['pdp_cpu_ms']:8.3f}"
            f" {row['fsyncs_per_call'] if row['fsyncs_per_call'] is not None else '-':>7}"
            f"  {row['records_per_call']}"
        )
    grpc, sock, linger = (results["targets"][name] for name in SIDECARS)
    print(
        f"  settling on the socket / over gRPC: sidecar CPU"
        f" {sock['proxy_cpu_ms'] / grpc['proxy_cpu_ms']:.3f},"
        f" PDP CPU {sock['pdp_cpu_ms'] / grpc['pdp_cpu_ms']:.3f};"
        f" a 1 s linger / 100 ms: sidecar {linger['proxy_cpu_ms'] / sock['proxy_cpu_ms']:.3f},"
        f" PDP {linger['pdp_cpu_ms'] / sock['pdp_cpu_ms']:.3f}"
    )
    # Every sidecar call was decided and settled once, whichever way its usage went.
    for name in SIDECARS:
        records = results["targets"][name]["records_per_call"]
        assert records.get("decision") == records.get("settlement") == 1.0, (name, records)


def _run(tmp_path: Path, started: contextlib.ExitStack) -> dict[str, Any]:
    upstream_port, floor_port = free_port(), free_port()
    spawn_quiet(started, "-m", "tests.bench.fake_upstream", str(upstream_port))
    upstream = f"http://127.0.0.1:{upstream_port}"
    floor = spawn_quiet(started, "-m", "tests.bench.floor_proxy", str(floor_port), upstream)
    signer = Signer(tmp_path)
    state = tmp_path / "state"
    sockets = Path(os.environ.get("TMPDIR", "/tmp")) / f"abc-settle-{os.getpid()}"
    sockets.mkdir()  # a socket's path fits in 108 bytes: pytest's tmp paths may not
    started.callback(shutil.rmtree, sockets, ignore_errors=True)
    decide_socket = sockets / "decide.sock"
    pdp = start_pdp(signer, state, POLICIES, "--decide-socket", str(decide_socket))
    started.callback(pdp.stop)
    wait_socket(decide_socket)
    relay = DecideRelay(decide_socket, sockets / "old.sock", decisions_only=True)
    started.callback(relay.close)
    envelope = unbounded_envelope(signer, tmp_path / "envelope.json", "acme/bench-settle")
    flags = ("--manifest", str(envelope), "--log-level", "ERROR")
    peps = {}
    # Settling over gRPC goes last in each round: a settlement the socket's sidecars had
    # answered before it was durable is written with the next commit, and its decisions'
    # commits are the last round's last.
    for name, socket_path, extra in (
        ("settle_socket", decide_socket, ()),
        ("linger_1s", decide_socket, ("--settle-linger-ms", "1000")),
        ("settle_grpc", relay.path, ()),
    ):
        directory = tmp_path / name
        directory.mkdir()
        peps[name] = start_pep(
            pdp.address,
            {"openai": upstream},
            directory,
            *flags,
            "--pdp-socket",
            str(socket_path),
            *extra,
        )
        started.callback(peps[name].stop)
    wait_port(upstream_port)
    wait_port(floor_port)
    urls = {"floor": f"http://127.0.0.1:{floor_port}/v1/chat/completions"}
    urls |= {name: f"{pep.url}/openai/v1/chat/completions" for name, pep in peps.items()}
    proxies = {"floor": floor.pid} | {name: pep.process.pid for name, pep in peps.items()}
    pids = proxies | {"pdp": pdp.process.pid, "client": os.getpid()}
    meters = {
        name: CpuMeter(
            pids, state / "decisions.log", counted=name, linger=1.0 if name == "linger_1s" else 0.1
        )
        for name in urls
    }
    took = asyncio.run(_load(urls, meters))
    calls = BATCH * BATCHES
    targets: dict[str, Any] = {}
    for name, meter in meters.items():
        spent = meter.cpu[name]
        fsyncs = meter.close()
        targets[name] = {
            **summary_ms(took[name]),
            "proxy_cpu_ms": round(spent[name] / calls * 1000, 4),
            "pdp_cpu_ms": round(spent["pdp"] / calls * 1000, 4),
            "fsyncs_per_call": None if fsyncs is None else round(fsyncs / calls, 3),
            "records_per_call": {k: round(v / calls, 3) for k, v in sorted(meter.records.items())},
        }
    floor_cpu = targets["floor"]["proxy_cpu_ms"]
    for row in targets.values():
        row["proxy_cpu_vs_floor"] = round(row["proxy_cpu_ms"] / floor_cpu, 3)
    return {"pace_s": PACE, "calls_per_target": calls, "targets": targets}
