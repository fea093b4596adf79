"""The one decision path behind every front door (gRPC, the OPA REST door, Envoy ext_authz).

``DecisionService`` registers manifests, starts runs, decides validated actions, settles
usage and shows runs. It is thin: grants and run starts are ``pdp/grants.py``'s; runs,
budgets and answers the ledger's (``pdp/ledger``); records the decision log's
(``pdp/decisionlog``); verdicts the engine's (``pdp/engine``).

Each call takes ``now`` from its caller (one clock read per request, also the time its
record carries). Every failure becomes a refusal with its reason code, mapped once: an
``AbcError`` carries its own, an engine that cannot decide is ``pdp_unavailable``, and so is
a bug (logged as such). A decision is never answered before its record is durable.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from pdp.action import Action
from pdp.bundle import PolicyBundle
from pdp.clock import utc_now
from pdp.decisionlog import (
    DecisionLog,
    DecisionRecord,
    LogPosition,
    Queued,
    Record,
    RegistrationRecord,
    RunStartRecord,
    SettlementRecord,
    StepChange,
)
from pdp.engine import Decision, EngineError
from pdp.errors import (
    AbcError,
    BadRequest,
    LogUnavailable,
    ReasonCode,
    RequestIdReused,
    RunNotBound,
    StoreUnavailable,
)
from pdp.gate import StateGate
from pdp.grants import Grants
from pdp.ledger import (
    BUDGETS,
    Applied,
    ClaimInFlight,
    DecisionOutcome,
    Ledger,
    MemoryRunStore,
    RegistryState,
    Run,
    RunStore,
)
from pdp.manifest import (
    HighWater,
    TrustStore,
)
from pdp.manifest.canonical import canonical_record_bytes
from pdp.metrics import PdpMetrics

__all__ = [
    "DecisionBatch",
    "DecisionOutcome",
    "DecisionService",
    "FleetView",
    "HeldDecision",
    "RunView",
]

log = logging.getLogger("abc.pdp")

# How a decision claims its request id when another holds it: wait for that one's answer,
# raise ``ClaimInFlight`` (a batch holding claims), or refuse at once.
Claiming = Literal["wait", "try", "refuse"]
# What a decision the log could not take is answered instead.
_UNAVAILABLE = Decision.deny(ReasonCode.PDP_UNAVAILABLE, "decision log unavailable")
# The sidecar's routes, the doors its own refusals come through.
SIDECAR_ROUTES = frozenset({"openai", "anthropic", "mcp", "http"})


@dataclass(frozen=True)
class RunView:
    run_id: str
    manifest_digest: str
    step: str
    completed_steps: tuple[str, ...]
    status: str
    spent: dict[str, int] = field(default_factory=dict)
    remaining: dict[str, int] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)
    run_key: str = ""
    effective_digest: str = ""
    fleet: FleetView | None = None  # None: the grant sets no fleet limits


@dataclass(frozen=True)
class FleetView:
    """All runs of a grant together, as ``GetRun`` shows them beside one run."""

    spent: dict[str, int]
    reserved: dict[str, int]
    remaining: dict[str, int]  # a budget the fleet leaves open reads 0 and is in ``open``
    open: tuple[str, ...]
    runs: int  # holding a slot now
    max_runs: int  # 0: no limit


@dataclass(frozen=True)
class _Judged:
    """What deciding came to, before it is recorded."""

    applied: Applied
    policy_input: dict[str, object]  # as judged (or as far as it got): logged
    policy_result: dict[str, Any] | None = None  # the policy's own verdict: `abcctl replay`
    shadow: bool = False  # a shadow run's verdict: forwarded whatever it says
    # Not the request id's answer: it was reused for another action, or retried after its
    # kept allow's run ended (replay keeps the first answer).
    reused: bool = False


def _refused(error: AbcError | None, policy_input: dict[str, object]) -> _Judged:
    """A refusal for ``error``; None is a failure of the PDP's own (a bug)."""
    if error is None:
        decision = Decision.deny(ReasonCode.PDP_UNAVAILABLE, "the PDP failed to decide")
    else:
        decision = Decision.deny(error.reason, str(error))
    return _Judged(Applied(decision), policy_input, reused=isinstance(error, RequestIdReused))


