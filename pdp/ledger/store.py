"""What a run store keeps per run, and the interface every backend implements.

A run's mutable state is its position in the Assembly (step, completed steps, and an
outcome once it ended), its budget books (limits, spent, reserved, open reservations)
and the answers it gave, by request id. A grant with fleet limits has fleet books too:
the same budgets over all its runs together, and the runs holding a slot (runs at once).
Compiled policies and verified manifests stay in each PDP process; only this state is
shared when several replicas use one store.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

__all__ = [
    "ANSWER_WINDOW",
    "BUDGETS",
    "RELEASED_WINDOW",
    "UNLIMITED",
    "Books",
    "ClaimInFlight",
    "Fleet",
    "RunState",
    "RunStore",
    "Usage",
]

BUDGETS = ("tokens", "usd_micros", "tool_calls", "requests")
# Answers kept per run, by request id, for idempotent retries: the most recent ones. A
# request id retried after this many later answers of its run is decided anew, so memory
# stays bounded however long a run lives.
ANSWER_WINDOW = 10_000
# Released runs remembered (the most recent ones), so GetRun or StartRun on one says it was
# released; an older one is unknown like any id never seen: memory stays bounded however
# many runs ever ended.
RELEASED_WINDOW = 10_000
# A fleet budget the manifest leaves open: exact as a Lua number (2^53), never reached.
UNLIMITED = 2**53


class ClaimInFlight(Exception):
    """A claim that was not to wait found its request id being decided (``claim``'s
    ``wait=False``): not a refusal, the caller claims again once it holds no other."""


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

    def as_list(self) -> list[int]:
        return [getattr(self, name) for name in BUDGETS]

    def holds(self, cost: Usage, *names: str) -> bool:
        """Whether what is left (this) holds ``cost`` in ``names`` (every budget by
        default). usd_micros is only known after the call: an exhausted money budget
        holds nothing."""
        for name in names or BUDGETS:
            room = getattr(self, name)
            if getattr(cost, name) > room or (name == "usd_micros" and room <= 0):
                return False
        return True


@dataclass(frozen=True)
class Books:
    limits: Usage
    spent: Usage
    reserved: Usage

    def remaining(self) -> Usage:
        left = Usage(**self.limits.as_dict())
        left.add(self.spent, -1)
        left.add(self.reserved, -1)
        return left

    def remaining_ratio(self) -> dict[str, float]:
        left = self.remaining()
        return {
            name: max(getattr(left, name), 0) / limit
            if (limit := getattr(self.limits, name))
            else 0.0
            for name in BUDGETS
        }


@dataclass(frozen=True)
class Fleet:
    """A grant's limits over all its runs together: budgets (``UNLIMITED`` where the
    manifest sets none) and runs at once (0: no limit)."""

    limits: Usage
    runs: int = 0


@dataclass(frozen=True)
class RunState:
    step: str
    completed_steps: tuple[str, ...] = ()
    outcome: str = ""  # "" while the run goes on, else "completed" or "failed"
    latest_version: int = 0  # the highest version of the run's lineage registered


class RunStore(Protocol):
    """Run state and budgets. Every method is atomic with respect to every other caller."""

    #: True when the state lives outside this process (several replicas share it) and
    #: must not be rebuilt from this process's decision log at start-up.
    shared: bool

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
        """Create the run if it does not exist yet (opening again changes nothing); True
        if this call created it. ``grant`` is (the grant's default run id, run key, its
        narrower as canonical JSON or "") for a run started under a grant, so another
        replica can find its grant and narrow it the same way. ``fleet`` names
        the grant whose fleet books its reservations also charge (opened by
        ``open_fleet``); ``slot`` = (now, until, force) takes one of its runs-at-once
        slots until the run ends or ``until`` passes: ``FleetRunsExhausted`` when all are
        taken at ``now``, unless forced (replaying a start that was admitted)."""

    def open_fleet(self, grant_run_id: str, fleet: Fleet) -> None:
        """Create a grant's fleet books if they do not exist yet."""

    def fleet_books(self, grant_run_id: str) -> tuple[Books, int] | None:
        """A grant's fleet books and its runs holding a slot now, or None without limits."""

    def state(self, run_id: str, lineage: str) -> RunState: ...

    def move(self, run_id: str, seen_step: str, step: str, outcome: str = "") -> bool:
        """Enter ``step`` (or end the run with ``outcome``, which frees its fleet slot) if
        the run is still at ``seen_step`` and has not ended; False otherwise."""

    def unmove(self, run_id: str, from_step: str, step: str) -> None:
        """Undo ``move(run_id, from_step, step)`` whose decision was never given, if the
        run is still where that move left it (not for an ending)."""

    def reserve(
        self,
        run_id: str,
        reservation_id: str,
        cost: Usage,
        expires: datetime,
        force: bool = False,
        replayed: bool = False,
    ) -> bool:
        """Hold ``cost`` on the run's books and its fleet's in one step if every budget of
        both can take it; False (nothing held) otherwise; ``RunClosed`` (nothing held) if
        the run has ended meanwhile, unless ``replayed`` (a hold read back from the log,
        made before the ending that another decision logged first).

        With ``force`` (a shadow run: over-spend is recorded, not blocked) it is held
        either way, and the answer still says whether it fitted."""

    def release(self, reservation_id: str) -> None:
        """Undo a reservation whose decision was never given."""

    def settle(self, reservation_id: str, tokens: int, usd_micros: int) -> str | None:
        """Replace a reservation by the real usage; its run id, or None if unknown."""

    def reservation_runs(self, reservation_ids: Sequence[str]) -> list[str | None]:
        """The run each open reservation holds budget of (None: unknown or settled)."""

    def expire(self, run_id: str, now: datetime) -> list[tuple[str, Usage]]:
        """Settle the run's reservations past their expiry at their worst case."""

    def books(self, run_id: str) -> Books: ...

    def release_run(self, run_id: str, status: str) -> None:
        """Drop an ended run's live state (its reservations were settled first) and
        remember it among the last ``RELEASED_WINDOW`` released, as ``status``; with ""
        forget it instead (a start the log could not record). A grant's default run
        (released after its runs) takes the grant's fleet books and envelope with it."""

    def schedule(self, run_id: str, when: datetime) -> None:
        """Have a started run released at ``when`` (or sooner, as it was) by any replica
        sharing the store, one that never held it included (nothing for a store only this
        process uses: its registry holds every run)."""

    def due_runs(self, now: datetime, limit: int) -> list[str]:
        """Up to ``limit`` scheduled runs whose time came by ``now``, each given to one
        caller only."""

    def released(self, run_id: str) -> str | None:
        """The status a recently released run ended with, or None."""

    def claim(
        self, run_id: str, request_id: str, wait: bool = True, waited: bool = False
    ) -> dict[str, Any] | None:
        """The answer already given to ``request_id``, or None after marking it in flight
        (a duplicate arriving meanwhile waits for the first one's answer; ``StoreUnavailable``
        if none comes within the wait, rather than a second decision and charge; not
        ``wait``: ``ClaimInFlight`` at once). ``waited``: a claim before this one found it
        in flight, so a mark found lapsed now is not one found lapsed on arrival."""

    def answer(self, run_id: str, request_id: str, stored: dict[str, Any]) -> None:
        """Keep the answer (nothing, for a run released while it was decided)."""

    def unclaim(self, run_id: str, request_id: str) -> None:
        """Drop the in-flight mark without an answer: the next try decides anew."""

    def put_envelope(self, run_id: str, envelope: bytes) -> None:
        """Keep a registered run's envelope, so another replica can verify and load it."""

    def envelope(self, run_id: str) -> bytes | None: ...

    def grant_of(self, run_id: str) -> tuple[str, str, str] | None:
        """(grant's default run id, run key, narrower) of a run started under a grant, if
        shared."""

    def export_state(self) -> dict[str, Any]:
        """What a replay of this process's log would rebuild here, as JSON values, for a
        snapshot (``{}`` for a shared store: it is its own record). Consistent only while
        nothing changes the store (the service's gate)."""

    def import_state(self, state: dict[str, Any], run_ids: Collection[str]) -> None:
        """Put back what ``export_state`` gave for the runs of ``run_ids`` (opened already);
        ``ValueError`` before anything changes when ``state`` is malformed."""

    def close(self) -> None: ...
