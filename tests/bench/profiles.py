"""py-spy profiles of real processes under the benchmark's load (``ABC_BENCH_PYSPY``).

``ABC_BENCH_PYSPY=/path/to/py-spy make bench`` records ``py-spy record --gil -r 200 -f raw``
of each process while a load runs, and writes its top entries by self time and by
cumulative time to ``bench-results/profile-NAME.txt``. py-spy is not a dependency of the
project (``pip download py-spy`` and ``pip install --target DIR`` it anywhere).

py-spy stops the process at every sample, which costs it CPU and latency: a profile is
taken in a phase of its own, never during the batches whose figures the benchmark reports.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.bench.conftest import RESULTS

TOP = 25
_LINE = re.compile(r":\d+\)$")  # a frame's line number: a function's lines count as one


def pyspy() -> str | None:
    """The py-spy binary asked for, if any."""
    return os.environ.get("ABC_BENCH_PYSPY") or None


def top(raw: str, n: int = TOP) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """From py-spy's raw (collapsed) stacks, ``frame;frame;... count`` root first: the
    number of samples, the top ``n`` functions by self samples (the stack's leaf) and by
    cumulative samples (anywhere on the stack, counted once per stack)."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            cumulative[frame] += int(count)
    return total, own.most_common(n), cumulative.most_common(n)


def report(name: str, title: str, raw: str) -> Path:
    total, own, cumulative = top(raw)
    out = [f"{title}: {total} samples holding the GIL (py-spy record --gil -r 200)"]
    for heading, entries in (("self", own), ("cumulative", cumulative)):
        out += ["", f"top {TOP} by {heading} time:  samples      %  function (file)"]
        out += [f"  {count:8d} {100 * count / max(total, 1):6.1f}  {fn}" for fn, count in entries]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"profile-{name}.txt"
    path.write_text("\n".join(out) + "\n")
    return path


class Profiles:
    """py-spy recording each named process for the length of a ``with`` block."""

    def __init__(self, binary: str, pids: dict[str, int], directory: Path) -> None:
        self._binary, self._pids, self._dir = binary, pids, directory
        self._spies: dict[str, subprocess.Popen[bytes]] = {}

    def raw(self, name: str) -> Path:
        return self._dir / f"pyspy-{name}.txt"

    def __enter__(self) -> Self:
        for name, pid in self._pids.items():
            args = ["record", "--gil", "-r", "200", "-f", "raw", "-o", str(self.raw(name))]
            self._spies[name] = subprocess.Popen(
                [self._binary, *args, "--pid", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(1)  # py-spy attaches and starts sampling
        for name, spy in self._spies.items():
            if spy.poll() is not None:
                raise RuntimeError(f"py-spy could not record {name} (exit {spy.returncode})")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for spy in self._spies.values():
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        for name, spy in self._spies.items():
            if spy.wait(30) != 0 and kind is None:
                raise RuntimeError(f"py-spy failed recording {name} (exit {spy.returncode})")
