"""The shared run store: run state, budgets, answers and rollback marks in Redis.

Several PDP replicas pointed at one Redis share every run: a reservation checks and
holds all four budgets, of the run and of its grant's fleet, in one Lua script
(``lua.py``), so no interleaving of replicas overspends; a step change is a
compare-and-set; a request id answered by one replica gets the same answer from another.
Envelopes are kept so a replica that never saw a registration can load the run, but Redis
is not trusted with them: each replica verifies the envelope with its own trust store
before compiling it.

Keys (``P`` is the prefix, ``{R}`` the run id as a hash tag):
``P{R}:run`` hash of step, completed (JSON list), outcome, l1..l4 limits, s1..s4 spent,
r1..r4 reserved (budgets in ``BUDGETS`` order), and for a started run its grant, key and
narrower (canonical JSON, "" for none; re-checked against the signed grant on loading, so
Redis cannot widen a run); ``P{R}:rsv`` reservation id -> costs;
``P{R}:exp`` sorted set of reservation ids by expiry (ms); ``P{R}:answers`` request id
-> stored answer, or ``~deadline`` while in flight, and ``P{R}:order`` the answered ids
oldest first (the last ``ANSWER_WINDOW`` are kept); ``Prsvrun`` reservation id -> run
id; ``Penvelopes`` run id -> envelope; ``Plineages`` lineage -> highest version;
``Phighwater`` lineage -> "version digest". A grant with fleet limits (``{G}`` its
default run id, named by its runs' ``fleet`` field): ``P{G}:fleet`` hash of l1..l4,
s1..s4, r1..r4 over all its runs and ``runs`` (runs at once, 0: none), ``P{G}:live``
sorted set of the run ids holding a slot, by expiry (ms). ``Pdue`` the started runs by
when any replica may release them (ms), so a replica that never held one (restarted, say)
releases it too. ``Preleased`` run id -> the
status it ended with, ``Preleased-order`` the last ``RELEASED_WINDOW`` released, oldest
first. Scripts touch keys of several runs, so the target is one Redis primary, not Redis
Cluster.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any, TypeVar

import redis
from redis.commands.core import Script

from pdp.errors import (
    FleetRunsExhausted,
    ManifestRollback,
    ManifestUnknown,
    RunClosed,
    StoreUnavailable,
)
from pdp.ledger import lua
from pdp.ledger.store import (
    ANSWER_WINDOW,
    RELEASED_WINDOW,
    Books,
    ClaimInFlight,
    Fleet,
    RunState,
    Usage,
)

__all__ = ["RedisRunStore"]

T = TypeVar("T")

_IN_FLIGHT_MS = 10_000
# A due run taken for release is taken again after this long unless it was released.
_DUE_LEASE_MS = 300_000
_FIELDS = [f"{kind}{i}" for kind in "lsr" for i in range(1, 5)]


def _guarded(call: Callable[[], T]) -> T:
    try:
        return call()
    except redis.RedisError as exc:
        raise StoreUnavailable(f"run store unreachable: {type(exc).__name__}") from exc


def _usage(values: list[Any]) -> Usage:
    return Usage(*(int(v) for v in values))


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class RedisRunStore:
    shared = True

    def __init__(self, url: str, prefix: str = "abc:", timeout: float = 2.0) -> None:
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._prefix = prefix
        scripts = (
            lua.OPEN,
            lua.OPEN_FLEET,
            lua.MOVE,
            lua.RESERVE,
            lua.TAKE,
            lua.EXPIRE,
            lua.CLAIM,
            lua.UNCLAIM,
            lua.ANSWER,
            lua.ADMIT,
            lua.RELEASE,
            lua.TAKE_DUE,
            lua.UNMOVE,
        )
        (
            self._open,
            self._open_fleet,
            self._move,
            self._reserve,
            self._take,
            self._expire,
            self._claim,
            self._unclaim,
            self._answer,
            self._admit,
            self._release,
            self._take_due,
            self._unmove,
        ) = (self._redis.register_script(source) for source in scripts)

    def ping(self) -> None:
        """Reach Redis now, so a wrong URL stops start-up instead of refusing later."""
        _guarded(self._redis.ping)

    def _key(self, run_id: str, part: str) -> str:
        return f"{self._prefix}{{{run_id}}}:{part}"

    def _call(self, script: Script, run_id: str, keys: list[str], args: list[Any]) -> Any:
        result = _guarded(lambda: script(keys=keys, args=args))
        if result == -1:
            raise ManifestUnknown("no run with this id")
        return result

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
        keys = [
            self._key(run_id, "run"),
            self._prefix + "lineages",
            self._key(fleet, "fleet"),
            self._key(fleet, "live"),
        ]
        now, until, force = slot or (None, None, False)
        grant_run_id, run_key, narrower = grant  # by position in the script: exactly three
        args = [first_step, *limits.as_list(), lineage, version, grant_run_id, run_key, narrower]
        args += [fleet, int(bool(slot))]
        args += [_ms(now) if now else 0, _ms(until) if until else 0, int(force), run_id]
        created = self._call(self._open, run_id, keys, args)
        if created == -2:
            runs = _guarded(lambda: self._redis.hget(self._key(fleet, "fleet"), "runs"))
            raise FleetRunsExhausted(
                f"the grant's fleet limit of {int(runs or 0)} runs at once is reached:"
                " a run must end or expire first"
            )
        return bool(created)

    def open_fleet(self, grant_run_id: str, fleet: Fleet) -> None:
        keys = [self._key(grant_run_id, "fleet")]
        args = [*fleet.limits.as_list(), fleet.runs]
        _guarded(lambda: self._open_fleet(keys=keys, args=args))

    def fleet_books(self, grant_run_id: str) -> tuple[Books, int] | None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hmget(self._key(grant_run_id, "fleet"), _FIELDS)
        pipe.zcard(self._key(grant_run_id, "live"))
        values, live = _guarded(pipe.execute)
        if values[0] is None:
            return None
        return Books(_usage(values[0:4]), _usage(values[4:8]), _usage(values[8:12])), int(live)

    def grant_of(self, run_id: str) -> tuple[str, str, str] | None:
        key = self._key(run_id, "run")
        values = _guarded(lambda: self._redis.hmget(key, ["grant", "key", "narrower"]))
        grant_run, run_key, narrower = (v.decode() if isinstance(v, bytes) else "" for v in values)
        return (grant_run, run_key, narrower) if grant_run and run_key else None

    def state(self, run_id: str, lineage: str) -> RunState:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hmget(self._key(run_id, "run"), ["step", "completed", "outcome"])
        pipe.hget(self._prefix + "lineages", lineage)
        (step, completed, outcome), latest = _guarded(pipe.execute)
        if step is None:
            raise ManifestUnknown("no run with this id")
        return RunState(
            step.decode(),
            tuple(json.loads(completed)),
            outcome.decode(),
            int(latest or 0),
        )

    def move(self, run_id: str, seen_step: str, step: str, outcome: str = "") -> bool:
        keys = [self._key(run_id, "run")]
        args = [seen_step, step, outcome, self._prefix, run_id]
        return bool(self._call(self._move, run_id, keys, args))

    def unmove(self, run_id: str, from_step: str, step: str) -> None:
        keys = [self._key(run_id, "run")]
        _guarded(lambda: self._unmove(keys=keys, args=[from_step, step]))

    def reserve(
        self,
        run_id: str,
        reservation_id: str,
        cost: Usage,
        expires: datetime,
        force: bool = False,
        replayed: bool = False,
    ) -> bool:
        keys = [
            self._key(run_id, "run"),
            self._key(run_id, "rsv"),
            self._key(run_id, "exp"),
            self._prefix + "rsvrun",
        ]
        args = [reservation_id, *cost.as_list(), _ms(expires), run_id, int(force), self._prefix]
        held = self._call(self._reserve, run_id, keys, [*args, int(replayed)])
        if held == -3:
            raise RunClosed("the run ended while this decision was made")
        return bool(held)

    def _take_off(self, reservation_id: str, tokens: int, usd_micros: int, mode: str) -> Any:
        keys = [self._prefix + "rsvrun"]
        args: list[str | int] = [reservation_id, tokens, usd_micros, mode, self._prefix]
        return _guarded(lambda: self._take(keys=keys, args=args))

    def release(self, reservation_id: str) -> None:
        self._take_off(reservation_id, 0, 0, "release")

    def reservation_runs(self, reservation_ids: Sequence[str]) -> list[str | None]:
        if not reservation_ids:
            return []
        key = self._prefix + "rsvrun"
        found = _guarded(lambda: self._redis.hmget(key, list(reservation_ids)))
        return [v.decode() if isinstance(v, bytes) else None for v in found]

    def settle(self, reservation_id: str, tokens: int, usd_micros: int) -> str | None:
        run_id = self._take_off(reservation_id, tokens, usd_micros, "settle")
        return run_id.decode() if run_id else None

    def expire(self, run_id: str, now: datetime) -> list[tuple[str, Usage]]:
        keys = [
            self._key(run_id, "run"),
            self._key(run_id, "rsv"),
            self._key(run_id, "exp"),
            self._prefix + "rsvrun",
        ]
        flat = _guarded(lambda: self._expire(keys=keys, args=[_ms(now), self._prefix]))
        return [
            (flat[i].decode(), _usage(flat[i + 1].decode().split(",")))
            for i in range(0, len(flat), 2)
        ]

    def books(self, run_id: str) -> Books:
        values = _guarded(lambda: self._redis.hmget(self._key(run_id, "run"), _FIELDS))
        if values[0] is None:
            raise ManifestUnknown("no run with this id")
        return Books(_usage(values[0:4]), _usage(values[4:8]), _usage(values[8:12]))

    def release_run(self, run_id: str, status: str) -> None:
        keys = [
            *(self._key(run_id, part) for part in ("run", "rsv", "exp", "answers", "order")),
            self._prefix + "rsvrun",
            self._prefix + "released",
            self._prefix + "released-order",
        ]
        args: list[str | int] = [run_id, status, self._prefix, RELEASED_WINDOW]
        _guarded(lambda: self._release(keys=keys, args=args))

    def schedule(self, run_id: str, when: datetime) -> None:
        key, at = self._prefix + "due", _ms(when)
        _guarded(lambda: self._redis.zadd(key, {run_id: at}, lt=True))

    def due_runs(self, now: datetime, limit: int) -> list[str]:
        # At most 10,000 a call (a start-up's sweep asks for all): an integer for Lua.
        keys = [self._prefix + "due"]
        args = [_ms(now), min(limit, 10_000), _ms(now) + _DUE_LEASE_MS]
        ids = _guarded(lambda: self._take_due(keys=keys, args=args))
        return [i.decode() for i in ids]

    def released(self, run_id: str) -> str | None:
        raw = _guarded(lambda: self._redis.hget(self._prefix + "released", run_id))
        return raw.decode() if isinstance(raw, bytes) else None

    def claim(
        self, run_id: str, request_id: str, wait: bool = True, waited: bool = False
    ) -> dict[str, Any] | None:
        key = self._key(run_id, "answers")
        deadline = time.monotonic() + _IN_FLIGHT_MS / 1000
        while True:
            prior = _guarded(lambda: self._claim(keys=[key], args=[request_id, _IN_FLIGHT_MS]))
            if prior is None or (prior == b"!" and not waited):
                return None  # claimed (over a lapsed mark found on arrival, too)
            if prior == b"!" or time.monotonic() > deadline:
                # The decision waited on is still under way, or its mark lapsed unanswered
                # (its replica stuck or gone): deciding it again here could charge it
                # twice. A later retry, finding no mark, decides it.
                if prior == b"!":
                    self.unclaim(run_id, request_id)
                raise StoreUnavailable("a decision for this request id is still under way")
            if not prior.startswith(b"~"):
                answer: dict[str, Any] = json.loads(prior)
                return answer
            if not wait:
                raise ClaimInFlight(request_id)
            waited = True
            time.sleep(0.005)  # another replica is deciding this request id right now

    def answer(self, run_id: str, request_id: str, stored: dict[str, Any]) -> None:
        keys = [self._key(run_id, part) for part in ("answers", "order", "run")]
        args: list[str | int] = [request_id, json.dumps(stored), ANSWER_WINDOW]
        _guarded(lambda: self._answer(keys=keys, args=args))

    def unclaim(self, run_id: str, request_id: str) -> None:
        keys = [self._key(run_id, "answers")]
        _guarded(lambda: self._unclaim(keys=keys, args=[request_id]))

    def put_envelope(self, run_id: str, envelope: bytes) -> None:
        _guarded(lambda: self._redis.hset(self._prefix + "envelopes", run_id, envelope))

    def envelope(self, run_id: str) -> bytes | None:
        raw = _guarded(lambda: self._redis.hget(self._prefix + "envelopes", run_id))
        return raw if isinstance(raw, bytes) else None

    def admit(self, lineage: str, version: int, manifest_digest: str) -> None:
        """Rollback marks shared by the replicas: this store is their ``HighWater`` too."""
        keys = [self._prefix + "highwater"]
        args: list[str | int] = [lineage, version, manifest_digest]
        mark = _guarded(lambda: self._admit(keys=keys, args=args))
        if mark != -1:
            raise ManifestRollback(
                f"lineage {lineage!r} version {version} is not above accepted version {mark}"
            )

    def export_state(self) -> dict[str, Any]:
        """Nothing: Redis is the record of steps, budgets, reservations and answers, shared
        by every replica; a snapshot holds only the runs this process compiled."""
        return {}

    def import_state(self, state: dict[str, Any], run_ids: Collection[str]) -> None:
        """Nothing to put back: see ``export_state``."""

    def close(self) -> None:
        self._redis.close()
