"""What decisions change in a run's state, and the same changes replayed from the log.

The ledger reserves an allowed action's worst-case cost, moves a run's step, settles
reservations with real usage (or at their worst case once they expire), and keeps each
request id's answer. Every change that the log must show (settlements, expiries) is written
to it here; decisions themselves are written by the service, after the ledger applied them.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pdp.action import Action
from pdp.decisionlog import DecisionLog, DecisionRecord, Queued, SettlementRecord
from pdp.engine import Decision
from pdp.errors import LogUnavailable, ManifestUnknown, ReasonCode, RequestIdReused, RunReleased
from pdp.ledger.answers import DecisionOutcome, kept_answer, outcome_of
from pdp.ledger.cost import cost_of
from pdp.ledger.runs import Run, RunRegistry, run_id_for
from pdp.ledger.store import BUDGETS, UNLIMITED, Books, RunState, RunStore, Usage

__all__ = ["MAX_REPORTED", "Applied", "Ledger"]

log = logging.getLogger("abc.pdp")

# The most one report may settle: exact in JSON (2^53) and far below what would overflow a
# Redis counter however often it is reported.
MAX_REPORTED = 2**40
# Settlements remembered, the most recent: a retry of one whose record was lost writes it.
_RECENT_SETTLEMENTS = 4096
# How soon a run not released when due (an expired grant whose runs were still held, a
# sweep the store or log interrupted) is looked at again.
_RECHECK = timedelta(minutes=1)


def _shown(left: Usage) -> dict[str, int]:
    """A fleet's remaining budgets, the ones it leaves open left out."""
    return {n: v for n, v in left.as_dict().items() if v < UNLIMITED // 2}


@dataclass(frozen=True)
class Applied:
    """A decision as the ledger applied it: the verdict (which the budget may have turned
    into a refusal), and the reservation or step change it made."""

    decision: Decision
    reservation_id: str = ""
    cost: Usage | None = None
    step: tuple[str, str] | None = None  # (from, to)
    over_budget: bool = False  # a shadow run spent past a budget


class Ledger:
    """Run state and budgets over one run store; settlements and expiries go to ``log``."""

    def __init__(
        self,
        store: RunStore,
        decision_log: DecisionLog,
        reservation_ttl: timedelta,
        retention: timedelta = timedelta(hours=1),
    ) -> None:
        self.store = store
        self.runs = RunRegistry(store, retention)
        self._log = decision_log
        self.reservation_ttl = reservation_ttl
        self._settled: OrderedDict[str, tuple[SettlementRecord, Queued | None]] = OrderedDict()
        self._settled_lock = threading.Lock()

    def claim(
        self,
        run_id: str,
        request_id: str,
        action: dict[str, Any],
        wait: bool = True,
        waited: bool = False,
    ) -> DecisionOutcome | None:
        """The answer already given to ``request_id``, or None once it is claimed for this
        decision. ``RequestIdReused`` if it was given for another action; not ``wait``:
        ``ClaimInFlight`` if it is being decided (``RunStore.claim``)."""
        prior = self.store.claim(run_id, request_id, wait, waited)
        if prior is None:
            return None
        if prior.get("action") != action:
            raise RequestIdReused("request id already used for another action")
        return outcome_of(prior)

    def keep(
        self, run_id: str, request_id: str, action: dict[str, Any], outcome: DecisionOutcome
    ) -> None:
        kept = kept_answer(
            action,
            outcome.decision_id,
            outcome.reservation_id,
            outcome.enforced,
            outcome.decision.as_dict(),
        )
        self.store.answer(run_id, request_id, kept)

    def unclaim(self, run_id: str, request_id: str) -> None:
        self.store.unclaim(run_id, request_id)

    def state(self, run: Run) -> RunState:
        """``RunReleased`` for a run compiled here that another replica released."""
        try:
            return self.store.state(run.run_id, run.lineage)
        except ManifestUnknown:
            self.runs.drop(run)  # its state is gone: so is the compiled run, here
            self.check_released(run.run_id)
            raise

    def check_released(self, run_id: str) -> None:
        """``RunReleased`` if ``run_id`` is among the runs released recently."""
        status = self.store.released(run_id)
        if status is not None:
            raise RunReleased(
                f"the run {status} and its live state was released after the retention;"
                " its final books are in the decision log"
            )

    def books(self, run_id: str) -> Books:
        return self.store.books(run_id)

    def fleet_books(self, run: Run) -> tuple[Books, int] | None:
        """The books of all runs of ``run``'s grant together and the runs holding a slot,
        or None when the grant sets no fleet limits."""
        if not run.verified.manifest.fleet:
            return None
        return self.store.fleet_books(run_id_for(run.verified.digest))

    def apply(
        self, run: Run, action: Action, decision: Decision, seen_step: str, now: datetime
    ) -> Applied:
        """Apply what goes ahead: reserve its worst-case cost, or move the run's step.

        For a shadow run this also applies what the policy refused (the call is forwarded
        all the same): the verdict stays, budgets are charged past their limits and the
        over-spend recorded, a step in the Assembly is entered out of order.
        """
        if action.kind == "step":
            target = action.target.removeprefix("step:")
            if target == seen_step or not run.has_step(target):
                return Applied(decision)  # already there, or (shadow) nothing to enter
            if not self.move(run.run_id, seen_step, target, now):
                changed = Decision.deny(
                    ReasonCode.STEP_OUT_OF_ORDER, "the run changed step while deciding"
                )
                return Applied(changed)
            return Applied(decision, step=(seen_step, target))
        cost = cost_of(action, decision)
        reservation_id = "rsv_" + uuid.uuid4().hex
        expires = now + self.reservation_ttl
        if self.store.reserve(run.run_id, reservation_id, cost, expires, force=run.shadow):
            return Applied(decision, reservation_id, cost)
        refusal = self._refusal(run, cost)
        if not run.shadow:
            return Applied(refusal)
        verdict = refusal if decision.allow else decision
        return Applied(verdict, reservation_id, cost, over_budget=True)

    def _refusal(self, run: Run, cost: Usage) -> Decision:
        """Which books could not hold ``cost``: the run's own, or its fleet's (naming the
        limit). Read after the refusal, so under contention it may name a budget that
        freed meanwhile; the refusal itself was made atomically."""
        left = self.books(run.run_id).remaining()
        fleet = self.fleet_books(run)
        if fleet is not None and left.holds(cost):
            fleet_left = fleet[0].remaining()
            over = [n for n in BUDGETS if not fleet_left.holds(cost, n)] or ["usd_micros"]
            return Decision.deny(
                ReasonCode.FLEET_BUDGET_EXHAUSTED,
                f"the fleet limit on {over[0]} (all runs of this manifest together) cannot"
                " hold this action",
                {"cost": cost.as_dict(), "fleet_remaining": _shown(fleet_left)},
            )
        return Decision.deny(
            ReasonCode.BUDGET_EXHAUSTED,
            "the run's remaining budget cannot hold this action",
            {"cost": cost.as_dict(), "remaining": left.as_dict()},
        )

    def release(self, run_id: str, applied: Applied) -> None:
        """Undo what ``applied`` reserved or moved: its decision was never given (the log
        could not record it). Step changes of a run are decided one at a time, so the run
        is still where this one left it. An ending stays: it only takes permissions away,
        and its slot and release time are gone with it."""
        if applied.reservation_id:
            self.store.release(applied.reservation_id)
        if applied.step is not None and not applied.step[1].startswith("@"):
            self.store.unmove(run_id, *applied.step)

    def move(self, run_id: str, seen_step: str, target: str, now: datetime) -> bool:
        """Enter step ``target``, or end the run for an "@completed" / "@failed" target
        (released once the retention passed)."""
        if not target.startswith("@"):
            return self.store.move(run_id, seen_step, target)
        if not self.store.move(run_id, seen_step, seen_step, target[1:]):
            return False
        self.runs.ended(run_id, now)
        return True

    def sweep(self, now: datetime, limit: int = 8) -> list[str]:
        """Release up to ``limit`` runs that ended or expired longer than the retention
        ago: what they still hold is settled at its worst case (and logged), then their
        state is dropped here and in the store; GetRun then answers ``run_released``.
        A grant's default run goes last: once the grant expired and no run started under
        it is held any more, since those are started from it. The manifest digests of
        the grants released."""
        due, grants = self.runs.due(now, limit), []
        for done, run in enumerate(due):
            try:
                if self._release_if_due(run, now) and not run.run_key:
                    grants.append(run.verified.digest)
            except BaseException:
                # The store or the log is out: these are looked at again a little later
                # (not at once: one that fails every time must not fail every StartRun).
                for left in due[done:]:
                    self.runs.later(left, now + _RECHECK)
                raise
        self._sweep_shared(now, limit)
        return grants

    def _sweep_shared(self, now: datetime, limit: int) -> None:
        """Release runs a shared store says are due, held here or not: a run another
        replica started (one since restarted, or gone) is released all the same."""
        # Each leased to this caller: one not released (an error here) is taken again later.
        for run_id in self.store.due_runs(now, limit):
            run = self.runs.find(run_id)
            if run is None:
                self._release_unheld(run_id, now)
            elif not self._release_if_due(run, now):
                self.store.schedule(run_id, now + _RECHECK)

    def _release_unheld(self, run_id: str, now: datetime) -> None:
        """Release a run this process never compiled, from the store alone: it is due,
        so it ended or expired."""
        try:
            state = self.store.state(run_id, "")
        except ManifestUnknown:
            self.store.release_run(run_id, "")  # released already: its due entry goes too
            return
        self.expire(run_id, now + self.reservation_ttl, logged_at=now)
        self.store.release_run(run_id, state.outcome or "expired")

    def _release_if_due(self, run: Run, now: datetime) -> bool:
        """Whether ``run`` was released (or found released by another replica)."""
        try:
            state = self.store.state(run.run_id, run.lineage)
        except ManifestUnknown:
            self.runs.drop(run)  # released by another replica
            return True
        # A narrowed run expires with its own (narrowed) window, as it is due.
        expired = now >= run.manifest.expires_at
        status = state.outcome or ("expired" if expired else "")
        if not status:
            return False  # not ended: looked at again at its expiry
        if not run.run_key and (not expired or self.runs.holds_runs_of(run)):
            # Its runs are due by now too: looked at again once they have gone.
            self.runs.later(run, now + max(self.runs.retention, _RECHECK))
            return False
        self.expire(run.run_id, now + self.reservation_ttl, logged_at=now)
        self.store.release_run(run.run_id, status)
        self.runs.drop(run)
        return True

    def expire(self, run_id: str, now: datetime, logged_at: datetime | None = None) -> None:
        """Settle the run's reservations that were never reported, at their worst case.
        ``LogUnavailable`` when the log cannot record it: the run then decides nothing."""
        for reservation_id, cost in self.store.expire(run_id, now):
            self._log.append(
                SettlementRecord(
                    time=logged_at or now,
                    run_id=run_id,
                    reservation_id=reservation_id,
                    tokens=cost.tokens,
                    usd_micros=cost.usd_micros,
                    expired=True,
                )
            )

    def settle(
        self, reservation_id: str, tokens: int, usd_micros: int, now: datetime, *, wait: bool = True
    ) -> Queued | None:
        """Settle with real usage: the settlement's place in the log (durable, unless not
        ``wait``: then it goes with the log's next commit), or None for an unknown or
        settled reservation or an impossible amount. ``StoreUnavailable`` when the run
        store cannot be reached (the caller retries), ``LogUnavailable`` when the log
        cannot record it."""
        if not (0 <= tokens <= MAX_REPORTED and 0 <= usd_micros <= MAX_REPORTED):
            return None
        run_id = self.store.settle(reservation_id, tokens, usd_micros)
        if run_id is None:
            return self._settled_before(reservation_id, wait)
        record = SettlementRecord(
            time=now,
            run_id=run_id,
            reservation_id=reservation_id,
            tokens=tokens,
            usd_micros=usd_micros,
        )
        try:
            queued = self._log.queue(record)
        except LogUnavailable:
            self._remember(reservation_id, record, None)
            raise
        self._remember(reservation_id, record, queued)
        if wait:
            self._log.sync(queued)
        return queued

    def _remember(
        self, reservation_id: str, record: SettlementRecord, queued: Queued | None
    ) -> None:
        with self._settled_lock:
            self._settled[reservation_id] = (record, queued)
            if len(self._settled) > _RECENT_SETTLEMENTS:
                self._settled.popitem(last=False)

    def _settled_before(self, reservation_id: str, wait: bool) -> Queued | None:
        """A retry of a settlement the store made already: None ("settled") once its
        record is durable; its record written again if that write was lost (the store
        kept the settlement, the log did not), and that place returned; not ``wait``ing,
        its place too while it is still queued, for the caller's commit to take."""
        with self._settled_lock:
            known = self._settled.get(reservation_id)
        if known is None:
            # Settled long ago, expired, or never held: whatever recorded it is durable
            # once what is queued now is (a settlement still on its way included).
            self._log.flush()
            return None
        record, queued = known
        if queued is not None and not wait and self._log.pending(queued):
            # Settled by a batch answered before its record was durable, now carried again
            # by a decision: the record goes with that decision's commit, not one before it.
            return queued
        if queued is not None:
            try:
                self._log.sync(queued)  # not under the lock: new settlements go on meanwhile
                return None
            except LogUnavailable:
                pass  # lost with its batch: written again below, once
        with self._settled_lock:
            if self._settled.get(reservation_id) is known:
                queued = self._log.queue(record)
                self._settled[reservation_id] = (record, queued)
            else:
                queued = None  # another retry wrote it again meanwhile: wait for that one
        if queued is None:
            return self._settled_before(reservation_id, wait)
        if wait:
            self._log.sync(queued)
        return queued

    def restore(self, record: DecisionRecord | SettlementRecord) -> None:
        """Apply one logged change again (start-up recovery from this process's log).

        A shared store (Redis) is its own record of steps, budgets and answers: nothing is
        applied to it, so nothing is applied twice.
        """
        run_id = record.run_id
        if self.store.shared or not run_id or self.runs.find(run_id) is None:
            return
        if isinstance(record, SettlementRecord):
            self.store.settle(record.reservation_id, record.tokens, record.usd_micros)
            return
        if record.cost is not None and record.expires is not None:
            # Held as made (forced: it was within budget, or a shadow run's, then; replayed:
            # made before an ending another decision logged first).
            self.store.reserve(
                run_id,
                record.reservation_id,
                Usage(**record.cost),
                record.expires,
                force=True,
                replayed=True,
            )
        if record.step is not None:
            self.move(run_id, record.step.from_, record.step.to, record.time)
        acted = record.action
        answered = (
            acted
            and not acted.get("probe")
            and record.request_id
            and not record.reused_request_id  # the first answer stays the answer
            # Neither kept live: an outage (a retry decides anew), nor a caller of another
            # grant (refused before the request id was claimed; it is the run's to answer).
            and [r["code"] for r in record.result["reasons"][:1]]
            not in (["pdp_unavailable"], ["run_not_bound"])
            and not record.unloggable  # never kept live either: a retry decides
            # Nor one whose action held a masked secret (a masked run field keeps its answer).
            and not any(path.startswith("action.") for path in record.masked)
        )
        if answered:
            kept = kept_answer(
                acted, record.decision_id, record.reservation_id, record.enforced, record.result
            )
            self.store.answer(run_id, record.request_id, kept)
