"""Runs: executions of a grant (a registered manifest). Registering a manifest binds its
default run (run key ""); ``StartRun`` starts one more per run key (the agent's task id),
each with its own step, budgets and answers. Each process keeps the verified manifest and
its compiled policy once per grant; a run's mutable state (step, outcome, budgets,
answers) lives in a run store (``store.py``: in this process, or in Redis shared by
several replicas).

Status, in order: an ended run stays ended (completed, failed, revoked); a run whose
lineage has a newer registered version is revoked; before its window it is pending,
after it expired; otherwise running.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from dataclasses import dataclass
from datetime import datetime

from pdp.engine import PreparedPolicy
from pdp.errors import BadRequest, ManifestExpired, RunClosed, RunKeyConflict, StoreUnavailable
from pdp.ledger.store import BUDGETS, RunState, RunStore, Usage
from pdp.manifest import VerifiedManifest, mark_lineage
from pdp.manifest.model import Manifest
from pdp.manifest.narrow import Narrowed

__all__ = ["Run", "RunRegistry", "check_run_key", "run_id_for"]

# A task id as agents make them (UUIDs, "thread_abc", "job:42"): safe in headers and logs.
_RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


def check_run_key(run_key: str) -> str:
    if not _RUN_KEY.fullmatch(run_key):
        raise BadRequest(
            "a run key is 1 to 128 of A-Z a-z 0-9 . _ : @ - and starts with a letter or digit"
        )
    return run_key


def run_id_for(manifest_digest: str, run_key: str = "") -> str:
    """The run of ``run_key`` under a grant, the same on every replica. The default run
    (key "") keeps the id it had when one manifest was one run, so old logs still apply."""
    if not run_key:
        return "run_" + manifest_digest.removeprefix("sha256:")[:32]
    named = hashlib.sha256(f"{manifest_digest}\n{run_key}".encode()).hexdigest()
    return "run_" + named[:32]


@dataclass(frozen=True)
class Run:
    run_id: str
    verified: VerifiedManifest
    policy: PreparedPolicy
    run_key: str = ""  # "" for the grant's default run
    # The run's effective grant when it was started narrower than its manifest (its own
    # compiled ``policy`` then judges by it); None for a run of the grant as signed.
    narrowed: Narrowed | None = None

    @property
    def manifest(self) -> Manifest:
        """What the run is judged by: its narrowed grant, or the signed manifest."""
        return self.narrowed.manifest if self.narrowed else self.verified.manifest

    @property
    def effective_digest(self) -> str:
        """The digest of the run's effective grant: the narrowed one's, or the manifest's."""
        return self.narrowed.digest if self.narrowed else self.verified.digest

    @property
    def lineage(self) -> str:
        return mark_lineage(self.verified.manifest)

    @property
    def shadow(self) -> bool:
        """Decided and logged like any run, but nothing is refused."""
        return self.manifest.enforcement == "shadow"

    def has_step(self, target: str) -> bool:
        """A step of the Assembly, or one of the endings."""
        steps = self.manifest.assembly.steps
        return target in ("@completed", "@failed") or any(s.id == target for s in steps)

    def status(self, state: RunState, now: datetime) -> str:
        if state.outcome:
            return state.outcome
        manifest = self.manifest
        if state.latest_version > manifest.metadata.version:
            return "revoked"
        if now < manifest.not_before:
            return "pending"
        return "running" if now < manifest.expires_at else "expired"

    def check_running(self, state: RunState, now: datetime) -> None:
        """Raise the reason a run that is not running decides nothing."""
        status = self.status(state, now)
        if status == "running":
            return
        metadata = self.manifest.metadata
        if status == "pending":
            raise ManifestExpired(f"the run is pending until {metadata.not_before}")
        if status == "expired":
            raise ManifestExpired(f"the run expired at {metadata.expires_at}")
        if status == "revoked":
            raise RunClosed(f"the run is revoked: version {state.latest_version} superseded it")
        raise RunClosed(f"the run is {status}")


_CONFLICT = "run key {key!r} was started with another narrower: one run key is one run"


def _narrower(narrowed: Narrowed | None) -> str:
    """A run's narrower as canonical JSON ("" for none): what a second start must repeat."""
    return narrowed.narrower.decode() if narrowed else ""


class RunRegistry:
    """The runs this process has verified and compiled, over one run store."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}

    def register(self, verified: VerifiedManifest, policy: PreparedPolicy) -> Run:
        """The grant's default run (registering the same manifest again changes nothing)."""
        run, _ = self._open(Run(run_id_for(verified.digest), verified, policy))
        return run

    def start(
        self,
        grant: Run,
        run_key: str,
        narrowed: Narrowed | None = None,
        policy: PreparedPolicy | None = None,
    ) -> tuple[Run, bool]:
        """The run of ``run_key`` (checked by the caller) under ``grant`` (a registered
        default run), and whether this call created its state, which opens in the store
        only once, from any replica. A narrowed run comes with its effective grant and the
        policy compiled with it; ``RunKeyConflict`` if the key was started otherwise."""
        run_id = run_id_for(grant.verified.digest, run_key)
        run = Run(run_id, grant.verified, policy or grant.policy, run_key, narrowed)
        return self._open(run, grant.run_id)

    def _open(self, run: Run, grant_run_id: str = "") -> tuple[Run, bool]:
        with self._lock:
            existing = self._runs.get(run.run_id)
            if existing is not None:
                if _narrower(existing.narrowed) != _narrower(run.narrowed):
                    raise RunKeyConflict(_CONFLICT.format(key=run.run_key))
                return existing, False
            manifest = run.manifest
            narrower = _narrower(run.narrowed)
            created = self.store.open(
                run.run_id,
                manifest.assembly.steps[0].id,
                Usage(**manifest.budgets.model_dump()),
                run.lineage,
                manifest.metadata.version,
                (grant_run_id, run.run_key, narrower),
            )
            if not created and self.store.shared:
                # Opened before, maybe by another replica: with this narrower, or refused.
                found = self.store.grant_of(run.run_id)
                if found is not None and found[2] != narrower:
                    raise RunKeyConflict(_CONFLICT.format(key=run.run_key))
            self._runs[run.run_id] = run
            return run, created

    def forget(self, run_id: str) -> None:
        """Drop a run from this process (its state stays in the store)."""
        with self._lock:
            self._runs.pop(run_id, None)

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
