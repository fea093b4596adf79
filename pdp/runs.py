"""Runs: one per manifest, with its Assembly position, its budget ledger and its answers.

Budgets are reserved at their worst case before an action is forwarded and settled
with the real usage, under one lock, so no interleaving of calls spends past a budget.
A reservation never settled expires and is settled at its worst case. The state lives
in memory and is rebuilt at start-up from the decision log (``pdp/recovery.py``), which
records every change before it is answered.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pdp.action import Action
from pdp.engine import Decision, PreparedPolicy
from pdp.errors import ManifestUnknown
from pdp.manifest import VerifiedManifest

__all__ = [
    "BUDGETS",
    "Ledger",
    "Reservation",
    "Run",
    "RunRegistry",
    "Usage",
    "cost_of",
    "run_id_for",
]

BUDGETS = ("tokens", "usd_micros", "tool_calls", "requests")


def run_id_for(manifest_digest: str) -> str:
    """One manifest, one run: registering the same manifest again never resets its budget."""
    return "run_" + manifest_digest.removeprefix("sha256:")[:32]


@dataclass
class Usage:
    tokens: int = 0
    usd_micros: int = 0
    tool_calls: int = 0
    requests: int = 0

    def add(self, other: Usage, sign: int = 1) -> None:
        for name in BUDGETS:
            setattr(self, name, getattr(self, name) + sign * getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in BUDGETS}


@dataclass(frozen=True)
class Reservation:
    cost: Usage
    expires: datetime


@dataclass
class Ledger:
    limits: Usage
    spent: Usage = field(default_factory=Usage)
    reserved: Usage = field(default_factory=Usage)
    reservations: dict[str, Reservation] = field(default_factory=dict)

    def remaining(self) -> Usage:
        left = Usage(**self.limits.as_dict())
        left.add(self.spent, -1)
        left.add(self.reserved, -1)
        return left

    def try_reserve(self, cost: Usage, expires: datetime) -> str | None:
        """Reserve ``cost`` if every budget can hold it; the reservation id, or None."""
        left = self.remaining()
        if any(getattr(cost, name) > getattr(left, name) for name in BUDGETS):
            return None
        # usd_micros is only known after the call: an exhausted money budget refuses.
        if left.usd_micros <= 0:
            return None
        reservation_id = "rsv_" + uuid.uuid4().hex
        self.hold(reservation_id, cost, expires)
        return reservation_id

    def hold(self, reservation_id: str, cost: Usage, expires: datetime) -> None:
        """Record a reservation as made (also when restoring it from the log)."""
        self.reserved.add(cost)
        self.reservations[reservation_id] = Reservation(cost, expires)

    def release(self, reservation_id: str) -> None:
        """Undo a reservation whose decision was never given."""
        held = self.reservations.pop(reservation_id, None)
        if held is not None:
            self.reserved.add(held.cost, -1)

    def settle(self, reservation_id: str, tokens: int, usd_micros: int) -> bool:
        """Replace a reservation by the real usage; False if unknown or already settled."""
        held = self.reservations.pop(reservation_id, None)
        if held is None:
            return False
        self.reserved.add(held.cost, -1)
        self.spent.add(Usage(tokens, usd_micros, held.cost.tool_calls, held.cost.requests))
        return True

    def expired(self, now: datetime) -> list[tuple[str, Usage]]:
        """Reservations past their expiry, to be settled at their worst case."""
        return [(rid, held.cost) for rid, held in self.reservations.items() if held.expires <= now]

    def remaining_ratio(self) -> dict[str, float]:
        left = self.remaining()
        return {
            name: (
                max(getattr(left, name), 0) / limit
                if (limit := getattr(self.limits, name))
                else 0.0
            )
            for name in BUDGETS
        }


@dataclass
class Run:
    run_id: str
    verified: VerifiedManifest
    policy: PreparedPolicy
    step: str
    completed_steps: list[str]
    ledger: Ledger
    not_before: datetime
    expires_at: datetime
    superseded_by: int | None = None  # a later version of the lineage was registered
    # request id -> the answer given, so a retried request gets the same one, never a
    # second charge (probes are not kept: they charge nothing).
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)

    def state(self) -> dict[str, object]:
        """Where the run is in its Assembly: the policy input's ``run``."""
        return {"step": self.step, "completed_steps": list(self.completed_steps)}

    def status(self, now: datetime) -> str:
        if self.superseded_by is not None:
            return "superseded"
        return "running" if self.not_before <= now < self.expires_at else "expired"


