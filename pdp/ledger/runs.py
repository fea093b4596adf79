"""Runs: executions of a grant (a registered manifest). Registering a manifest binds its
default run (run key ""); ``StartRun`` starts one more per run key (the agent's task id),
each with its own step, budgets and answers. Each process keeps the verified manifest and
its compiled policy once per grant; a run's mutable state (step, outcome, budgets,
answers) lives in a run store (``store.py``: in this process, or in Redis shared by
several replicas).

Status, in order: an ended run stays ended (completed, failed, revoked); a run whose
lineage has a newer registered version is revoked; before its window it is pending,
after it expired; otherwise running.

A run started under a run key that ended (completed, failed) or expired is released once
the retention passed: the ledger settles what it still holds and drops its state, here
and in the store (``Ledger.sweep``). The registry keeps the runs due for release in a
heap, so finding them costs what is due, not every run ever seen. A grant's default run
is what later starts are made from: it (and with it the grant: its compiled policy, its
fleet books, its envelope) is released once the grant expired, the retention passed and
every run started under it was released first, so what a process holds is the grants in
their window, however many were ever registered.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import itertools
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pdp.engine import PreparedPolicy
from pdp.errors import (
    BadRequest,
    ManifestExpired,
    ManifestUnknown,
    RunClosed,
    RunKeyConflict,
    RunNotBound,
    StoreUnavailable,
)
from pdp.ledger.store import BUDGETS, UNLIMITED, Fleet, RunState, RunStore, Usage
from pdp.manifest import Manifest, VerifiedManifest, mark_lineage
from pdp.manifest.narrow import Narrowed

__all__ = ["RegistryState", "Run", "RunRegistry", "check_run_key", "fleet_of", "run_id_for"]

log = logging.getLogger("abc.pdp")

# Heap entries of runs already released are dropped once they dominate (amortized).
_COMPACT_SLACK = 1024
# One walk of the runs serves the four budget gauges of one scrape.
_SCRAPE_REUSE_SECONDS = 1.0

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


def fleet_of(manifest: Manifest) -> Fleet | None:
    """The grant's fleet limits as the store keeps them, or None when it sets none."""
    limits = manifest.fleet
    if limits is None:
        return None
    usage = Usage(*(UNLIMITED if (v := getattr(limits, name)) is None else v for name in BUDGETS))
    return Fleet(usage, limits.runs or 0)


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

    def check_bound(self, bound: str) -> None:
        """``RunNotBound`` unless the run is of manifest ``bound`` (the caller's, as its
        sidecar states it; "" checks nothing)."""
        if bound and self.verified.digest != bound:
            raise RunNotBound(
                f"run {self.run_id} is a run of manifest {self.verified.digest}, not of the"
                f" caller's {bound}"
            )

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


@dataclass(frozen=True)
class StartedRun:
    """A run started under a grant, as a snapshot keeps it: enough to start it again."""

    grant_run_id: str
    run_key: str
    narrower: str  # canonical JSON, "" for none: narrowed again from the signed grant
    effective_digest: str  # "" for none: the narrowed grant must come out the same