@dataclass(eq=False)
class HeldDecision:
    """A decision judged and applied, its record queued in the log and not yet durable:
    its ``outcome`` is there once the batch it was made in is left, not before."""

    answer: DecisionOutcome  # as judged, or as refused; given only once ``record`` is None
    record: DecisionRecord | None = None  # None: answered
    applied: Applied = field(default_factory=lambda: Applied(_UNAVAILABLE))
    queued: Queued | None = None  # the record to make durable before answering
    as_judged: bool = False  # False: the log refused the record, ``answer`` says so
    probe: bool = False
    claimed: bool = False  # its request id, kept or let go once answered
    acted: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    failed: Exception | None = None  # what answering it raised

    @property
    def outcome(self) -> DecisionOutcome:
        if self.failed is not None:
            raise self.failed
        if self.record is not None:
            raise RuntimeError("a decision read before the batch it was made in was left")
        return self.answer


def _printable(text: str) -> str:
    """``text`` with what UTF-8 cannot hold (lone surrogates) spelled as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _unloggable(record: DecisionRecord, refusal: Decision) -> DecisionRecord:
    """The refusal of a decision whose record has no canonical spelling, in a form that
    always has one: ids escaped, the action cut to its kind and target (both validated),
    and no reservation (it was released)."""
    acted = record.action
    return DecisionRecord(
        time=record.time,
        decision_id=record.decision_id,
        request_id=_printable(record.request_id),
        run_id=_printable(record.run_id),
        manifest_digest=record.manifest_digest,
        policy_digest=record.policy_digest,
        input={"action": {k: acted[k] for k in ("kind", "target") if k in acted}} if acted else {},
        result=refusal.as_dict(),
        reservation_id="",
        unloggable=True,
    )


class DecisionService:
    """Registers manifests and decides actions; servers adapt their protocol to this."""

    def __init__(
        self,
        bundle: PolicyBundle,
        trust: TrustStore,
        high_water: HighWater,
        metrics: PdpMetrics,
        log: DecisionLog,
        reservation_ttl: timedelta = timedelta(minutes=10),
        store: RunStore | None = None,
        run_retention: timedelta = timedelta(hours=1),
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.bundle = bundle
        self._log = log
        self._trust = trust
        self._high_water = high_water
        self._metrics = metrics
        self._ledger = Ledger(
            store if store is not None else MemoryRunStore(), log, reservation_ttl, run_retention
        )
        self._grants = Grants(bundle, trust, high_water, metrics, log, self._ledger)
        self._gate = StateGate()
        self._step_order = tuple(threading.Lock() for _ in range(64))  # striped by run id
        # A scrape is a door of its own: it reads the clock (``clock``), as a request does.
        metrics.watch_budgets(lambda: self._ledger.runs.lowest_remaining_ratio(clock()))

    def register_manifest(self, raw_envelope: bytes, now: datetime) -> Run:
        """Verify (signature, scope, window, pinned policy), admit the rollback mark,
        compile; or raise. Binds the grant's default run. Releases a few runs past their
        retention first, as StartRun does."""
        with self._gate.changing():
            self._sweep(now)
            return self._grants.register(raw_envelope, now)

    def start_run(
        self, manifest_digest: str, run_key: str, now: datetime, narrower: bytes = b""
    ) -> tuple[Run, bool]:
        """The run of ``run_key`` under a registered grant (narrowed by ``narrower``, JSON,
        if given), and whether this call started it. Runs ended longer than the retention
        ago are released first, a few per call: runs end about as fast as they start, so
        what is held stays about what is live."""
        with self._gate.changing():
            self._sweep(now)
            return self._grants.start(manifest_digest, run_key, now, narrower)

    # Deciding: claim the request id, judge, apply, record.

    def decide(
        self, run_id: str, request_id: str, action: Action, now: datetime, bound: str = ""
    ) -> DecisionOutcome:
        """Decide one validated action.

        A request id seen before for this run gets the answer it got then: the same
        decision id and reservation, never a second charge. ``bound``, the manifest digest
        the caller is bound to (its sidecar's), refuses a run of another grant.
        """
        with self.batch() as batch:
            held = batch.decide(run_id, request_id, action, now, bound)
        return held.outcome

    @contextmanager
    def batch(self, wait_for_claims: bool = True) -> Iterator[DecisionBatch]:
        """Decisions made one after another and made durable together, one commit for all:
        each is answered (``HeldDecision.outcome``) once the batch is left. The state gate
        is held throughout, so a snapshot never sees a decision judged and not answered.

        Not ``wait_for_claims``: a request id being decided elsewhere is refused at once
        (``pdp_unavailable``, "still under way") rather than waited for, so that it never
        holds up the decisions queued behind it (a sidecar's, on one connection)."""
        with self._gate.changing():
            batch = DecisionBatch(self, wait_for_claims)
            try:
                yield batch
            finally:
                batch.commit()

    def _hold(
        self,
        run_id: str,
        request_id: str,
        action: Action,
        now: datetime,
        bound: str,
        claiming: Claiming = "wait",
        waited: bool = False,
    ) -> HeldDecision:
        started = time.perf_counter()
        acted = action.policy_input()  # built once: logged, compared, judged, kept
        run: Run | None = None
        claimed = False
        try:
            run = self._grants.run(run_id, now, bound)
            # Before anything is claimed, reserved or moved: what cannot be logged exactly
            # is refused here, not found unloggable after the run's state changed.
            canonical_record_bytes(
                {"run_id": run_id, "request_id": request_id, "input": {"action": acted}}
            )
            prior = (
                None if action.probe else self._claim(run_id, request_id, acted, claiming, waited)
            )
            if prior is not None:
                return HeldDecision(
                    self._answered_before(run, request_id, action, acted, prior, now)
                )
            claimed = not action.probe
            judged = self._judge(run, action, acted, now)
        except ClaimInFlight:
            raise  # nothing held yet: the batch claims again once it holds no other
        except AbcError as exc:
            judged = _refused(exc, {"action": acted})
        except EngineError as exc:
            log.error("policy failed to decide for %s: %s", run_id, exc)
            judged = _refused(None, {"action": acted})
        except Exception:
            # A bug, not the caller's input: still refused and logged, never a bare RPC error.
            log.exception("a decision for run %s failed", run_id)
            judged = _refused(None, {"action": acted})
        try:
            held = self._queue_record(run_id, request_id, run, judged, now, action.probe)
        except BaseException:
            if claimed:  # nothing of it was logged: a retry decides it
                self._ledger.unclaim(run_id, request_id)
            raise
        held.claimed, held.acted, held.started = claimed, acted, started
        return held

    def _claim(
        self, run_id: str, request_id: str, acted: dict[str, Any], claiming: Claiming, waited: bool
    ) -> DecisionOutcome | None:
        try:
            return self._ledger.claim(run_id, request_id, acted, claiming == "wait", waited)
        except ClaimInFlight:
            if claiming == "try":
                raise
            raise StoreUnavailable("a decision for this request id is still under way") from None

    def _answer(self, held: HeldDecision) -> DecisionOutcome:
        """``held`` made durable and answered: as judged, or refused if the log lost it."""
        record = held.record
        if record is None:
            return held.answer  # answered already, or a retry's kept answer
        if held.queued is not None:
            try:
                self._log.sync(held.queued)
            except LogUnavailable as exc:
                log.error("decision log unwritable, refusing: %s", exc)
                held.answer = DecisionOutcome(_UNAVAILABLE, record.decision_id)
                judged, held.as_judged = held.as_judged, False
                try:
                    if judged:  # a refusal for the log's sake released it already
                        self._ledger.release(record.run_id, held.applied)
                except BaseException:
                    if held.claimed:  # never logged: a retry decides it
                        self._ledger.unclaim(record.run_id, record.request_id)
                    raise
        outcome = held.answer
        self._metrics.count_decision(
            outcome.decision.allow, outcome.reason, outcome.enforced, probe=held.probe
        )
        if held.claimed:
            kept = held.as_judged and outcome.reason is not ReasonCode.PDP_UNAVAILABLE
            if kept and not self._log.masks({"action": held.acted}):
                self._keep(record, held.acted, outcome)
            else:
                # A passing outage, or a record refused for its spelling: a retry decides
                # anew. So does one whose action holds a masked secret: a kept answer keeps
                # its action, in memory and in snapshots, and the log (which replay reads)
                # has it masked.
                self._ledger.unclaim(record.run_id, record.request_id)
        if held.started:  # judged here, not a refusal of what could not be judged
            self._metrics.decide_seconds.observe(time.perf_counter() - held.started)
        held.record = None
        return outcome

    def _keep(
        self, record: DecisionRecord, acted: dict[str, Any], outcome: DecisionOutcome
    ) -> None:
        try:
            self._ledger.keep(record.run_id, record.request_id, acted, outcome)
        except StoreUnavailable as exc:
            # Durable and charged: answered all the same. Its request id stays claimed, so a
            # retry is refused while the claim holds (for good in this process's store, for
            # the in-flight limit in Redis, as for a replica gone mid-decision).
            log.error("answer to %s not kept, its claim stays: %s", record.request_id, exc)

    def _answered_before(
        self,
        run: Run,
        request_id: str,
        action: Action,
        acted: dict[str, Any],
        prior: DecisionOutcome,
        now: datetime,
    ) -> DecisionOutcome:
        """The answer kept for a retried request id. An allow goes again only while the
        run may still act (a step's, which may have ended it, always): a retry after the
        run ended, expired or was revoked is refused as a new call would be, logged as a
        retry (the kept answer stays the request id's answer, live as after a restart)."""
        if not prior.forward or action.kind == "step":
            return prior
        try:
            run.check_running(self._ledger.state(run), now)
            return prior
        except AbcError as exc:
            judged = replace(_refused(exc, {"action": acted}), reused=True)
        return self._answer(self._queue_record(run.run_id, request_id, run, judged, now))

    def _judge(self, run: Run, action: Action, acted: dict[str, Any], now: datetime) -> _Judged:
        """The policy's verdict on the run as it stands, applied by the ledger if it goes
        ahead. Shadow mode lifts the policy's and the ledger's verdicts only: an unknown or
        closed run, a malformed action, a policy that cannot decide or an unwritable log
        still refuse."""
        self._ledger.expire(run.run_id, now)
        state = self._ledger.state(run)
        run.check_running(state, now)
        policy_input: dict[str, object] = {
            "action": acted,
            "run": {"step": state.step, "completed_steps": list(state.completed_steps)},
        }
        decision = run.policy.evaluate(policy_input)
        applied = Applied(decision)
        if not action.probe and (decision.allow or run.shadow):
            applied = self._ledger.apply(run, action, decision, state.step, now)
        return _Judged(applied, policy_input, decision.as_dict(), shadow=run.shadow)

    def refuse(
        self, run_id: str, request_id: str, error: AbcError, now: datetime, bound: str = ""
    ) -> DecisionOutcome:
        """Refuse a request a door could not make a valid action of, logged as a decision
        of its run (an unknown run is refused as such, a run of another grant than
        ``bound``'s as ``run_not_bound``, and logged under no run of that grant)."""
        with self.batch() as batch:
            held = batch.refuse(run_id, request_id, error, now, bound)
        return held.outcome

    def _hold_refusal(
        self, run_id: str, request_id: str, error: AbcError, now: datetime, bound: str
    ) -> HeldDecision:
        run: Run | None = None
        try:
            run = self._grants.run(run_id, now, bound)
        except AbcError as exc:
            error = exc
        return self._queue_record(run_id, request_id, run, _refused(error, {}), now)

    def _queue_record(
        self,
        run_id: str,
        request_id: str,
        run: Run | None,
        judged: _Judged,
        now: datetime,
        probe: bool = False,
    ) -> HeldDecision:
        """The decision's record queued for the next commit, its answer held until then
        (``_answer``); a refusal instead if the log cannot take the record. An unlogged
        decision is never given: what it reserved or moved is released."""
        applied = judged.applied
        record = DecisionRecord(
            time=now,
            decision_id="dec_" + uuid.uuid4().hex,
            request_id=request_id,
            run_id=run_id,
            manifest_digest=run.verified.digest if run else "",
            policy_digest=self.bundle.digest,
            input=judged.policy_input,
            result=applied.decision.as_dict(),
            reservation_id=applied.reservation_id,
            policy_result=judged.policy_result,
            cost=applied.cost.as_dict() if applied.cost is not None else None,
            expires=now + self._ledger.reservation_ttl if applied.cost is not None else None,
            step=StepChange(from_=applied.step[0], to=applied.step[1]) if applied.step else None,
            enforced=not judged.shadow,
            over_budget=applied.over_budget,
            reused_request_id=judged.reused,
        )
        held = HeldDecision(
            DecisionOutcome(
                applied.decision, record.decision_id, applied.reservation_id, not judged.shadow
            ),
            record,
            applied,
            probe=probe,
        )
        try:
            held.queued = self._log.queue(record)
            held.as_judged = True
        except BadRequest as exc:
            # The detail, not the record: the record is what could not be written safely.
            # It is refused as ``bad_request``, that refusal logged with the action cut to
            # its kind and target.
            log.warning("decision %s cannot be logged, refused: %s", record.decision_id, exc)
            self._ledger.release(record.run_id, applied)
            refusal = Decision.deny(ReasonCode.BAD_REQUEST, "the action cannot be logged exactly")
            held.answer = DecisionOutcome(refusal, record.decision_id)
            try:
                held.queued = self._log.queue(_unloggable(record, refusal))
            except (BadRequest, LogUnavailable) as again:
                log.error("decision log refused a refusal, answering unavailable: %s", again)
                held.answer = DecisionOutcome(_UNAVAILABLE, record.decision_id)
        except LogUnavailable as exc:
            log.error("decision log unwritable, refusing: %s", exc)
            self._ledger.release(record.run_id, applied)
            held.answer = DecisionOutcome(_UNAVAILABLE, record.decision_id)
        return held

    def record_refusal(
        self, run_id: str, request_id: str, route: str, reason: ReasonCode, message: str,
        now: datetime, bound: str = "",
    ) -> str:  # fmt: skip
        """Log a refusal the sidecar made itself (a request it could not map to an action)
        and return its decision id. ``BadRequest`` for a field outside its bounds;
        ``RunNotBound`` for a run of another grant than ``bound``'s (none is logged under
        it); ``LogUnavailable`` when the log cannot write (the sidecar keeps its own id)."""
        unavailable = reason is ReasonCode.PDP_UNAVAILABLE  # that one is the PDP's to say
        if route not in SIDECAR_ROUTES or len(message) > 200 or unavailable:
            raise BadRequest("a sidecar refusal names a route, a reason and a short message")
        run = self._ledger.runs.find(run_id) if run_id else None
        if run is not None:
            run.check_bound(bound)
        decision_id = "dec_" + uuid.uuid4().hex
        decision = Decision.deny(reason, message)
        self._log.append(
            DecisionRecord(
                time=now,
                decision_id=decision_id,
                request_id=request_id,
                run_id=run_id,
                manifest_digest=run.verified.digest if run else "",
                policy_digest=self.bundle.digest,
                # No action: the sidecar could not make one. The route says which door.
                input={"refused_by_sidecar": {"route": route}},
                result=decision.as_dict(),
                reservation_id="",
            )
        )
        self._metrics.count_decision(False, reason, True)
        return decision_id

    # Usage, runs, recovery

    def report_usage(
        self,
        reservation_id: str,
        tokens: int,
        usd_micros: int,
        now: datetime,
        bound: str = "",
    ) -> Queued | None:
        """Settle, once durable: the settlement's place in the log, None for an unknown or
        settled reservation or an impossible amount. ``RunNotBound`` for a reservation of
        a run of another grant than ``bound``'s. (``DecisionBatch.report_usage`` settles
        one to go with the batch's commit.)"""
        if self.unbound([reservation_id], bound, now):
            raise RunNotBound(
                f"reservation {reservation_id} holds budget of a run of another manifest than"
                f" the caller's {bound}"
            )
        with self._gate.changing():
            return self._ledger.settle(reservation_id, tokens, usd_micros, now)

    def sync(self, queued: Queued) -> None:
        """Return once ``queued`` is durable; ``LogUnavailable`` if it was lost."""
        self._log.sync(queued)

    def wait_written(self, queued: Queued, within: float) -> None:
        """Wait up to ``within`` seconds for another commit to make ``queued`` durable."""
        self._log.wait_written(queued, within)

    def unbound(self, reservation_ids: Sequence[str], bound: str, now: datetime) -> set[str]:
        """Those of ``reservation_ids`` holding budget of a run of another grant than the
        manifest ``bound`` ("" checks nothing)."""
        return self._grants.unbound(reservation_ids, bound, now)

    def get_run(self, run_id: str, now: datetime, bound: str = "") -> RunView:
        """The run's state. ``RunNotBound`` for a run of another grant than ``bound``'s."""
        run = self._grants.run(run_id, now, bound)
        state = self._ledger.state(run)
        books = self._ledger.books(run_id)
        return RunView(
            run_id=run.run_id,
            manifest_digest=run.verified.digest,
            step=state.step,
            completed_steps=state.completed_steps,
            status=run.status(state, now),
            spent=books.spent.as_dict(),
            remaining=books.remaining().as_dict(),
            reserved=books.reserved.as_dict(),
            run_key=run.run_key,
            effective_digest=run.effective_digest,
            fleet=self._fleet_view(run),
        )

    def _fleet_view(self, run: Run) -> FleetView | None:
        found = self._ledger.fleet_books(run)
        limits = run.verified.manifest.fleet
        if found is None or limits is None:
            return None
        books, holding = found
        open_ = tuple(name for name in BUDGETS if getattr(limits, name) is None)
        remaining = {
            name: 0 if name in open_ else left for name, left in books.remaining().as_dict().items()
        }
        return FleetView(
            spent=books.spent.as_dict(),
            reserved=books.reserved.as_dict(),
            remaining=remaining,
            open=open_,
            runs=holding,
            max_runs=limits.runs or 0,
        )

    def sweep(self, now: datetime, limit: int = 8) -> None:
        """Release runs past their retention (also done by each StartRun, a few at a time)."""
        with self._gate.changing():
            self._sweep(now, limit)

    def _sweep(self, now: datetime, limit: int = 8) -> None:
        for digest in self._ledger.sweep(now, limit):
            self._grants.forget(digest)

    def restore(self, record: Record, trust_now: datetime) -> None:
        """Apply one decision-log record to the state (start-up recovery).

        A registration is verified again, from the envelope it carries, as of ``trust_now``
        (when it was accepted); runs pinned to another policy bundle are left out.
        """
        if isinstance(record, RegistrationRecord | RunStartRecord):
            self._grants.restore(record, trust_now)
        elif isinstance(record, DecisionRecord | SettlementRecord):
            self._ledger.restore(record)
        # a refused registration names no run; a checkpoint changes nothing

    def export_state(self) -> tuple[LogPosition, dict[str, Any]]:
        """The live state and the log position it is the fold of, for a snapshot: taken
        with no change under way, so no decision is half applied."""
        with self._gate.alone():
            # Settlements queued to go with a decision that has not come: on disk first,
            # so that the state is exactly the fold of the log up to its position.
            self._log.flush()
            position = self._log.position()
            registry = self._ledger.runs.export_state()
            store = self._ledger.store.export_state()
        return position, {"registry": registry.as_json(), "store": store}

    def import_state(self, state: dict[str, Any]) -> None:
        """Put back a snapshot's state into this fresh service (start-up); ``ValueError``
        for a malformed one, leaving at most grants and runs opened afresh, which a full
        replay of the log opens the same way."""
        registry = RegistryState.from_json(state.get("registry"))
        self._grants.import_state(registry)
        self._ledger.store.import_state(state.get("store", {}), self._ledger.runs.ids())

    def close(self) -> None:
        self._ledger.store.close()


class DecisionBatch:
    """The decisions of one ``DecisionService.batch``: each judged and applied in turn on
    the state the ones before it left, its record queued; ``commit`` (also on leaving the
    batch) makes them durable with one fsync and answers them.

    A request id is claimed until its batch is answered, so a batch holding claims never
    waits for another's: a request id being decided elsewhere (or earlier in this batch)
    makes the batch answer what it holds first, then wait for it as a lone decision does
    (or, not ``wait_for_claims``, refuse it).
    """

    def __init__(self, service: DecisionService, wait_for_claims: bool = True) -> None:
        self._service = service
        self._claiming: Claiming = "wait" if wait_for_claims else "refuse"
        self._held: list[HeldDecision] = []
        self._claims = 0  # of those held

    def decide(
        self, run_id: str, request_id: str, action: Action, now: datetime, bound: str = ""
    ) -> HeldDecision:
        """``DecisionService.decide``'s decision, answered when the batch is left."""
        if action.kind != "step" or action.probe:
            held = self._hold(run_id, request_id, action, now, bound)
            self._held.append(held)
            self._claims += held.claimed
            return held
        # A run's step changes are logged in the order they are made, or replay (which
        # moves a step only from the one it was seen at) would drop one: the second of two
        # waits until the first is durable. Steps are few; calls never wait here. What this
        # batch holds is answered first: a batch holding claims never waits for this lock,
        # so the claim waited for under it is always let go.
        self.commit()
        service = self._service
        with service._step_order[hash(run_id) % len(service._step_order)]:
            held = service._hold(run_id, request_id, action, now, bound, self._claiming)
            self._answer(held)
        return held

    def _hold(
        self, run_id: str, request_id: str, action: Action, now: datetime, bound: str
    ) -> HeldDecision:
        service = self._service
        try:
            claiming: Claiming = "try" if self._claims else self._claiming
            return service._hold(run_id, request_id, action, now, bound, claiming)
        except ClaimInFlight:
            self.commit()
            return service._hold(run_id, request_id, action, now, bound, self._claiming, True)

    def refuse(
        self, run_id: str, request_id: str, error: AbcError, now: datetime, bound: str = ""
    ) -> HeldDecision:
        """``DecisionService.refuse``'s refusal, answered when the batch is left."""
        held = self._service._hold_refusal(run_id, request_id, error, now, bound)
        self._held.append(held)
        return held

    def report_usage(
        self, reservation_id: str, tokens: int, usd_micros: int, now: datetime
    ) -> Queued | None:
        """``DecisionService.report_usage``, its record queued to go with the next commit
        (the batch's, or any); the caller has checked whose reservation it is. Say it was
        settled only once ``DecisionService.sync`` returned for it."""
        return self._service._ledger.settle(reservation_id, tokens, usd_micros, now, wait=False)

    def commit(self) -> None:
        """Make every decision held so far durable (one commit takes them all) and answer
        each: as judged, or refused if the log lost it."""
        held, self._held, self._claims = self._held, [], 0
        for each in held:
            self._answer(each)

    def _answer(self, held: HeldDecision) -> None:
        try:
            self._service._answer(held)
        except Exception as exc:  # that one fails as a lone decision would; the rest go on
            held.failed = exc
