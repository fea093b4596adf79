"""PEP benchmark: what the sidecar adds, in latency, throughput and CPU, against direct and a
bare proxy.

One run, one machine: the same chat-completion load (non-streaming and streaming; 1 and 16
concurrent clients) goes (a) straight to the fake upstream, (b) through a bare aiohttp
pass-through (the floor of any Python proxy), (c) through the same pass-through waiting, for
each request, on a bare local process that answers after one durable write
(``ack_server``: the floor of any proxy that waits on a durable local decision), (d)
through the sidecar with a real PDP, deciding on the PDP's decide socket, (e) through a
second sidecar deciding over gRPC, (f) through a third sidecar whose decide socket is the
ack server's, which answers it a well-formed allow after the same synced line: the
sidecar's own cost, apart from what waiting on the real PDP adds to it, (g) through a
fourth sidecar deciding over TLS on the decide port of a second PDP of its own
(``--decide-listen``): a PDP elsewhere, without gRPC. The targets take turns batch by
batch after an unmeasured warm-up, and every process's CPU is read around each batch
(``cpu.py``): CPU ms per request of both floors, the ack server, the sidecars, both PDPs,
the upstream and this client, for each target. Writes bench-results/pep.json.

With one client, three more baselines take the same turns, so the sidecar's added latency
can be split: a bare gRPC health check to the same PDP, one ``Decide`` for the sidecar's run
(what the sidecar waits for), and one synced append to a file beside the PDP's log. Floor +
bare gRPC + sync is the least that any sidecar asking a remote PDP for a durable decision
can add on this machine. The health check also runs at 16 clients: the PDP's CPU per Check
is the yardstick of its CPU per enforced request. A stream keeps its client tens of ms, so
the PDP idles that long between a sidecar's decisions: at one client, the baselines of the
stream scenario start one call per sidecar stream (the median length of the sidecar's
streams measured so far), lest a Check kept hotter look cheaper than the same Check at the
rate the sidecar's decisions come. Issue 18's goals are read off as ratios
(``pep_report.py``); ``ABC_BENCH_PYSPY`` adds profiles (``profiles.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.bench.conftest import percentile, summary_ms, write_results
from tests.bench.cpu import CpuMeter
from tests.bench.pep_report import PROXIES, goals, lines, yardsticks
from tests.bench.profiles import Profiles, pyspy, report
from tests.harness import (
    INTENT,
    POLICIES,
    PdpProcess,
    PepProcess,
    Signer,
    abcctl,
    free_port,
    start_pdp,
    start_pep,
)

SINGLE, CONCURRENT, CLIENTS, BATCH, WARMUP = 300, 800, 16, 50, 60
# The paced scenario starts one request every PACE seconds at every target, so each process
# idles between requests as long whatever it serves: back to back, a fast baseline (a bare
# Check, the floor) stays hot and looks cheaper per request than it is when requests come
# at an agent's pace, which is how the sidecar's requests reach the PDP and the upstream.
PACE = 0.01
PROFILED = 1000  # requests under py-spy: at 200 Hz, enough samples where the GIL is held
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "bench"}],
    "max_tokens": 64,
}


def wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def wait_socket(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


Sample = tuple[float, float]  # (time to first byte, total), in seconds
Target = Callable[[], Awaitable[Sample]]


async def one(session: aiohttp.ClientSession, url: str, stream: bool) -> Sample:
    """(time to first byte, total) of one request, body read to the end."""
    started = time.perf_counter()
    payload = (
        {**BODY, "stream": True, "stream_options": {"include_usage": True}} if stream else BODY
    )
    async with session.post(url, json=payload) as response:
        assert response.status == 200, await response.text()
        first = None
        async for _chunk in response.content.iter_any():
            if first is None:
                first = time.perf_counter() - started
        total = time.perf_counter() - started
    return first or total, total


def fetch(session: aiohttp.ClientSession, url: str, stream: bool) -> Target:
    return lambda: one(session, url, stream)


def timed(call: Callable[[], Awaitable[object]]) -> Target:
    async def target() -> Sample:
        started = time.perf_counter()
        await call()
        total = time.perf_counter() - started
        return total, total

    return target


def baselines(pdp: PdpProcess, run_id: str, state: Path) -> dict[str, Callable[[], Target]]:
    """The split of a sidecar request's cost, as targets made inside the benchmark's loop."""
    log = os.open(state / "bench-sync", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    line = b"x" * 900 + b"\n"  # about a decision record

    async def synced() -> None:
        os.write(log, line)
        os.fdatasync(log)

    def grpc_check() -> Target:
        stub = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(pdp.address))
        return timed(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5))

    def decide() -> Target:
        stub = pdp_pb2_grpc.DecisionServiceStub(grpc.aio.insecure_channel(pdp.address))  # type: ignore[no-untyped-call]
        action = pdp_pb2.Action(
            kind="model", target="model:openai/gpt-4o-mini", max_tokens=64, input_bytes=120
        )
        ids = iter(range(10**9))
        return timed(
            lambda: stub.Decide(
                pdp_pb2.DecideRequest(
                    run_id=run_id, request_id=f"bench-{next(ids)}", action=action
                ),
                timeout=5,
            )
        )

    return {"grpc_check": grpc_check, "decide_rpc": decide, "sync": lambda: timed(synced)}


async def load(
    urls: dict[str, str],
    stream: bool,
    clients: int,
    count: int,
    extra: dict[str, Callable[[], Target]],
    meter: CpuMeter,
    pace: float = 0.0,
    baseline_pace: float | None = 0.0,
) -> dict[str, Any]:
    """``baseline_pace`` None: the baselines start one call per sidecar request's length."""
    connector = aiohttp.TCPConnector(limit=clients * 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        targets: dict[str, Target] = {
            name: fetch(session, url, stream) for name, url in urls.items()
        }
        targets |= {name: make() for name, make in extra.items()}
        for target in targets.values():
            await asyncio.gather(*(target() for _ in range(WARMUP // 3)))
        await meter.settled()  # the warm-up's last settlement is not the first batch's
        await meter.quiet()
        samples: dict[str, list[Sample]] = {name: [] for name in targets}
        busy: dict[str, float] = dict.fromkeys(targets, 0.0)
        periods: list[float] = []  # the baselines' paces, when they follow the sidecar's

        async def batch(name: str, target: Target) -> None:
            queue = list(range(BATCH))
            period = baseline_pace if name in extra else pace
            if period is None:
                # As often as the sidecar's decisions come: one call per sidecar request,
                # as long as their median so far (each round runs the sidecar's batch first).
                period = percentile([total for _, total in samples["sidecar"]], 0.5)
                periods.append(period)

            async def client() -> None:
                while queue:
                    queue.pop()
                    due = time.perf_counter() + period
                    samples[name].append(await target())
                    if period:
                        await asyncio.sleep(max(0.0, due - time.perf_counter()))

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            busy[name] += time.perf_counter() - started

        try:
            for _ in range(count // BATCH):
                for name, target in targets.items():
                    await meter.measure(name, batch(name, target))
        finally:
            fsyncs = meter.close()
    result: dict[str, Any] = {
        "stream": stream,
        "clients": clients,
        "pace_ms": pace * 1000,
        "baseline_pace_ms": round(
            (baseline_pace if baseline_pace is not None else percentile(periods, 0.5)) * 1000, 1
        ),
    }
    direct = samples["direct"]
    for name, values in samples.items():
        totals, firsts = [v[1] for v in values], [v[0] for v in values]
        entry: dict[str, Any] = {
            "total": summary_ms(totals),
            "ttfb": summary_ms(firsts),
            "throughput_per_s": round(len(values) / busy[name], 1),
            "cpu_ms_per_request": {
                process: round(seconds * 1000 / len(values), 4)
                for process, seconds in meter.cpu[name].items()
            },
            "sleeps_per_request": {
                process: round(count / len(values), 3)
                for process, count in meter.sleeps[name].items()
            },
        }
        if name in PROXIES:
            for key, pick in (("", 1), ("_ttfb", 0)):
                ours, theirs = [v[pick] for v in values], [d[pick] for d in direct]
                for q in (0.5, 0.99):
                    entry[f"added{key}_p{int(q * 100)}_ms"] = round(
                        (percentile(ours, q) - percentile(theirs, q)) * 1000, 3
                    )
        result[name] = entry
    for name in ("sidecar", "sidecar_grpc", "sidecar_tls"):
        result[f"{name}_vs_floor_throughput"] = round(
            result[name]["throughput_per_s"] / result["floor"]["throughput_per_s"], 3
        )
    enforced = len(samples["sidecar"])
    # Every enforced request is one decision, durable before its answer: the log's count
    # proves the PDP's writes were read around the sidecar's batches and no others.
    assert meter.records["decision"] == enforced, meter.records
    result["pdp_writes_per_sidecar_request"] = {
        "fsyncs": None if fsyncs is None else round(fsyncs / enforced, 3),
        "write_syscalls": round(meter.syscw / enforced, 3),
        "log_records": {kind: round(n / enforced, 3) for kind, n in sorted(meter.records.items())},
    }
    if "decide_rpc" in extra and not stream:
        p50 = {name: result[name]["total"]["p50_ms"] for name in extra}
        result["split_p50_ms"] = {
            "floor_added": result["floor"]["added_p50_ms"],
            "decide_rpc": p50["decide_rpc"],
            "rest": round(
                result["sidecar"]["added_p50_ms"]
                - result["floor"]["added_p50_ms"]
                - p50["decide_rpc"],
                3,
            ),
            "durable_remote_decision_floor": round(
                result["floor"]["added_p50_ms"] + p50["grpc_check"] + p50["sync"], 3
            ),
        }
    return result


async def sidecar_only(url: str) -> None:
    """The one-client json load through the sidecar alone (warm already), for a profile."""
    async with aiohttp.ClientSession() as session:
        for _ in range(PROFILED):
            await one(session, url, stream=False)


def _end(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def spawn_quiet(started: contextlib.ExitStack, *args: str) -> subprocess.Popen[bytes]:
    """``python ARGS``, its output dropped, stopped by ``started``."""
    process = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    started.callback(_end, process)
    return process


def unbounded_envelope(signer: Signer, path: Path, lineage: str) -> Path:
    """The sample intent as ``lineage``, its budgets too large for a benchmark to spend,
    frozen to ``path``."""
    text = INTENT.read_text().replace("lineage: acme/support-bot", f"lineage: {lineage}")
    for budget in ("tokens: 200000", "usd_micros: 5000000", "tool_calls: 100", "requests: 500"):
        text = text.replace(budget, budget.split(":")[0] + ": 1000000000")
    path.write_bytes(signer.freeze(text, "bench"))
    return path


def decide_over_tls(
    signer: Signer,
    tmp_path: Path,
    upstream: str,
    flags: tuple[str, ...],
    started: contextlib.ExitStack,
) -> tuple[PdpProcess, PepProcess]:
    """A PDP of its own serving the decide socket over TLS (``--decide-listen``, mTLS on
    loopback) and a sidecar deciding there: a PDP on another host, reached without gRPC.
    Its own PDP, as TLS takes the gRPC port's files: the first PDP's gRPC stays plaintext,
    so the other targets and the baselines are as before."""
    pki = tmp_path / "pki"
    made = abcctl("certs", "--out", pki, "--days", "2", check=False)
    assert made.returncode == 0, made.stderr
    decide_address = f"127.0.0.1:{free_port()}"
    credentials = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(),
        (pki / "pep.key").read_bytes(),
        (pki / "pep.pem").read_bytes(),
    )
    pdp = start_pdp(
        signer,
        tmp_path / "state-tls",
        POLICIES,
        "--tls-cert", str(pki / "pdp.pem"), "--tls-key", str(pki / "pdp.key"),
        "--tls-client-ca", str(pki / "ca.pem"), "--decide-listen", decide_address,
        credentials=credentials,
    )  # fmt: skip
    started.callback(pdp.stop)
    tls = ("--pdp-ca", str(pki / "ca.pem"), "--pdp-cert", str(pki / "pep.pem"))
    pep = start_pep(
        pdp.address, {"openai": upstream}, tmp_path, *flags, *tls,
        "--pdp-key", str(pki / "pep.key"), "--pdp-decide", decide_address,
    )  # fmt: skip
    started.callback(pep.stop)
    return pdp, pep


@pytest.mark.timeout(900)
def test_bench_pep(tmp_path: Path) -> None:
    with contextlib.ExitStack() as started:  # every process stopped, whatever fails
        results, load_average = _run(tmp_path, started)
    table, beside = goals(results), yardsticks(results)
    path = write_results(
        "pep", {**results, "goals": table, "yardsticks": beside, "load_average": load_average}
    )
    print(f"\nPEP benchmark ({path})")
    print("\n".join(lines(results, table, beside)))
    print(f"  load average before {load_average['before']}, after {load_average['after']}")
    assert json.loads(path.read_text())


def _run(
    tmp_path: Path, started: contextlib.ExitStack
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Every scenario's results, and the load average before and after them; each process
    it starts is stopped by ``started``."""

    def spawn(*args: str) -> subprocess.Popen[bytes]:
        return spawn_quiet(started, *args)

    upstream_port = free_port()
    fake = spawn("-m", "tests.bench.fake_upstream", str(upstream_port))
    upstream = f"http://127.0.0.1:{upstream_port}"
    signer = Signer(tmp_path)
    state = tmp_path / "state"
    ack_socket = tmp_path / "ack.sock"
    # Its log beside the PDP's state: the same file system.
    ack = spawn("-m", "tests.bench.ack_server", str(ack_socket), str(tmp_path / "ack.log"))
    floor_port, floor_ack_port = free_port(), free_port()
    floors = [
        spawn("-m", "tests.bench.floor_proxy", str(floor_port), upstream),
        spawn("-m", "tests.bench.floor_proxy", str(floor_ack_port), upstream, str(ack_socket)),
    ]
    # Both of the sidecar's ways to decide: its decide socket (the sidecar beside its PDP,
    # what the goals are read on) and gRPC (a PDP elsewhere), the latter as a second target.
    decide_socket = tmp_path / "decide.sock"
    pdp = start_pdp(signer, state, POLICIES, "--decide-socket", str(decide_socket))
    started.callback(pdp.stop)
    envelope = unbounded_envelope(signer, tmp_path / "envelope.json", "acme/bench-pep")
    flags = ("--manifest", str(envelope), "--log-level", "WARNING")
    pep = start_pep(
        pdp.address, {"openai": upstream}, tmp_path, *flags, "--pdp-socket", str(decide_socket)
    )
    started.callback(pep.stop)
    pep_grpc = start_pep(pdp.address, {"openai": upstream}, tmp_path, *flags)
    started.callback(pep_grpc.stop)
    pdp_tls, pep_tls = decide_over_tls(signer, tmp_path, upstream, flags, started)
    wait_socket(ack_socket)
    pep_ack = start_pep(
        pdp.address, {"openai": upstream}, tmp_path, *flags, "--pdp-socket", str(ack_socket)
    )
    started.callback(pep_ack.stop)
    for port in (upstream_port, floor_port, floor_ack_port):
        wait_port(port)
    urls = {
        "direct": f"{upstream}/v1/chat/completions",
        "floor": f"http://127.0.0.1:{floor_port}/v1/chat/completions",
        "floor_ack": f"http://127.0.0.1:{floor_ack_port}/v1/chat/completions",
        "sidecar": f"{pep.url}/openai/v1/chat/completions",
        "sidecar_grpc": f"{pep_grpc.url}/openai/v1/chat/completions",
        "sidecar_ack": f"{pep_ack.url}/openai/v1/chat/completions",
        "sidecar_tls": f"{pep_tls.url}/openai/v1/chat/completions",
    }
    # Registering the sidecar's envelope again answers with the run it is bound to.
    run_id = (
        pdp_pb2_grpc.DecisionServiceStub(pdp.channel())  # type: ignore[no-untyped-call]
        .RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=envelope.read_bytes()))
        .run_id
    )
    split = baselines(pdp, run_id, state)
    pids = {
        "floor": floors[0].pid,
        "floor_ack": floors[1].pid,
        "ack": ack.pid,
        "sidecar": pep.process.pid,
        "sidecar_grpc": pep_grpc.process.pid,
        "sidecar_ack": pep_ack.process.pid,
        "sidecar_tls": pep_tls.process.pid,
        "pdp": pdp.process.pid,
        "pdp_tls": pdp_tls.process.pid,
        "upstream": fake.pid,
        "client": os.getpid(),
    }
    load_average = {"before": [round(n, 2) for n in os.getloadavg()]}
    results: dict[str, Any] = {}
    for stream, clients, pace, baseline_pace in (
        (False, 1, 0.0, 0.0),
        (False, 1, PACE, PACE),
        (False, CLIENTS, 0.0, 0.0),
        (True, 1, 0.0, None),
        (True, CLIENTS, 0.0, 0.0),
    ):
        # Every baseline at one client (the latency floor and its split); the
        # health Check, the PDP's CPU yardstick, at every concurrency.
        extra = split if clients == 1 else {"grpc_check": split["grpc_check"]}
        meter = CpuMeter(pids, state / "decisions.log", counted="sidecar")
        name = f"{'stream' if stream else 'json'}_{clients}_clients{'_paced' if pace else ''}"
        results[name] = asyncio.run(
            load(
                urls,
                stream,
                clients,
                SINGLE if clients == 1 else CONCURRENT,
                extra,
                meter,
                pace,
                baseline_pace,
            )
        )
    load_average["after"] = [round(n, 2) for n in os.getloadavg()]
    spy = pyspy()
    if spy:
        with Profiles(spy, {"pdp": pids["pdp"], "sidecar": pids["sidecar"]}, tmp_path) as p:
            asyncio.run(sidecar_only(urls["sidecar"]))
        for name, binary in (("pdp", "abc-pdp"), ("sidecar", "abc-pep")):
            title = f"{binary} during {PROFILED} json requests through the sidecar, 1 client"
            print(f"profile: {report(name, title, p.raw(name).read_text())}")
    return results, load_average
