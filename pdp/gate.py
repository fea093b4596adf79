"""The state gate: changes to run state go through it shared, a snapshot takes it alone.

Each call that changes state (register, start a run, decide, settle) holds the gate
shared from its first change until its record is durable, or queued to go with the next
commit (a settlement carried by a decision: the snapshot flushes those first), so a
snapshot taken with the gate held alone sees exactly the state that the durable log's
records fold to. A snapshot
waiting for the gate keeps new changes out (writer first), so a steady stream of decisions
cannot starve it; it holds the gate only while the state is copied.

Never taken twice by one thread: a change that waited for a snapshot that waits for it
would wait forever.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["StateGate"]


class StateGate:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._changing = 0  # calls inside, changing state
        self._alone = False  # a snapshot holds the gate, or waits for it

    @contextmanager
    def changing(self) -> Iterator[None]:
        with self._cond:
            while self._alone:
                self._cond.wait()
            self._changing += 1
        try:
            yield
        finally:
            with self._cond:
                self._changing -= 1
                if not self._changing:
                    self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            while self._alone:
                self._cond.wait()  # another snapshot first
            self._alone = True
            while self._changing:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()