def cost_of(action: Action, decision: Decision) -> Usage:
    """The worst case an allowed action may spend, reserved before it is forwarded."""
    if action.kind == "model":
        # The completion cap plus an upper bound on the prompt: settled with real usage.
        completion = int(decision.obligations.get("max_tokens", 0))
        return Usage(tokens=completion + action.input_bytes, requests=1)
    if action.kind == "tool":
        return Usage(tool_calls=1, requests=1)
    if action.kind == "http":
        return Usage(requests=1)
    return Usage()


class RunRegistry:
    """Runs by id. One lock guards every run's step and ledger."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._answered = threading.Condition(self.lock)
        self._runs: dict[str, Run] = {}
        self._reservations: dict[str, str] = {}  # reservation id -> run id

    def register(self, verified: VerifiedManifest, policy: PreparedPolicy) -> Run:
        run_id = run_id_for(verified.digest)
        with self.lock:
            existing = self._runs.get(run_id)
            if existing is not None:
                return existing
            manifest = verified.manifest
            run = Run(
                run_id=run_id,
                verified=verified,
                policy=policy,
                step=manifest.assembly.steps[0].id,
                completed_steps=[],
                ledger=Ledger(limits=Usage(**manifest.budgets.model_dump())),
                not_before=manifest.not_before,
                expires_at=manifest.expires_at,
            )
            # Rollback protection covers runs too: a newer version retires the older ones.
            for other in self._runs.values():
                meta = other.verified.manifest.metadata
                if (
                    meta.lineage == manifest.metadata.lineage
                    and meta.version < manifest.metadata.version
                ):
                    other.superseded_by = manifest.metadata.version
            self._runs[run_id] = run
            return run

    def find(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    def get(self, run_id: str) -> Run:
        run = self._runs.get(run_id)
        if run is None:
            raise ManifestUnknown("no run with this id")
        return run

    def reserve(self, run: Run, cost: Usage, expires: datetime) -> str | None:
        with self.lock:
            reservation_id = run.ledger.try_reserve(cost, expires)
            if reservation_id is not None:
                self._reservations[reservation_id] = run.run_id
            return reservation_id

    def hold(self, run: Run, reservation_id: str, cost: Usage, expires: datetime) -> None:
        with self.lock:
            run.ledger.hold(reservation_id, cost, expires)
            self._reservations[reservation_id] = run.run_id

    def release(self, run: Run, reservation_id: str) -> None:
        with self.lock:
            run.ledger.release(reservation_id)
            self._reservations.pop(reservation_id, None)

    def expire(self, run: Run, now: datetime) -> list[tuple[str, Usage]]:
        """Settle the run's expired reservations at their worst case; what was settled."""
        with self.lock:
            expired = run.ledger.expired(now)
            for reservation_id, cost in expired:
                run.ledger.settle(reservation_id, cost.tokens, cost.usd_micros)
                self._reservations.pop(reservation_id, None)
            return expired

    def claim(self, run: Run, request_id: str) -> dict[str, Any] | None:
        """The answer already given to ``request_id``, or None after marking it in flight.

        A duplicate arriving while the first is still being decided waits for its answer.
        """
        with self._answered:
            while request_id in run.in_flight:
                if not self._answered.wait(timeout=10):
                    break
            prior = run.answers.get(request_id)
            if prior is None:
                run.in_flight.add(request_id)
            return prior

    def answer(self, run: Run, request_id: str, stored: dict[str, Any]) -> None:
        with self._answered:
            run.in_flight.discard(request_id)
            run.answers[request_id] = stored
            self._answered.notify_all()

    def enter_step(self, run: Run, step: str, seen_step: str) -> bool:
        """Move to ``step`` if the run is still where the decision saw it."""
        with self.lock:
            if run.step != seen_step:
                return False
            run.completed_steps.append(run.step)
            run.step = step
            return True

    def settle(self, reservation_id: str, tokens: int, usd_micros: int) -> Run | None:
        with self.lock:
            run_id = self._reservations.pop(reservation_id, None)
            if run_id is None:
                return None
            run = self._runs[run_id]
            run.ledger.settle(reservation_id, tokens, usd_micros)
            return run

    def lowest_remaining_ratio(self) -> dict[str, float]:
        with self.lock:
            ratios = [run.ledger.remaining_ratio() for run in self._runs.values()]
        return {name: min((r[name] for r in ratios), default=1.0) for name in BUDGETS}
