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

import base64
import hashlib
import math
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pdp.engine import PreparedPolicy
from pdp.errors import BadRequest, ManifestExpired, RunClosed, StoreUnavailable
from pdp.ledger.store import BUDGETS, RunState, RunStore, Usage
from pdp.manifest import VerifiedManifest, mark_lineage

__all__ = ["RegistryState", "Run", "RunRegistry", "check_run_key", "run_id_for"]

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

    def check_running(self, state: RunState, now: datetime) -> None:
        """Raise the reason a run that is not running decides nothing."""
        status = self.status(state, now)
        if status == "running":
            return
        metadata = self.verified.manifest.metadata
        if status == "pending":
            raise ManifestExpired(f"the run is pending until {metadata.not_before}")
        if status == "expired":
            raise ManifestExpired(f"the run expired at {metadata.expires_at}")
        if status == "revoked":
            raise RunClosed(f"the run is revoked: version {state.latest_version} superseded it")
        raise RunClosed(f"the run is {status}")


@dataclass(frozen=True)
class RegistryState:
    """What a registry holds, for a snapshot: each grant's envelope and when it was
    accepted (it is verified again as of then), and each run started under a grant."""

    grants: tuple[tuple[str, bytes, datetime], ...]  # default run id, envelope, accepted
    runs: tuple[tuple[str, str], ...]  # grant's default run id, run key

    def as_json(self) -> dict[str, Any]:
        return {
            "grants": [
                [run_id, base64.b64encode(raw).decode("ascii"), accepted.isoformat()]
                for run_id, raw, accepted in self.grants
            ],
            "runs": [list(run) for run in self.runs],
        }

    @staticmethod
    def from_json(doc: Any) -> RegistryState:
        """``ValueError`` for anything ``as_json`` did not make."""
        try:
            grants = tuple(
                (str(run_id), base64.b64decode(raw, validate=True), datetime.fromisoformat(at))
                for run_id, raw, at in doc["grants"]
            )
            runs = tuple((str(grant), str(key)) for grant, key in doc["runs"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the snapshot's runs are malformed: {exc!r}") from exc
        return RegistryState(grants, runs)


class RunRegistry:
    """The runs this process has verified and compiled, over one run store."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        # Each grant's envelope and the time it was verified as of, for snapshots.
        self._sources: dict[str, tuple[bytes, datetime]] = {}

    def register(
        self, verified: VerifiedManifest, policy: PreparedPolicy, raw: bytes, accepted: datetime
    ) -> Run:
        """The grant's default run (registering the same manifest again changes nothing).
        ``raw`` is its envelope, verified as of ``accepted``."""
        run, _ = self._open(Run(run_id_for(verified.digest), verified, policy))
        with self._lock:
            self._sources.setdefault(run.run_id, (raw, accepted))
        return run

    def export_state(self) -> RegistryState:
        with self._lock:
            return RegistryState(
                tuple((run_id, raw, at) for run_id, (raw, at) in self._sources.items()),
                tuple(
                    (run_id_for(run.verified.digest), run.run_key)
                    for run in self._runs.values()
                    if run.run_key
                ),
            )

    def start(self, grant: Run, run_key: str) -> tuple[Run, bool]:
        """The run of ``run_key`` (checked by the caller) under ``grant`` (a registered
        default run), and whether this call created its state, which opens in the store
        only once, from any replica."""
        run_id = run_id_for(grant.verified.digest, run_key)
        return self._open(Run(run_id, grant.verified, grant.policy, run_key), grant.run_id)

    def _open(self, run: Run, grant_run_id: str = "") -> tuple[Run, bool]:
        with self._lock:
            existing = self._runs.get(run.run_id)
            if existing is not None:
                return existing, False
            manifest = run.verified.manifest
            created = self.store.open(
                run.run_id,
                manifest.assembly.steps[0].id,
                Usage(**manifest.budgets.model_dump()),
                run.lineage,
                manifest.metadata.version,
                (grant_run_id, run.run_key),
            )
            self._runs[run.run_id] = run
            return run, created

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._runs)

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
