"""What each process spends per request, measured from outside: CPU time, how often it went
to sleep, the PDP's fsyncs and decision-log records, attributed to the target that drove
them.

The benchmark's targets take turns batch by batch, so the meter reads every process around
each batch and charges the difference to the target being driven. Work a batch leaves
behind (a usage settlement sent after a short linger, a group commit) still belongs to it:
after each batch of the counted target the meter waits until each of its decisions has its
settlement in the log, or its sidecar's linger and ``SETTLE_S`` have passed (a settlement
answered before its write is written with the next commit, whichever target's, and counted
for its own), and after every batch until the processes together have spent less than
``IDLE_MS_PER_S`` over the last ``QUIET_S``, so nothing spills into the next target's
batch. What a process spends idle meanwhile (the PDP: about 2 ms a second) is charged too:
the ``direct`` target's PDP column shows how little that is.

Sleeps are the voluntary context switches of the process's live threads: each time one
waited for something (the agent, the PDP, the upstream) and was woken. On these VMs a
sleep and its wake-up cost the sleeper tens of microseconds of CPU and a cold cache, so
they explain CPU per request that no profile of the code shows.

CPU time is the process's CPU clock (``clock_gettime`` on ``clock_getcpuclockid(pid)``):
utime + stime of every thread, exited ones included, the figure ``/proc/<pid>/stat`` gives
in 10 ms ticks but in nanoseconds. fsyncs are counted by ``perf stat`` on the PDP's
``fdatasync``/``fsync`` syscall tracepoints, enabled only during the counted target's
batches; without a working ``perf`` the count is None. Beside it, always: the PDP's write
syscalls (``/proc/<pid>/io`` ``syscw``), an upper bound of its durable writes (a log batch
is one write then one fdatasync, but gRPC's wake-ups write too), and the records appended
to its decision log, by kind (the active file: the benchmark writes far less than the
64 MiB after which it rotates).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

QUIET_S, POLL_S, GIVE_UP_S = 0.1, 0.01, 10.0
SETTLE_S = 0.3  # past the linger: a settlement sent, settled and answered by then
IDLE_MS_PER_S = 5.0  # all processes together below this rate count as quiet
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU seconds the process has used so far, all its threads together."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # CPUCLOCK_SCHED of the whole process
    except OSError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS


def sleeps(pid: int) -> int:
    """Voluntary context switches of the process's threads alive now."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # a thread that ended meanwhile
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def write_syscalls(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io has no syscw")


class LogTally:
    """Records appended to the PDP's decision log since the last look."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = path.stat().st_size

    def since(self) -> list[dict[str, Any]]:
        with self._path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines()]


class FsyncCounter:
    """fdatasync + fsync calls of one process while enabled, counted by ``perf stat`` on the
    syscall tracepoints; a count of None where perf is missing, refused or fails."""

    def __init__(self, pid: int) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="bench-perf-"))
        self._perf: subprocess.Popen[str] | None = None
        self._ctl = self._ack = -1
        self._failed = False
        perf = shutil.which("perf")
        if perf is None:
            return
        ctl, ack = self._dir / "ctl", self._dir / "ack"
        os.mkfifo(ctl)
        os.mkfifo(ack)
        events = "syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync"
        control = ["-D", "-1", "--control", f"fifo:{ctl},{ack}"]  # start disabled
        self._perf = subprocess.Popen(
            [perf, "stat", "-x", ",", "-e", events, *control, "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # perf opens both FIFOs once it counts; one that cannot start never opens them.
        deadline = time.monotonic() + 10
        while self._ctl < 0:
            try:
                self._ctl = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                if self._perf.poll() is not None or time.monotonic() > deadline:
                    self._failed = True
                    return
                time.sleep(0.02)
        self._ack = os.open(ack, os.O_RDONLY)

    def _command(self, word: bytes) -> None:
        if self._perf is None or self._failed:
            return
        try:
            os.write(self._ctl, word + b"\n")
            self._failed = not os.read(self._ack, 16)  # perf acks once events are switched
        except OSError:
            self._failed = True

    def enable(self) -> None:
        self._command(b"enable")

    def disable(self) -> None:
        self._command(b"disable")

    def close(self) -> int | None:
        """Stop perf; the calls counted while enabled, or None if they could not be."""
        err = ""
        if self._perf is not None:
            self._perf.send_signal(signal.SIGINT)
            try:
                err = self._perf.communicate(timeout=10)[1]
            except subprocess.TimeoutExpired:
                self._perf.kill()
                self._perf.wait()
                self._failed = True
        for fd in (self._ctl, self._ack):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(self._dir)
        counts = [line.split(",")[0] for line in err.splitlines() if ",syscalls:sys_enter_" in line]
        if self._failed or len(counts) != 2 or not all(c.isdigit() for c in counts):
            return None  # no perf, no tracepoints ("<not supported>"), or perf died
        return sum(map(int, counts))


class CpuMeter:
    """CPU per process charged to targets, and the PDP's writes charged to one of them."""

    def __init__(self, pids: dict[str, int], log: Path, counted: str, linger: float = 0.1) -> None:
        """``pids`` by name, ``pdp`` among them; ``log`` the PDP's decision log; ``counted``
        the target whose batches the PDP's writes are counted in, its sidecar's settlements
        sent ``linger`` seconds after its last call at the latest."""
        self.pids, self._pdp, self._counted = pids, pids["pdp"], counted
        self.cpu: dict[str, dict[str, float]] = {}  # target -> process -> CPU seconds
        self.sleeps: dict[str, dict[str, int]] = {}  # target -> process -> sleeps
        self.records: Counter[str] = Counter()
        self.syscw = 0
        self._linger = linger
        self._log = LogTally(log)
        self._fsyncs = FsyncCounter(self._pdp)
        # The counted target's reservations: their settlements count wherever they were
        # written. One answered before it was durable is written with the next commit,
        # which may be another target's (a decision of another agent's takes it along).
        self._reserved: set[str] = set()

    def _read(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    async def quiet(self) -> dict[str, float]:
        """Wait until the processes (the bench client aside) have spent less than
        ``IDLE_MS_PER_S`` over the last ``QUIET_S``; their CPU clocks then."""
        readings = [(time.monotonic(), self._read())]
        started = readings[0][0]
        while True:
            await asyncio.sleep(POLL_S)
            readings.append((time.monotonic(), self._read()))
            while len(readings) > 2 and readings[1][0] <= readings[-1][0] - QUIET_S:
                readings.pop(0)  # the first reading stays the newest one QUIET_S ago
            (then, old), (now, new) = readings[0], readings[-1]
            spent = sum(new[n] - old[n] for n in new if n != "client")
            if now - then >= QUIET_S and spent * 1000 <= IDLE_MS_PER_S * (now - then):
                return new
            if now - started > GIVE_UP_S:
                raise RuntimeError(f"processes still busy {GIVE_UP_S} s after a batch")

    async def measure(self, target: str, batch: Awaitable[None]) -> None:
        """Run one batch of ``target`` and charge it what every process spent."""
        counted = target == self._counted
        self._tally(self._log.since(), batch_of_counted=False)  # another batch's writes
        if counted:
            self._fsyncs.enable()
            writes = write_syscalls(self._pdp)
        slept = {name: sleeps(pid) for name, pid in self.pids.items()}
        before = self._read()
        await batch
        logged = await self.settled() if counted else []
        after = await self.quiet()
        spent = self.cpu.setdefault(target, dict.fromkeys(after, 0.0))
        for name in after:
            spent[name] += after[name] - before[name]
        woken = self.sleeps.setdefault(target, dict.fromkeys(slept, 0))
        for name, pid in self.pids.items():
            woken[name] += sleeps(pid) - slept[name]
        self._tally(logged + self._log.since(), batch_of_counted=counted)
        if counted:
            self._fsyncs.disable()
            self.syscw += write_syscalls(self._pdp) - writes

    def _tally(self, records: list[dict[str, Any]], batch_of_counted: bool) -> None:
        """Count the records of a batch of the counted target, and the settlements of its
        reservations wherever they were written."""
        for record in records:
            kind = record["kind"]
            if kind == "settlement":
                if record["reservation_id"] in self._reserved:
                    self._reserved.discard(record["reservation_id"])
                    self.records[kind] += 1
                continue
            if batch_of_counted:
                self.records[kind] += 1
                if kind == "decision" and record.get("reservation_id"):
                    self._reserved.add(record["reservation_id"])

    async def settled(self) -> list[dict[str, Any]]:
        """The records logged since the last look, once each decision among them has its
        settlement too, or once the sidecar's linger and a little more have passed: a
        settlement no decision carried goes then, and may be answered before it is durable,
        its record written with the next commit, whoever makes it (its write is counted
        where it happens). What settling it cost the processes is spent by then."""
        logged: list[dict[str, Any]] = []
        deadline = time.monotonic() + self._linger + SETTLE_S
        while True:
            logged += self._log.since()
            reserved = {r["reservation_id"] for r in logged if r.get("reservation_id")}
            made = {r["reservation_id"] for r in logged if r["kind"] == "settlement"}
            if reserved <= made or time.monotonic() > deadline:
                return logged
            await asyncio.sleep(POLL_S)

    def close(self) -> int | None:
        """The fsyncs counted, or None if they could not be (and the settlements written
        since the last batch counted)."""
        self._tally(self._log.since(), batch_of_counted=False)
        return self._fsyncs.close()
