"""Runs: one per manifest. Each process keeps the verified manifest and its compiled
policy; the run's mutable state (step, outcome, budgets, answers) lives in a run store
(``pdp/runstore``), in this process or shared by several replicas.

Status, in order: an ended run stays ended (completed, failed, revoked); a run whose
lineage has a newer registered version is revoked; before its window it is pending,
after it expired; otherwise running.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from datetime import datetime

from pdp.action import Action
from pdp.api.cost import worst_case_tokens
from pdp.engine import Decision, PreparedPolicy
from pdp.errors import StoreUnavailable
from pdp.manifest import VerifiedManifest, mark_lineage
from pdp.runstore import BUDGETS, RunState, RunStore, Usage

__all__ = ["Run", "RunRegistry", "cost_of", "run_id_for"]


def run_id_for(manifest_digest: str) -> str:
    """One manifest, one run: registering the same manifest again never resets its budget."""
    return "run_" + manifest_digest.removeprefix("sha256:")[:32]


@dataclass(frozen=True)
class Run:
    run_id: str
    verified: VerifiedManifest
    policy: PreparedPolicy

    @property
    def lineage(self) -> str:
        return mark_lineage(self.verified.manifest)

    @property
    def shadow(self) -> bool:
        """Decided and logged like any run, but nothing is refused."""
        return self.verified.manifest.enforcement == "shadow"

    def has_step(self, target: str) -> bool:
        """A step of the Assembly, or one of the endings."""
        steps = self.verified.manifest.assembly.steps
        return target in ("@completed", "@failed") or any(s.id == target for s in steps)

    def status(self, state: RunState, now: datetime) -> str:
        if state.outcome:
            return state.outcome
        manifest = self.verified.manifest
        if state.latest_version > manifest.metadata.version:
            return "revoked"
        if now < manifest.not_before:
            return "pending"
        return "running" if now < manifest.expires_at else "expired"


def cost_of(action: Action, decision: Decision) -> Usage:
    """The worst case an allowed action may spend, reserved before it is forwarded."""
    if action.kind == "model":
        # Settled with real usage; the PEP settles unread usage with the same formula.
        tokens = worst_case_tokens(decision.obligations, action.max_tokens, action.input_bytes)
        return Usage(tokens=tokens, requests=1)
    if action.kind == "tool":
        return Usage(tool_calls=1, requests=1)
    if action.kind in ("http", "resource", "prompt"):
        return Usage(requests=1)
    return Usage()


class RunRegistry:
    """The runs this process has verified and compiled, over one run store."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}

    def register(self, verified: VerifiedManifest, policy: PreparedPolicy) -> Run:
        run_id = run_id_for(verified.digest)
        with self._lock:
            existing = self._runs.get(run_id)
            if existing is not None:
                return existing
            manifest = verified.manifest
            run = Run(run_id, verified, policy)
            self.store.open(
                run_id,
                manifest.assembly.steps[0].id,
                Usage(**manifest.budgets.model_dump()),
                run.lineage,
                manifest.metadata.version,
            )
            self._runs[run_id] = run
            return run

    def find(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    def lowest_remaining_ratio(self) -> dict[str, float]:
        with self._lock:
            runs = list(self._runs.values())
        try:
            ratios = [self.store.books(run.run_id).remaining_ratio() for run in runs]
        except StoreUnavailable:
            # Unknown is not "full": a scrape during an outage shows no number at all.
            return dict.fromkeys(BUDGETS, math.nan)
        return {name: min((r[name] for r in ratios), default=1.0) for name in BUDGETS}