@dataclass(frozen=True)
class RegistryState:
    """What a registry holds, for a snapshot: each grant's envelope and when it was
    accepted (it is verified again as of then), each run started under a grant, and when
    each held run is looked at again for release."""

    grants: tuple[tuple[str, bytes, datetime], ...]  # default run id, envelope, accepted
    runs: tuple[StartedRun, ...]
    due: tuple[tuple[datetime, str], ...] = ()  # (when, run id), as the release heap has it

    def as_json(self) -> dict[str, Any]:
        return {
            "grants": [
                [run_id, base64.b64encode(raw).decode("ascii"), accepted.isoformat()]
                for run_id, raw, accepted in self.grants
            ],
            "runs": [
                [r.grant_run_id, r.run_key, r.narrower, r.effective_digest] for r in self.runs
            ],
            "due": [[when.isoformat(), run_id] for when, run_id in self.due],
        }

    @staticmethod
    def from_json(doc: Any) -> RegistryState:
        """``ValueError`` for anything ``as_json`` did not make."""
        try:
            grants = tuple(
                (str(run_id), base64.b64decode(raw, validate=True), datetime.fromisoformat(at))
                for run_id, raw, at in doc["grants"]
            )
            runs = tuple(
                StartedRun(str(grant), str(key), str(narrower), str(effective))
                for grant, key, narrower, effective in doc["runs"]
            )
            due = tuple((datetime.fromisoformat(when), str(run)) for when, run in doc["due"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the snapshot's runs are malformed: {exc!r}") from exc
        return RegistryState(grants, runs, due)


class RunRegistry:
    """The runs this process has verified and compiled, over one run store."""

    def __init__(self, store: RunStore, retention: timedelta = timedelta(hours=1)) -> None:
        self.store = store
        self.retention = retention
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        # (when, n, run): a started run is looked at again once it may be released, at
        # its expiry plus the retention, or at its ending plus the retention.
        self._due: list[tuple[datetime, int, Run]] = []
        self._seq = itertools.count()
        self._ratios: tuple[float, dict[str, float]] = (-math.inf, {})
        # Each grant's envelope and the time it was verified as of, for snapshots.
        self._sources: dict[str, tuple[bytes, datetime]] = {}
        self._started: dict[str, int] = {}  # grant's default run id -> its runs held here

    def register(
        self, verified: VerifiedManifest, policy: PreparedPolicy, raw: bytes, accepted: datetime
    ) -> Run:
        """The grant's default run (registering the same manifest again changes nothing).
        ``raw`` is its envelope, verified as of ``accepted``."""
        run = Run(run_id_for(verified.digest), verified, policy)
        with self._lock:
            existing = self._runs.get(run.run_id)
            if existing is not None:
                return existing
            fleet = fleet_of(verified.manifest)
            if fleet is not None:
                self.store.open_fleet(run.run_id, fleet)
            self._open(run, run.run_id if fleet else "")
            self._runs[run.run_id] = run
            self._sources[run.run_id] = (raw, accepted)
            self._push(verified.manifest.expires_at + self.retention, run)
            return run

    def export_state(self) -> RegistryState:
        with self._lock:
            runs = tuple(
                StartedRun(
                    run_id_for(run.verified.digest),
                    run.run_key,
                    _narrower(run.narrowed),
                    run.narrowed.digest if run.narrowed else "",
                )
                for run in self._runs.values()
                if run.run_key
            )
            due = tuple(
                (when, run.run_id)
                for when, _, run in self._due
                if self._runs.get(run.run_id) is run
            )
            return RegistryState(
                tuple((run_id, raw, at) for run_id, (raw, at) in self._sources.items()),
                runs,
                due,
            )

    def import_due(self, due: tuple[tuple[datetime, str], ...]) -> None:
        """Put back a snapshot's release times (its runs started again first)."""
        with self._lock:
            for when, run_id in due:
                run = self._runs.get(run_id)
                if run is not None:
                    self._push(when, run)

    def admit(
        self,
        grant: Run,
        run_key: str,
        now: datetime,
        force: bool = False,
        narrowed: Narrowed | None = None,
    ) -> bool:
        """Open the state of ``run_key``'s run under ``grant`` (a registered default run),
        narrowed or not, in the store, once from any replica, taking a runs-at-once slot if
        its fleet limits them (``FleetRunsExhausted`` when none is free at ``now``, unless
        forced); True if this call created it. ``RunKeyConflict`` if another replica
        started the key with another narrower."""
        fleet = fleet_of(grant.verified.manifest)
        run_id = run_id_for(grant.verified.digest, run_key)
        run = Run(run_id, grant.verified, grant.policy, run_key, narrowed)
        slot = (now, run.manifest.expires_at, force) if fleet and fleet.runs else None
        grant_of = (grant.run_id, run_key, _narrower(narrowed))
        created = self._open(run, grant.run_id if fleet else "", grant_of, slot)
        if self.store.shared:
            if not created:
                self.check_shared(run.run_id, run_key, narrowed)
            # Also when not created here: a start that failed after its open is scheduled
            # by its retry (an earlier time, an ending's, stays).
            self.store.schedule(run.run_id, run.manifest.expires_at + self.retention)
        return created

    def add(
        self,
        grant: Run,
        run_key: str,
        narrowed: Narrowed | None = None,
        policy: PreparedPolicy | None = None,
    ) -> Run:
        """The run of ``run_key`` under ``grant``, compiled here (its state is admitted);
        a narrowed run comes with the policy compiled with its effective grant."""
        run_id = run_id_for(grant.verified.digest, run_key)
        with self._lock:
            existing = self._runs.get(run_id)
            if existing is not None:
                if _narrower(existing.narrowed) != _narrower(narrowed):
                    raise RunKeyConflict(_CONFLICT.format(key=run_key))
                return existing
            run = Run(run_id, grant.verified, policy or grant.policy, run_key, narrowed)
            self._runs[run_id] = run
            self._started[grant.run_id] = self._started.get(grant.run_id, 0) + 1
            self._push(run.manifest.expires_at + self.retention, run)
            return run

    def start(
        self,
        grant: Run,
        run_key: str,
        now: datetime,
        force: bool = False,
        narrowed: Narrowed | None = None,
        policy: PreparedPolicy | None = None,
    ) -> Run:
        """Admit and add: a run started on another replica, or replayed from the log."""
        if self.find(run_id_for(grant.verified.digest, run_key)) is None:
            self.admit(grant, run_key, now, force, narrowed)
        return self.add(grant, run_key, narrowed, policy)

    def _open(
        self,
        run: Run,
        fleet: str,
        grant: tuple[str, str, str] = ("", "", ""),
        slot: tuple[datetime, datetime, bool] | None = None,
    ) -> bool:
        manifest = run.manifest
        return self.store.open(
            run.run_id,
            manifest.assembly.steps[0].id,
            Usage(**manifest.budgets.model_dump()),
            run.lineage,
            manifest.metadata.version,
            grant,
            fleet,
            slot,
        )

    def check_shared(self, run_id: str, run_key: str, narrowed: Narrowed | None) -> None:
        """``RunKeyConflict`` if the shared store holds the run under another narrower."""
        found = self.store.grant_of(run_id)
        if found is not None and found[2] != _narrower(narrowed):
            raise RunKeyConflict(_CONFLICT.format(key=run_key))

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def find(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    def ended(self, run_id: str, at: datetime) -> None:
        """The run ended at ``at``: look at it again once the retention passed."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None and run.run_key:
                self._push(at + self.retention, run)
        if run is not None and run.run_key and self.store.shared:
            try:
                self.store.schedule(run_id, at + self.retention)
            except StoreUnavailable:
                # The ending is made: the run is released at its expiry (scheduled when it
                # started), or by this process's own sweep.
                log.warning("run %s ended, but its release could not be scheduled", run_id)

    def _push(self, when: datetime, run: Run) -> None:
        heapq.heappush(self._due, (when, next(self._seq), run))
        if len(self._due) > 2 * len(self._runs) + _COMPACT_SLACK:
            self._due = [e for e in self._due if self._runs.get(e[2].run_id) is e[2]]
            heapq.heapify(self._due)

    def due(self, now: datetime, limit: int) -> list[Run]:
        """Up to ``limit`` runs whose release time came (each checked by the ledger)."""
        found: list[Run] = []
        with self._lock:
            while self._due and self._due[0][0] <= now and len(found) < limit:
                run = heapq.heappop(self._due)[2]
                if self._runs.get(run.run_id) is run and run not in found:
                    found.append(run)
        return found

    def later(self, run: Run, when: datetime) -> None:
        """Look at ``run`` again for release at ``when``."""
        with self._lock:
            if self._runs.get(run.run_id) is run:
                self._push(when, run)

    def holds_runs_of(self, grant: Run) -> bool:
        """Whether a run started under ``grant`` is still held here."""
        return self._started.get(grant.run_id, 0) > 0

    def drop(self, run: Run) -> None:
        with self._lock:
            if self._runs.get(run.run_id) is not run:
                return
            del self._runs[run.run_id]
            if not run.run_key:
                self._sources.pop(run.run_id, None)
                return
            grant_run_id = run_id_for(run.verified.digest)
            left = self._started.get(grant_run_id, 0) - 1
            if left > 0:
                self._started[grant_run_id] = left
            else:
                self._started.pop(grant_run_id, None)

    def lowest_remaining_ratio(self, now: datetime) -> dict[str, float]:
        """Over the runs held here that can still spend (running at ``now``); one walk
        serves a whole scrape. An ended, revoked or expired run's books change no more: an
        alert on them could not be acted on, and would outlive a budget raised by a new
        version."""
        at, ratios = self._ratios
        if time.monotonic() - at < _SCRAPE_REUSE_SECONDS:
            return ratios
        with self._lock:
            runs = list(self._runs.values())
        seen: list[dict[str, float]] = []
        try:
            for run in runs:
                try:
                    if run.status(self.store.state(run.run_id, run.lineage), now) != "running":
                        continue
                    seen.append(self.store.books(run.run_id).remaining_ratio())
                except ManifestUnknown:
                    continue  # released meanwhile (by another replica)
        except StoreUnavailable:
            # Unknown is not "full": a scrape during an outage shows no number at all.
            return dict.fromkeys(BUDGETS, math.nan)
        ratios = {name: min((r[name] for r in seen), default=1.0) for name in BUDGETS}
        self._ratios = (time.monotonic(), ratios)
        return ratios
