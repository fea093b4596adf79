"""The one decision path behind every front door (gRPC today; REST and ext_authz later).

Each call takes ``now`` from its caller (one clock read per request) and turns every
``AbcError`` into a refusal with its reason code; only the engine's own failures are
logged as errors, and they deny too (fail closed).
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pdp.action import Action
from pdp.bundle import PolicyBundle
from pdp.decisionlog import (
    DecisionLog,
    DecisionRecord,
    Record,
    RegistrationRecord,
    RegistrationRefusedRecord,
    SettlementRecord,
    StepChange,
)
from pdp.engine import Decision, EngineError, PreparedPolicy, Reason, policy_data
from pdp.errors import (
    AbcError,
    BadRequest,
    LogUnavailable,
    ManifestExpired,
    ManifestUnknown,
    ReasonCode,
    RunClosed,
)
from pdp.manifest import (
    HighWater,
    TrustStore,
    VerificationPolicy,
    VerifiedManifest,
    admit_rollback_mark,
    verify_envelope,
)
from pdp.manifest.canonical import canonical_record_bytes
from pdp.metrics import PdpMetrics
from pdp.runs import Run, RunRegistry, cost_of
from pdp.runstore import MemoryRunStore, RunState, RunStore, Usage

__all__ = ["DecisionOutcome", "DecisionService", "RunView"]

log = logging.getLogger("abc.pdp")

# The sidecar's routes, the doors its own refusals come through.
SIDECAR_ROUTES = frozenset({"openai", "anthropic", "mcp", "http"})

# The most one report may settle: exact in JSON (2^53) and far below what would overflow a
# Redis counter however often it is reported.
MAX_REPORTED = 2**40


@dataclass(frozen=True)
class DecisionOutcome:
    decision: Decision  # for a shadow run, what enforcing would have answered
    decision_id: str
    reservation_id: str = ""
    enforced: bool = True

    @property
    def forward(self) -> bool:
        """Whether the caller may go ahead: always, in shadow mode."""
        return self.decision.allow or not self.enforced

    @property
    def reason(self) -> ReasonCode | None:
        return self.decision.reasons[0].code if self.decision.reasons else None


@dataclass
class _Commit:
    """What deciding changed: the decision, and the reservation or step change it made."""

    decision: Decision = field(
        default_factory=lambda: Decision.deny(ReasonCode.BAD_REQUEST, "not decided")
    )
    reservation_id: str = ""
    cost: Usage | None = None
    step: tuple[str, str] | None = None
    over_budget: bool = False  # a shadow run spent past a budget


def _stored(
    action: dict[str, Any],
    decision_id: str,
    reservation_id: str,
    enforced: bool,
    result: dict[str, Any],
) -> dict[str, Any]:
    """The answer kept for a request id: what a retry gets back, live or after a restart."""
    return {
        "action": action,
        "decision_id": decision_id,
        "reservation_id": reservation_id,
        "enforced": enforced,
        **result,
    }


def _outcome(stored: dict[str, Any]) -> DecisionOutcome:
    decision = Decision(
        bool(stored["allow"]),
        tuple(
            Reason(ReasonCode(r["code"]), r["message"], r.get("evidence", {}))
            for r in stored["reasons"]
        ),
        dict(stored["obligations"]),
    )
    return DecisionOutcome(
        decision, stored["decision_id"], stored["reservation_id"], stored.get("enforced", True)
    )


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


@dataclass(frozen=True)
class RunView:
    run_id: str
    manifest_digest: str
    step: str
    completed_steps: tuple[str, ...]
    status: str
    spent: dict[str, int] = field(default_factory=dict)
    remaining: dict[str, int] = field(default_factory=dict)


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
    ) -> None:
        self.bundle = bundle
        self._log = log
        self._reservation_ttl = reservation_ttl
        self._trust = trust
        self._high_water = high_water
        self._metrics = metrics
        self._store: RunStore = store if store is not None else MemoryRunStore()
        self._runs = RunRegistry(self._store)
        self._modules = bundle.rego_modules()
        self._verification = VerificationPolicy.registration(bundle.digest)
        metrics.watch_budgets(self._runs.lowest_remaining_ratio)

    def register_manifest(self, raw_envelope: bytes, now: datetime) -> Run:
        """Verify (signature, scope, window, pinned policy), admit the rollback mark,
        compile; or raise."""
        try:
            verified = verify_envelope(raw_envelope, self._trust, now, self._verification)
            admit_rollback_mark(verified, self._high_water)
        except AbcError as exc:
            self._metrics.manifests_rejected.labels(exc.reason.value).inc()
            log.warning("manifest refused: %s: %s", exc.reason.value, exc)
            self._log.append(
                RegistrationRefusedRecord(
                    time=now, policy_digest=self.bundle.digest, reason=exc.reason, detail=str(exc)
                )
            )
            raise
        run = self._runs.register(verified, self._prepare(verified))
        self._store.put_envelope(run.run_id, raw_envelope)
        self._log.append(
            RegistrationRecord(
                time=now,
                run_id=run.run_id,
                manifest_digest=verified.digest,
                policy_digest=self.bundle.digest,
                lineage=verified.manifest.metadata.lineage,
                version=verified.manifest.metadata.version,
                signer=verified.signer,
                # The envelope itself, so a restarted PDP can verify and rebuild the run.
                envelope=base64.b64encode(raw_envelope).decode("ascii"),
            )
        )
        self._metrics.manifests_registered.inc()
        log.info("manifest %s registered as %s", verified.digest, run.run_id)
        return run

    def _prepare(self, verified: VerifiedManifest) -> PreparedPolicy:
        try:
            return PreparedPolicy(
                self._modules,
                policy_data(verified.manifest),
                self.bundle.digest,
                verified.digest,
            )
        except EngineError as exc:
            # The bundle compiled at start-up; failing now is the PDP's fault, not the caller's.
            log.error("policy does not compile with manifest %s: %s", verified.digest, exc)
            raise

    def decide(
        self, run_id: str, request_id: str, build_action: Any, now: datetime
    ) -> DecisionOutcome:
        """Decide one action. ``build_action`` returns the validated ``Action`` or raises.

        A request id seen before for this run gets the answer it got then: the same
        decision id and reservation, never a second charge.
        """
        started = time.perf_counter()
        decision_id = "dec_" + uuid.uuid4().hex
        commit = _Commit()
        policy_result: dict[str, Any] | None = None  # what the policy said, before the ledger
        run: Run | None = None
        claimed = shadow = reused = False
        policy_input: dict[str, object] = {}
        acted: dict[str, Any] = {}
        try:
            run = self._run(run_id, now)
            action: Action = build_action()
            acted = action.policy_input()  # built once: logged, compared, judged, kept
            policy_input = {"action": acted}  # logged even if refused early
            # Before anything is claimed, reserved or moved: what cannot be logged exactly
            # is refused here, not found unloggable after the run's state changed.
            canonical_record_bytes(
                {"run_id": run_id, "request_id": request_id, "input": policy_input}
            )
            if not action.probe:
                prior = self._store.claim(run_id, request_id)
                if prior is not None:
                    if prior.get("action") != acted:
                        reused = True  # logged, but the first answer stays the answer
                        raise BadRequest("request id already used for another action")
                    return _outcome(prior)
                claimed = True
            self._expire(run, now)
            state = self._store.state(run_id, run.lineage)
            _check_running(run, state, now)
            seen_step = state.step
            policy_input = {
                "action": acted,
                "run": {"step": state.step, "completed_steps": list(state.completed_steps)},
            }
            commit.decision = self._evaluate(run, policy_input)
            policy_result = commit.decision.as_dict()
            # Shadow mode lifts the policy's and the ledger's verdicts only: an unknown or
            # closed run, a malformed action or an unwritable log still refuse.
            shadow = run.shadow
            # A shadow run goes ahead whatever the policy said: apply it, keep the verdict.
            if not action.probe and (commit.decision.allow or run.shadow):
                commit = self._commit(run, action, commit.decision, seen_step, now)
        except AbcError as exc:
            commit = _Commit(Decision.deny(exc.reason, str(exc)))
            shadow = False  # shadow lifts the policy's and the ledger's verdicts, no other
        except Exception:
            # A bug, not the caller's input: still refused and logged, never a bare RPC error.
            log.exception("decision %s failed", decision_id)
            commit = _Commit(Decision.deny(ReasonCode.PDP_UNAVAILABLE, "the PDP failed to decide"))
            shadow = False
        decision = commit.decision
        record = DecisionRecord(
            time=now,
            decision_id=decision_id,
            request_id=request_id,
            run_id=run_id,
            manifest_digest=run.verified.digest if run else "",
            policy_digest=self.bundle.digest,
            input=policy_input,
            result=decision.as_dict(),
            reservation_id=commit.reservation_id,
            policy_result=policy_result,  # what `abcctl replay` re-decides
            cost=commit.cost.as_dict() if commit.cost is not None else None,
            expires=now + self._reservation_ttl if commit.cost is not None else None,
            step=StepChange(from_=commit.step[0], to=commit.step[1]) if commit.step else None,
            enforced=not shadow,
            over_budget=commit.over_budget,
            reused_request_id=reused,
        )
        logged = self._log_decision(record, commit)
        if logged is not commit:
            commit, shadow = logged, False
            decision = commit.decision
        outcome = DecisionOutcome(decision, decision_id, commit.reservation_id, not shadow)
        if claimed and (outcome.reason is ReasonCode.PDP_UNAVAILABLE or logged is not commit):
            # A passing outage, or a record refused for its spelling: a retry decides anew.
            self._store.unclaim(run_id, request_id)
        elif claimed:
            kept = _stored(
                acted,
                decision_id,
                outcome.reservation_id,
                outcome.enforced,
                decision.as_dict(),
            )
            self._store.answer(run_id, request_id, kept)
        self._metrics.count_decision(
            decision.allow, outcome.reason, not shadow, probe=bool(acted.get("probe"))
        )
        self._metrics.decide_seconds.observe(time.perf_counter() - started)
        return outcome

    def _log_decision(self, record: DecisionRecord, commit: _Commit) -> _Commit:
        """Make ``record`` durable before its answer leaves; ``commit`` if it was.

        Otherwise what ``commit`` reserved is released, and the answer is a refusal: for a
        record that has no canonical spelling (a number or string no JSON reader would read
        back as sent), ``bad_request``, itself logged with the action cut to its kind and
        target; for a log that cannot write, ``pdp_unavailable`` (the log's health reports
        it). An unlogged decision is never given.
        """
        try:
            self._log.append(record)
            return commit
        except BadRequest as exc:
            # The detail, not the record: the record is what could not be written safely.
            log.warning("decision %s cannot be logged, refused: %s", record.decision_id, exc)
            self._release(commit)
            refusal = _Commit(
                Decision.deny(ReasonCode.BAD_REQUEST, "the action cannot be logged exactly")
            )
            try:
                self._log.append(_unloggable(record, refusal.decision))
                return refusal
            except (BadRequest, LogUnavailable) as again:
                log.error("decision log refused a refusal, answering unavailable: %s", again)
        except LogUnavailable as exc:
            log.error("decision log unwritable, refusing: %s", exc)
            self._release(commit)
        return _Commit(Decision.deny(ReasonCode.PDP_UNAVAILABLE, "decision log unavailable"))

    def _release(self, commit: _Commit) -> None:
        # A step change carries no agent text and is checked loggable before it is made;
        # only a reservation can be left to undo.
        if commit.reservation_id:
            self._store.release(commit.reservation_id)

    def _expire(self, run: Run, now: datetime) -> None:
        """Settle the run's reservations that were never reported, at their worst case."""
        for reservation_id, cost in self._store.expire(run.run_id, now):
            try:
                self._log.append(
                    SettlementRecord(
                        time=now,
                        run_id=run.run_id,
                        reservation_id=reservation_id,
                        tokens=cost.tokens,
                        usd_micros=cost.usd_micros,
                        expired=True,
                    )
                )
            except LogUnavailable:
                log.error("decision log unwritable, refusing the run's decisions")
                raise

    def _evaluate(self, run: Run, policy_input: dict[str, object]) -> Decision:
        try:
            return run.policy.evaluate(policy_input)
        except EngineError as exc:
            log.error("policy failed to decide for %s: %s", run.run_id, exc)
            return Decision.deny(ReasonCode.PDP_UNAVAILABLE, "the policy could not decide")

    def _commit(
        self, run: Run, action: Action, decision: Decision, seen_step: str, now: datetime
    ) -> _Commit:
        """Apply what goes ahead: reserve its worst-case cost, or move the run's step.

        For a shadow run this also applies what the policy refused (the call is forwarded
        all the same): the verdict stays, budgets are charged past their limits and the
        over-spend recorded, a step in the Assembly is entered out of order.
        """
        if action.kind == "step":
            target = action.target.removeprefix("step:")
            if not run.has_step(target):
                return _Commit(decision)  # shadow: nothing to enter
            if not self._move(run.run_id, seen_step, target):
                return _Commit(
                    Decision.deny(
                        ReasonCode.STEP_OUT_OF_ORDER, "the run changed step while deciding"
                    )
                )
            return _Commit(decision, step=(seen_step, target))
        cost = cost_of(action, decision)
        reservation_id = "rsv_" + uuid.uuid4().hex
        expires = now + self._reservation_ttl
        if self._store.reserve(run.run_id, reservation_id, cost, expires, force=run.shadow):
            return _Commit(decision, reservation_id, cost)
        books = self._store.books(run.run_id)
        refusal = Decision.deny(
            ReasonCode.BUDGET_EXHAUSTED,
            "the run's remaining budget cannot hold this action",
            {"cost": cost.as_dict(), "remaining": books.remaining().as_dict()},
        )
        if not run.shadow:
            return _Commit(refusal)
        verdict = refusal if decision.allow else decision
        return _Commit(verdict, reservation_id, cost, over_budget=True)

    def report_usage(
        self, reservation_id: str, tokens: int, usd_micros: int, now: datetime
    ) -> bool:
        """Settle; False for an unknown or settled reservation or an impossible amount.
        ``StoreUnavailable`` when the run store cannot be reached (the caller retries)."""
        if not (0 <= tokens <= MAX_REPORTED and 0 <= usd_micros <= MAX_REPORTED):
            return False
        run_id = self._store.settle(reservation_id, tokens, usd_micros)
        if run_id is None:
            return False
        self._log.append(
            SettlementRecord(
                time=now,
                run_id=run_id,
                reservation_id=reservation_id,
                tokens=tokens,
                usd_micros=usd_micros,
            )
        )
        return True

    def record_refusal(
        self, run_id: str, request_id: str, route: str, reason: ReasonCode, message: str,
        now: datetime,
    ) -> str:  # fmt: skip
        """Log a refusal the sidecar made itself (a request it could not map to an action)
        and return its decision id. ``BadRequest`` for a field outside its bounds;
        ``LogUnavailable`` when the log cannot write (the sidecar keeps its own id)."""
        unavailable = reason is ReasonCode.PDP_UNAVAILABLE  # that one is the PDP's to say
        if route not in SIDECAR_ROUTES or len(message) > 200 or unavailable:
            raise BadRequest("a sidecar refusal names a route, a reason and a short message")
        run = self._runs.find(run_id) if run_id else None
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

    def restore(self, record: Record, trust_now: datetime) -> None:
        """Apply one decision-log record to the state (start-up recovery).

        A registration is verified again, from the envelope it carries, as of ``trust_now``
        (when it was accepted); runs pinned to another policy bundle are left out. A shared
        store (Redis) is its own record of steps, budgets and answers: only the runs are
        rebuilt, so nothing is applied twice.
        """
        if isinstance(record, RegistrationRecord):
            self._load(record.run_id, base64.b64decode(record.envelope), trust_now)
            return
        if not isinstance(record, (DecisionRecord, SettlementRecord)):
            return  # a refused registration names no run; a checkpoint changes nothing
        store = self._store
        run_id = record.run_id
        if store.shared or not run_id or self._runs.find(run_id) is None:
            return
        if isinstance(record, SettlementRecord):
            store.settle(record.reservation_id, record.tokens, record.usd_micros)
            return
        if record.cost is not None and record.expires is not None:
            # Held as made (forced: it was within budget, or a shadow run's, then).
            store.reserve(
                run_id, record.reservation_id, Usage(**record.cost), record.expires, force=True
            )
        if record.step is not None:
            self._move(run_id, record.step.from_, record.step.to)
        acted = record.action
        answered = (
            acted
            and not acted.get("probe")
            and record.request_id
            and not record.reused_request_id  # the first answer stays the answer
            and [r["code"] for r in record.result["reasons"][:1]] != ["pdp_unavailable"]
            and not record.unloggable  # never kept live either: a retry decides
        )
        if answered:
            kept = _stored(
                acted,
                record.decision_id,
                record.reservation_id,
                record.enforced,
                record.result,
            )
            store.answer(run_id, record.request_id, kept)

    def _load(self, run_id: str, raw: bytes, trust_now: datetime) -> Run | None:
        """Verify a registered envelope again and compile its run; None if it fails now.

        Registration's rules without its rollback mark: the run was admitted when
        registered, and a newer version of its lineage shows in its status (revoked) instead.
        """
        try:
            verified = verify_envelope(raw, self._trust, trust_now, self._verification)
        except AbcError as exc:
            log.warning("run %s not loaded: %s: %s", run_id, exc.reason.value, exc)
            return None
        return self._runs.register(verified, self._prepare(verified))

    def _run(self, run_id: str, now: datetime) -> Run:
        """The run, compiled here; one registered on another replica is loaded from the
        shared store's copy of its envelope, verified by this replica's own trust store."""
        run = self._runs.find(run_id)
        if run is None:
            raw = self._store.envelope(run_id)
            if raw is not None:
                run = self._load(run_id, raw, now)
        if run is None or run.run_id != run_id:
            raise ManifestUnknown("no run with this id")
        return run

    def _move(self, run_id: str, seen_step: str, target: str) -> bool:
        """Enter step ``target``, or end the run for an "@completed" / "@failed" target."""
        if target.startswith("@"):
            return self._store.move(run_id, seen_step, seen_step, target[1:])
        return self._store.move(run_id, seen_step, target)

    def get_run(self, run_id: str, now: datetime) -> RunView:
        run = self._run(run_id, now)
        state = self._store.state(run_id, run.lineage)
        books = self._store.books(run_id)
        return RunView(
            run_id=run.run_id,
            manifest_digest=run.verified.digest,
            step=state.step,
            completed_steps=state.completed_steps,
            status=run.status(state, now),
            spent=books.spent.as_dict(),
            remaining=books.remaining().as_dict(),
        )

    def close(self) -> None:
        self._store.close()


def _check_running(run: Run, state: RunState, now: datetime) -> None:
    status = run.status(state, now)
    if status == "running":
        return
    manifest = run.verified.manifest
    if status == "pending":
        raise ManifestExpired(f"the run is pending until {manifest.metadata.not_before}")
    if status == "expired":
        raise ManifestExpired(f"the run expired at {manifest.metadata.expires_at}")
    if status == "revoked":
        raise RunClosed(f"the run is revoked: version {state.latest_version} superseded it")
    raise RunClosed(f"the run is {status}")
