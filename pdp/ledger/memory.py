"""The embedded run store: state in this process, made durable by the decision log.

Every change is recorded in the decision log before it is answered, and the log is
replayed into a fresh store at start-up (``pdp/decisionlog/recovery.py``), after the state of
the newest snapshot (``export_state`` / ``import_state``): one durable write per decision,
not a second database beside the log.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pdp.errors import FleetRunsExhausted, ManifestUnknown, RunClosed, StoreUnavailable
from pdp.ledger.store import (
    ANSWER_WINDOW,
    RELEASED_WINDOW,
    Books,
    ClaimInFlight,
    Fleet,
    RunState,
    Usage,
)

__all__ = ["MemoryRunStore"]


@dataclass(frozen=True)
class _Reservation:
    run_id: str
    cost: Usage
    expires: datetime


@dataclass
class _Books:
    limits: Usage
    spent: Usage = field(default_factory=Usage)
    reserved: Usage = field(default_factory=Usage)

    def fits(self, cost: Usage) -> bool:
        left = Usage(**self.limits.as_dict())
        left.add(self.spent, -1)
        left.add(self.reserved, -1)
        return left.holds(cost)

    def frozen(self) -> Books:
        return Books(
            Usage(**self.limits.as_dict()),
            Usage(**self.spent.as_dict()),
            Usage(**self.reserved.as_dict()),
        )


@dataclass
class _Fleet(_Books):
    runs: int = 0  # runs at once, 0: no limit
    live: dict[str, datetime] = field(default_factory=dict)  # run id -> slot lapses

    def full(self, now: datetime) -> bool:
        """Every slot taken at ``now``: a run past its expiry frees its own (looked for
        only at the limit, so a start below it costs nothing more)."""
        if len(self.live) >= self.runs:
            for run_id in [r for r, until in self.live.items() if until <= now]:
                del self.live[run_id]
        return len(self.live) >= self.runs


@dataclass
class _Run(_Books):
    step: str = ""
    lineage: str = ""
    fleet: str = ""  # the grant whose fleet books its reservations also charge
    completed_steps: list[str] = field(default_factory=list)
    outcome: str = ""
    # (expiry, reservation id), a min-heap: settled ones are skipped when they surface, so
    # a sweep costs what expired, not what is held.
    expiries: list[tuple[datetime, str]] = field(default_factory=list)
    held: int = 0  # reservations of this run not yet settled, released or expired
    answers: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    in_flight: set[str] = field(default_factory=set)


_COMPACT_SLACK = 1024
# How long a duplicate waits for the first decision of its request id.
_IN_FLIGHT_SECONDS = 10.0


class MemoryRunStore:
    shared = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self._runs: dict[str, _Run] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._latest: dict[str, int] = {}  # lineage -> highest version registered
        self._fleets: dict[str, _Fleet] = {}  # grant's default run id -> fleet books
        self._released: OrderedDict[str, str] = OrderedDict()  # run id -> status, newest last

    def _run(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise ManifestUnknown("no run with this id")
        return run

    def open(
        self,
        run_id: str,
        first_step: str,
        limits: Usage,
        lineage: str,
        version: int,
        grant: tuple[str, str, str] = ("", "", ""),
        fleet: str = "",
        slot: tuple[datetime, datetime, bool] | None = None,
    ) -> bool:
        with self._lock:
            self._latest[lineage] = max(self._latest.get(lineage, 0), version)
            if run_id in self._runs:
                return False
            books = self._fleets.get(fleet)
            if slot is not None and books is not None and books.runs:
                now, until, force = slot
                if not force and books.full(now):
                    raise FleetRunsExhausted(
                        f"the grant's fleet limit of {books.runs} runs at once is reached:"
                        " a run must end or expire first"
                    )
                books.live[run_id] = until
            self._runs[run_id] = _Run(limits, step=first_step, lineage=lineage, fleet=fleet)
            return True

    def open_fleet(self, grant_run_id: str, fleet: Fleet) -> None:
        with self._lock:
            self._fleets.setdefault(grant_run_id, _Fleet(fleet.limits, runs=fleet.runs))

    def fleet_books(self, grant_run_id: str) -> tuple[Books, int] | None:
        with self._lock:
            books = self._fleets.get(grant_run_id)
            return None if books is None else (books.frozen(), len(books.live))

    def state(self, run_id: str, lineage: str) -> RunState:
        with self._lock:
            run = self._run(run_id)
            return RunState(
                run.step, tuple(run.completed_steps), run.outcome, self._latest.get(lineage, 0)
            )

    def move(self, run_id: str, seen_step: str, step: str, outcome: str = "") -> bool:
        with self._lock:
            run = self._run(run_id)
            if run.step != seen_step or run.outcome:
                return False
            if outcome:
                run.outcome = outcome
                books = self._fleets.get(run.fleet)
                if books is not None:
                    books.live.pop(run_id, None)
            else:
                run.completed_steps.append(run.step)
                run.step = step
            return True

    def unmove(self, run_id: str, from_step: str, step: str) -> None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.step != step or run.outcome:
                return
            if run.completed_steps[-1:] == [from_step]:
                run.step = run.completed_steps.pop()

    def reserve(
        self,
        run_id: str,
        reservation_id: str,
        cost: Usage,
        expires: datetime,
        force: bool = False,
        replayed: bool = False,
    ) -> bool:
        with self._lock:
            run = self._run(run_id)
            if run.outcome and not replayed:
                # Ended while this decision was made: it holds nothing (a release of the
                # run would not find the hold, nor a settlement the run).
                raise RunClosed("the run ended while this decision was made")
            fleet = self._fleets.get(run.fleet)
            fits = run.fits(cost) and (fleet is None or fleet.fits(cost))
            if fits or force:
                self._hold(run_id, run, reservation_id, cost, expires)
            return fits

    def hold(self, run_id: str, reservation_id: str, cost: Usage, expires: datetime) -> None:
        """Record a reservation as made, without checking budgets (replaying the log)."""
        with self._lock:
            self._hold(run_id, self._run(run_id), reservation_id, cost, expires)

    def _hold(
        self, run_id: str, run: _Run, reservation_id: str, cost: Usage, expires: datetime
    ) -> None:
        run.reserved.add(cost)
        if (fleet := self._fleets.get(run.fleet)) is not None:
            fleet.reserved.add(cost)
        run.held += 1
        heapq.heappush(run.expiries, (expires, reservation_id))
        self._reservations[reservation_id] = _Reservation(run_id, cost, expires)

    def _take(self, reservation_id: str) -> tuple[_Run, _Reservation] | None:
        held = self._reservations.pop(reservation_id, None)
        if held is None:
            return None
        run = self._runs[held.run_id]
        run.reserved.add(held.cost, -1)
        if (fleet := self._fleets.get(run.fleet)) is not None:
            fleet.reserved.add(held.cost, -1)
        run.held -= 1
        if len(run.expiries) > 2 * run.held + _COMPACT_SLACK:
            # Settled entries wait in the heap until their expiry surfaces: compacted once
            # they dominate, so the heap holds about what is held, not every reservation
            # made within the TTL (amortized: each entry is dropped once).
            run.expiries = [e for e in run.expiries if e[1] in self._reservations]
            heapq.heapify(run.expiries)
        return run, held

    def release(self, reservation_id: str) -> None:
        with self._lock:
            self._take(reservation_id)

    def settle(self, reservation_id: str, tokens: int, usd_micros: int) -> str | None:
        with self._lock:
            taken = self._take(reservation_id)
            if taken is None:
                return None
            run, held = taken
            self._charge(run, Usage(tokens, usd_micros, held.cost.tool_calls, held.cost.requests))
            return held.run_id

    def _charge(self, run: _Run, spent: Usage) -> None:
        run.spent.add(spent)
        if (fleet := self._fleets.get(run.fleet)) is not None:
            fleet.spent.add(spent)

    def expire(self, run_id: str, now: datetime) -> list[tuple[str, Usage]]:
        with self._lock:
            run = self._run(run_id)
            expired = []
            while run.expiries and run.expiries[0][0] <= now:
                _, rid = heapq.heappop(run.expiries)
                taken = self._take(rid)
                if taken is not None:  # not settled or released meanwhile
                    cost = taken[1].cost
                    self._charge(run, cost)
                    expired.append((rid, cost))
            return expired

    def books(self, run_id: str) -> Books:
        with self._lock:
            return self._run(run_id).frozen()

    def release_run(self, run_id: str, status: str) -> None:
        with self._answered:
            run = self._runs.pop(run_id, None)
            if run is None:
                return
            for _, rid in run.expiries:  # settled by the ledger first; none is left behind
                self._reservations.pop(rid, None)
            if (fleet := self._fleets.get(run.fleet)) is not None:
                fleet.live.pop(run_id, None)
                fleet.reserved.add(run.reserved, -1)
            self._fleets.pop(run_id, None)  # a grant's: its runs were released first
            if status:
                self._released[run_id] = status
                if len(self._released) > RELEASED_WINDOW:
                    self._released.popitem(last=False)
            run.in_flight.clear()
            self._answered.notify_all()  # a claim waiting on this run finds it gone

    def schedule(self, run_id: str, when: datetime) -> None:
        """Nothing to do: this process's registry holds every run of this store."""

    def due_runs(self, now: datetime, limit: int) -> list[str]:
        return []

    def released(self, run_id: str) -> str | None:
        with self._lock:
            return self._released.get(run_id)

    def claim(
        self, run_id: str, request_id: str, wait: bool = True, waited: bool = False
    ) -> dict[str, Any] | None:
        # ``waited`` changes nothing here: a mark in this process never lapses.
        with self._answered:
            run = self._run(run_id)
            if not wait and request_id in run.in_flight:
                raise ClaimInFlight(request_id)
            deadline = time.monotonic() + _IN_FLIGHT_SECONDS
            while request_id in run.in_flight:
                left = deadline - time.monotonic()
                # Any answer wakes every waiter: the limit is one deadline, not per wait.
                if left <= 0 or not self._answered.wait(timeout=left):
                    # Still being decided (a log stuck on its disk, say): deciding it again
                    # would charge it twice. The caller may retry.
                    raise StoreUnavailable("a decision for this request id is still under way")
            prior = run.answers.get(request_id)
            if prior is None:
                run.in_flight.add(request_id)
            return prior

    def answer(self, run_id: str, request_id: str, stored: dict[str, Any]) -> None:
        with self._answered:
            run = self._runs.get(run_id)
            if run is not None:  # None: released while deciding, nothing left to keep
                run.in_flight.discard(request_id)
                run.answers[request_id] = stored
                if len(run.answers) > ANSWER_WINDOW:
                    run.answers.popitem(last=False)
            self._answered.notify_all()

    def unclaim(self, run_id: str, request_id: str) -> None:
        with self._answered:
            if (run := self._runs.get(run_id)) is not None:
                run.in_flight.discard(request_id)
            self._answered.notify_all()

    def reservation_runs(self, reservation_ids: Sequence[str]) -> list[str | None]:
        with self._lock:
            held = [self._reservations.get(rid) for rid in reservation_ids]
        return [h.run_id if h is not None else None for h in held]

    def put_envelope(self, run_id: str, envelope: bytes) -> None:
        """Nothing to do: only this process uses this store, and it registered the run."""

    def envelope(self, run_id: str) -> bytes | None:
        return None

    def grant_of(self, run_id: str) -> tuple[str, str, str] | None:
        """Nothing to find: this process started every run it holds."""
        return None

    def export_state(self) -> dict[str, Any]:
        """Each run's step, books, open reservations and answers window, each fleet's
        spending and slots, and the window of released runs, in JSON values.

        Kept answers are never changed once stored, so they are shared, not copied."""
        with self._lock:
            runs: dict[str, Any] = {}
            for run_id, run in self._runs.items():
                held = sorted({rid for _, rid in run.expiries if rid in self._reservations})
                reservations = [self._reservations[rid] for rid in held]
                runs[run_id] = {
                    "step": run.step,
                    "completed": list(run.completed_steps),
                    "outcome": run.outcome,
                    "spent": run.spent.as_list(),
                    "reserved": [
                        [rid, r.cost.as_list(), r.expires.isoformat()]
                        for rid, r in zip(held, reservations, strict=True)
                    ],
                    "answers": list(run.answers.items()),
                }
            fleets = {
                grant: {
                    "spent": books.spent.as_list(),
                    "live": [[run_id, until.isoformat()] for run_id, until in books.live.items()],
                }
                for grant, books in self._fleets.items()
            }
            released = [[run_id, status] for run_id, status in self._released.items()]
            return {"runs": runs, "fleets": fleets, "released": released}

    def import_state(self, state: dict[str, Any], run_ids: Collection[str]) -> None:
        try:
            runs = dict(state["runs"])
            fleets = {
                str(grant): (
                    Usage(*map(int, doc["spent"])),
                    {str(r): datetime.fromisoformat(until) for r, until in doc["live"]},
                )
                for grant, doc in dict(state["fleets"]).items()
            }
            released = [(str(run_id), str(status)) for run_id, status in state["released"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the snapshot's run store is malformed: {exc!r}") from exc
        parsed = {run_id: _parse_run(doc) for run_id, doc in runs.items() if run_id in run_ids}
        with self._lock:
            for grant, (spent, live) in fleets.items():
                books = self._fleets.get(grant)
                if books is not None:  # opened by the caller first: its limits are its own
                    books.spent, books.reserved, books.live = spent, Usage(), live
            for run_id, (step, completed, outcome, spent, held, answers) in parsed.items():
                run = self._runs.get(run_id)
                if run is None:
                    continue  # opened by the caller first: its limits come from its manifest
                for reservation_id in [rid for _, rid in run.expiries]:
                    self._reservations.pop(reservation_id, None)
                fresh = _Run(
                    run.limits,
                    spent=spent,
                    step=step,
                    lineage=run.lineage,
                    fleet=run.fleet,
                    completed_steps=completed,
                    outcome=outcome,
                )
                fresh.answers.update(answers)
                self._runs[run_id] = fresh
                for reservation_id, cost, expires in held:
                    self._hold(run_id, fresh, reservation_id, cost, expires)
            self._released = OrderedDict(released)

    def close(self) -> None:
        pass


def _parse_run(
    doc: dict[str, Any],
) -> tuple[str, list[str], str, Usage, list[tuple[str, Usage, datetime]], list[Any]]:
    """One run of ``export_state``, checked; ``ValueError`` for anything else."""
    try:
        held = [
            (str(rid), Usage(*map(int, cost)), datetime.fromisoformat(expires))
            for rid, cost, expires in doc["reserved"]
        ]
        answers = [(str(rid), dict(answer)) for rid, answer in doc["answers"]]
        return (
            str(doc["step"]),
            [str(step) for step in doc["completed"]],
            str(doc["outcome"]),
            Usage(*map(int, doc["spent"])),
            held,
            answers,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"a run of the snapshot is malformed: {exc!r}") from exc
