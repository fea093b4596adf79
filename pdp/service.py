"""The one decision path behind every front door (gRPC today; REST and ext_authz later).

Each call takes ``now`` from its caller (one clock read per request) and turns every
``AbcError`` into a refusal with its reason code; only the engine's own failures are
logged as errors, and they deny too (fail closed).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pdp.action import Action
from pdp.bundle import PolicyBundle
from pdp.decisionlog import DecisionLog
from pdp.engine import Decision, EngineError, PreparedPolicy, policy_data
from pdp.errors import AbcError, ManifestExpired, ReasonCode
from pdp.manifest import HighWater, TrustStore, VerifiedManifest, verify_envelope
from pdp.metrics import PdpMetrics
from pdp.runs import Run, RunRegistry, cost_of

__all__ = ["DecisionOutcome", "DecisionService", "RunView"]

log = logging.getLogger("abc.pdp")


@dataclass(frozen=True)
class DecisionOutcome:
    decision: Decision
    decision_id: str
    reservation_id: str = ""

    @property
    def reason(self) -> ReasonCode | None:
        return self.decision.reasons[0].code if self.decision.reasons else None


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
    ) -> None:
        self.bundle = bundle
        self._log = log
        self._trust = trust
        self._high_water = high_water
        self._metrics = metrics
        self._runs = RunRegistry()
        self._modules = bundle.rego_modules()
        metrics.watch_budgets(self._runs.lowest_remaining_ratio)

    def register_manifest(self, raw_envelope: bytes, now: datetime) -> Run:
        """Verify (signature, scope, window, pinned policy, rollback mark), compile; or raise."""
        try:
            verified = verify_envelope(
                raw_envelope,
                self._trust,
                now,
                self._high_water,
                expected_policy=self.bundle.digest,
            )
        except AbcError as exc:
            self._metrics.manifests_rejected.labels(exc.reason.value).inc()
            log.warning("manifest refused: %s: %s", exc.reason.value, exc)
            self._log.append(
                "registration",
                {
                    "result": {"accepted": False, "reason": exc.reason.value, "detail": str(exc)},
                    "policy_digest": self.bundle.digest,
                },
            )
            raise
        run = self._runs.register(verified, self._prepare(verified))
        self._log.append(
            "registration",
            {
                "result": {"accepted": True},
                "run_id": run.run_id,
                "manifest_digest": verified.digest,
                "policy_digest": self.bundle.digest,
                "lineage": verified.manifest.metadata.lineage,
                "version": verified.manifest.metadata.version,
                "signer": verified.signer,
            },
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
        """Decide one action. ``build_action`` returns the validated ``Action`` or raises."""
        started = time.perf_counter()
        decision_id = "dec_" + uuid.uuid4().hex
        reservation_id = ""
        run: Run | None = None
        policy_input: dict[str, object] = {}
        try:
            run = self._runs.get(run_id)
            action: Action = build_action()
            status = run.status(now)
            if status != "running":
                raise ManifestExpired(f"the run is {status}: its manifest no longer holds")
            seen_step = run.step
            policy_input = run.policy_input(action)
            decision = self._evaluate(run, policy_input)
            if decision.allow and not action.probe:
                decision, reservation_id = self._commit(run, action, decision, seen_step)
        except AbcError as exc:
            decision = Decision.deny(exc.reason, str(exc))
        try:
            # Durable before the answer leaves: an unlogged decision is never given.
            self._log.append(
                "decision",
                {
                    "decision_id": decision_id,
                    "request_id": request_id,
                    "run_id": run_id,
                    "manifest_digest": run.verified.digest if run else "",
                    "policy_digest": self.bundle.digest,
                    "input": policy_input,
                    "result": {
                        "allow": decision.allow,
                        "reasons": [
                            {"code": r.code.value, "message": r.message} for r in decision.reasons
                        ],
                        "obligations": decision.obligations,
                    },
                    "reservation_id": reservation_id,
                },
            )
        except (OSError, RuntimeError) as exc:
            log.error("decision log unwritable, refusing: %s", exc)
            decision, reservation_id = (
                Decision.deny(ReasonCode.PDP_UNAVAILABLE, "decision log unavailable"),
                "",
            )
        outcome = DecisionOutcome(decision, decision_id, reservation_id)
        self._metrics.count_decision(decision.allow, outcome.reason)
        self._metrics.decide_seconds.observe(time.perf_counter() - started)
        return outcome

    def _evaluate(self, run: Run, policy_input: dict[str, object]) -> Decision:
        try:
            return run.policy.evaluate(policy_input)
        except EngineError as exc:
            log.error("policy failed to decide for %s: %s", run.run_id, exc)
            return Decision.deny(ReasonCode.PDP_UNAVAILABLE, "the policy could not decide")

    def _commit(
        self, run: Run, action: Action, decision: Decision, seen_step: str
    ) -> tuple[Decision, str]:
        """Apply an allow: reserve its worst-case cost, or move the run to the next step."""
        if action.kind == "step":
            target = action.target.removeprefix("step:")
            if not self._runs.enter_step(run, target, seen_step):
                return Decision.deny(
                    ReasonCode.STEP_OUT_OF_ORDER, "the run changed step while deciding"
                ), ""
            return decision, ""
        cost = cost_of(action, decision)
        reservation_id = self._runs.reserve(run, cost)
        if reservation_id is None:
            return Decision.deny(
                ReasonCode.BUDGET_EXHAUSTED, "the run's remaining budget cannot hold this action"
            ), ""
        return decision, reservation_id

    def report_usage(self, reservation_id: str, tokens: int, usd_micros: int) -> bool:
        if tokens < 0 or usd_micros < 0:
            return False
        run = self._runs.settle(reservation_id, tokens, usd_micros)
        if run is None:
            return False
        self._log.append(
            "settlement",
            {
                "run_id": run.run_id,
                "reservation_id": reservation_id,
                "tokens": tokens,
                "usd_micros": usd_micros,
            },
        )
        return True

    def get_run(self, run_id: str, now: datetime) -> RunView:
        run = self._runs.get(run_id)
        with self._runs.lock:
            return RunView(
                run_id=run.run_id,
                manifest_digest=run.verified.digest,
                step=run.step,
                completed_steps=tuple(run.completed_steps),
                status=run.status(now),
                spent=run.ledger.spent.as_dict(),
                remaining=run.ledger.remaining().as_dict(),
            )
