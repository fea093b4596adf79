"""Grants: signed manifests registered (verified, admitted past their rollback mark,
compiled), and the runs started under them; found again on another replica from the shared
store, and rebuilt from the decision log at start-up.

Every registration, refused or accepted, and every run start is logged before it is
made and answered.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime

from pdp.bundle import PolicyBundle
from pdp.decisionlog import (
    DecisionLog,
    RegistrationRecord,
    RegistrationRefusedRecord,
    RunStartRecord,
)
from pdp.engine import EngineError, PreparedPolicy, policy_data
from pdp.errors import (
    AbcError,
    LogUnavailable,
    ManifestExpired,
    ManifestUnknown,
    RunClosed,
    RunNotBound,
)
from pdp.ledger import Ledger, RegistryState, Run, check_run_key, run_id_for
from pdp.ledger.runs import StartedRun
from pdp.manifest import (
    HighWater,
    TrustStore,
    VerificationPolicy,
    VerifiedManifest,
    admit_rollback_mark,
    verify_envelope,
)
from pdp.manifest.canonical import canonical_bytes
from pdp.manifest.model import Manifest
from pdp.manifest.narrow import Narrowed, narrow
from pdp.metrics import PdpMetrics

__all__ = ["Grants"]

log = logging.getLogger("abc.pdp")

# Effective grants and their compiled policies kept, the most recently used: runs narrowed
# the same way (one narrower per agent deployment, typically) share one.
NARROWED_POLICIES = 256


class Grants:
    def __init__(
        self,
        bundle: PolicyBundle,
        trust: TrustStore,
        high_water: HighWater,
        metrics: PdpMetrics,
        decision_log: DecisionLog,
        ledger: Ledger,
    ) -> None:
        self._bundle = bundle
        self._trust = trust
        self._high_water = high_water
        self._metrics = metrics
        self._log = decision_log
        self._ledger = ledger
        self._modules = bundle.rego_modules()
        self._verification = VerificationPolicy.registration(bundle.digest)
        self._narrowed_cache: OrderedDict[
            tuple[str, bytes], tuple[Narrowed | None, PreparedPolicy | None]
        ] = OrderedDict()
        self._lock = threading.Lock()
        self._loading = threading.RLock()  # reentrant: a started run loads its grant first
        # Starts of one new run key are serialised; of others, mostly not (striped).
        self._starting = tuple(threading.Lock() for _ in range(64))

    def register(self, raw_envelope: bytes, now: datetime) -> Run:
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
                    time=now, policy_digest=self._bundle.digest, reason=exc.reason, detail=str(exc)
                )
            )
            raise
        policy = self._prepare(verified)
        # Logged before it is made: a grant the log could not record is never used (a run
        # started or decided under it would be gone after a restart, and a newer version
        # would revoke the older one live but not after it).
        self._log.append(self._registration(verified, raw_envelope, now))
        run = self._ledger.runs.register(verified, policy, raw_envelope, now)
        self._ledger.store.put_envelope(run.run_id, raw_envelope)
        self._metrics.manifests_registered.inc()
        log.info("manifest %s registered as %s", verified.digest, run.run_id)
        return run

    def _registration(
        self, verified: VerifiedManifest, raw_envelope: bytes, now: datetime
    ) -> RegistrationRecord:
        return RegistrationRecord(
            time=now,
            run_id=run_id_for(verified.digest),
            manifest_digest=verified.digest,
            policy_digest=self._bundle.digest,
            lineage=verified.manifest.metadata.lineage,
            version=verified.manifest.metadata.version,
            signer=verified.signer,
            # The envelope itself, so a restarted PDP can verify and rebuild the run.
            envelope=base64.b64encode(raw_envelope).decode("ascii"),
        )

    def _prepare(
        self, verified: VerifiedManifest, manifest: Manifest | None = None
    ) -> PreparedPolicy:
        """The policy compiled with the grant, or with a narrowed run's effective grant."""
        data = policy_data(manifest or verified.manifest)
        try:
            return PreparedPolicy(self._modules, data, self._bundle.digest, verified.digest)
        except EngineError as exc:
            # The bundle compiled at start-up; failing now is the PDP's fault, not the caller's.
            log.error("policy does not compile with manifest %s: %s", verified.digest, exc)
            raise

    def _load(
        self, run_id: str, raw: bytes, trust_now: datetime, *, logged: bool = True
    ) -> Run | None:
        """Verify a registered envelope again and compile its run; None if it fails now.

        Registration's rules without its rollback mark: the run was admitted when
        registered, and a newer version of its lineage shows in its status (revoked) instead.
        Not ``logged`` (a grant another replica registered): its registration is logged here
        first, so that this replica's log names every grant it decides for.
        """
        try:
            verified = verify_envelope(raw, self._trust, trust_now, self._verification)
        except AbcError as exc:
            log.warning("run %s not loaded: %s: %s", run_id, exc.reason.value, exc)
            return None
        if not logged:
            self._log.append(self._registration(verified, raw, trust_now))
        return self._ledger.runs.register(verified, self._prepare(verified), raw, trust_now)

    def run(self, run_id: str, now: datetime, bound: str = "") -> Run:
        """The run, compiled here. One registered on another replica is loaded from the
        shared store's copy of its envelope, verified by this replica's own trust store;
        one started there, from its grant's. ``bound`` is the manifest digest the caller
        is bound to (its sidecar's): a run of another grant is ``RunNotBound`` ("" checks
        nothing)."""
        run = self._ledger.runs.find(run_id)
        if run is None:
            run = self._load_shared(run_id, now)
        if run is None or run.run_id != run_id:
            self._ledger.check_released(run_id)
            raise ManifestUnknown("no run with this id")
        run.check_bound(bound)
        return run

    def _load_shared(self, run_id: str, now: datetime) -> Run | None:
        """A run another replica registered or started, from the shared store; None if the
        store has none. Logged here before it is used (``LogUnavailable`` if it cannot be,
        and nothing is loaded), so that this replica's log names every run it decides for
        and its audit, explain and replay need no other replica's log. One load at a time:
        two threads meeting the same run log it once."""
        raw = self._ledger.store.envelope(run_id)
        started = self._ledger.store.grant_of(run_id) if raw is None else None
        if raw is None and started is None:
            return None  # looked up unlocked: an unknown id holds up no load
        with self._loading:
            run = self._ledger.runs.find(run_id)
            if run is not None:
                return run
            if raw is not None:
                return self._load(run_id, raw, now, logged=False)
            assert started is not None
            grant_run_id, run_key, narrower = started
            grant = self.run(grant_run_id, now)
            # Narrowed again from the signed grant: the store cannot widen a run.
            narrowed, policy = self._narrowed(grant, narrower.encode())
            self._log.append(self._run_start(grant, run_key, narrowed, now))
            return self._ledger.runs.start(grant, run_key, now, True, narrowed, policy)

    def unbound(self, reservation_ids: Sequence[str], bound: str, now: datetime) -> set[str]:
        """Those of ``reservation_ids`` holding budget of a run of another grant than the
        manifest ``bound`` ("" checks nothing); one store lookup for them all."""
        if not bound:
            return set()
        found = self._ledger.store.reservation_runs(reservation_ids)
        refused: set[str] = set()
        for reservation_id, run_id in zip(reservation_ids, found, strict=True):
            try:
                if run_id is not None:
                    self.run(run_id, now, bound)
            except RunNotBound:
                refused.add(reservation_id)
            except ManifestUnknown:
                pass  # settling it finds nothing either
        return refused

    def _narrowed(
        self, grant: Run, narrower: bytes
    ) -> tuple[Narrowed | None, PreparedPolicy | None]:
        """The effective grant of ``narrower`` (None: the grant's own) and the policy
        compiled with it; both kept per (grant, narrower), so the runs of one narrower
        cost one check and one compilation."""
        if not narrower:
            return None, None
        key = (grant.verified.digest, narrower)
        with self._lock:
            known = self._narrowed_cache.get(key)
            if known is not None:
                self._narrowed_cache.move_to_end(key)
                return known
        narrowed = narrow(grant.verified.manifest, narrower)
        # Compiled unlocked: two first starts at once compile twice, never wrongly.
        found = (narrowed, self._prepare(grant.verified, narrowed.manifest) if narrowed else None)
        with self._lock:
            self._narrowed_cache[key] = found
            if len(self._narrowed_cache) > NARROWED_POLICIES:
                self._narrowed_cache.popitem(last=False)
        return found

    def forget(self, manifest_digest: str) -> None:
        """Drop what is kept of a released grant: its narrowed policies."""
        with self._lock:
            for key in [k for k in self._narrowed_cache if k[0] == manifest_digest]:
                del self._narrowed_cache[key]

    def start(
        self, manifest_digest: str, run_key: str, now: datetime, narrower: bytes = b""
    ) -> tuple[Run, bool]:
        """The run of ``run_key`` under a registered grant, started if it is new (and the
        start logged before it is made); whether this call started it. The grant must be
        in its window and not superseded; its default run's ending ends no other run.
        With ``narrower`` (JSON) the run is judged by the grant narrowed by it
        (``pdp.manifest.narrow``); a key already started otherwise is ``RunKeyConflict``."""
        grant = self.run(run_id_for(manifest_digest), now)
        if grant.verified.digest != manifest_digest:
            # Another digest sharing the default run id's prefix names no registered grant.
            raise ManifestUnknown("no registered manifest with this digest")
        check_run_key(run_key)
        metadata = grant.verified.manifest.metadata
        if not grant.verified.manifest.not_before <= now < grant.verified.manifest.expires_at:
            raise ManifestExpired(
                f"the manifest is valid from {metadata.not_before} to {metadata.expires_at}"
            )
        latest = self._ledger.state(grant).latest_version
        if latest > metadata.version:
            raise RunClosed(f"the manifest is revoked: version {latest} superseded it")
        narrowed, policy = self._narrowed(grant, narrower)
        run_id = run_id_for(manifest_digest, run_key)
        run = self._ledger.runs.find(run_id)
        if run is None:
            # One start record per run, however many callers race to start its key: a
            # second one, replayed, would read as the key started again after a release,
            # and wipe the run's books.
            with self._starting[hash(run_id) % len(self._starting)]:
                run = self._ledger.runs.find(run_id)
                if run is None:
                    return self._start_new(grant, run_id, run_key, narrowed, policy, now)
        if self._ledger.store.shared:
            self._ledger.state(run)  # another replica may have released it
        # The same run, or RunKeyConflict if it was started with another narrower.
        return self._ledger.runs.add(grant, run_key, narrowed, policy), False

    def _start_new(
        self,
        grant: Run,
        run_id: str,
        run_key: str,
        narrowed: Narrowed | None,
        policy: PreparedPolicy | None,
        now: datetime,
    ) -> tuple[Run, bool]:
        self._ledger.check_released(run_id)
        # Admitted (a runs-at-once slot taken) before it is logged, so the log holds only
        # starts that were made; used only once logged, or it could not be rebuilt. A key
        # another replica started with another narrower is refused here, before the log.
        started = self._ledger.runs.admit(grant, run_key, now, narrowed=narrowed)
        try:
            self._log.append(self._run_start(grant, run_key, narrowed, now))
        except LogUnavailable:
            if started:  # nobody was told of it: its slot is free again
                self._ledger.store.release_run(run_id, "")
            raise
        if started:
            self._metrics.runs_started.inc()
        return self._ledger.runs.add(grant, run_key, narrowed, policy), started

    @staticmethod
    def _run_start(
        grant: Run, run_key: str, narrowed: Narrowed | None, now: datetime
    ) -> RunStartRecord:
        return RunStartRecord(
            time=now,
            run_id=run_id_for(grant.verified.digest, run_key),
            manifest_digest=grant.verified.digest,
            grant_run_id=grant.run_id,
            run_key=run_key,
            narrower=json.loads(narrowed.narrower) if narrowed else None,
            effective_digest=narrowed.digest if narrowed else "",
        )

    def restore(self, record: RegistrationRecord | RunStartRecord, trust_now: datetime) -> None:
        """Rebuild a registration (verified again as of ``trust_now``, when it was accepted)
        or a run start from the log; one that no longer verifies starts nothing."""
        if isinstance(record, RegistrationRecord):
            self._load(record.run_id, base64.b64decode(record.envelope), trust_now)
            return
        narrower = canonical_bytes(record.narrower) if record.narrower is not None else b""
        started = StartedRun(
            record.grant_run_id, record.run_key, narrower.decode(), record.effective_digest
        )
        self._start_again(started, record.time)

    def import_state(self, state: RegistryState) -> None:
        """Rebuild the grants and runs of a snapshot, as ``restore`` rebuilds them from
        their records: each envelope verified again as of when it was accepted, each
        narrowed run narrowed again from its signed grant."""
        for run_id, raw, accepted in state.grants:
            self._load(run_id, raw, accepted)
        accepted_at = {run_id: accepted for run_id, _, accepted in state.grants}
        for started in state.runs:
            if started.grant_run_id in accepted_at:
                self._start_again(started, accepted_at[started.grant_run_id])
        self._ledger.runs.import_due(state.due)

    def _start_again(self, started: StartedRun, at: datetime) -> None:
        """A run started before (logged, or in a snapshot), started again: its slot taken
        whatever the count, since it was admitted then. With a shared store, nothing: the
        store holds the run (each replica loads it when first named) or released it, and
        opening it again here would bring a released run back."""
        if self._ledger.store.shared:
            return
        grant = self._ledger.runs.find(started.grant_run_id)
        if grant is None:
            return
        run_id = run_id_for(grant.verified.digest, started.run_key)
        known = self._ledger.runs.find(run_id)
        if known is not None:
            # A start is logged only for a run this process did not hold: the same run
            # logged again was released meanwhile, and its key (forgotten by then) started
            # a fresh run. Its old state goes now as it went then, or the fresh run would
            # come back with the old one's books and outcome.
            self._ledger.store.release_run(run_id, "")
            self._ledger.runs.drop(known)
        try:
            narrowed, policy = self._narrowed(grant, started.narrower.encode())
        except AbcError as exc:
            log.warning("run %s not restored: %s: %s", run_id, exc.reason.value, exc)
            return
        if (narrowed.digest if narrowed else "") != started.effective_digest:
            log.warning("run %s not restored: its narrower is not its logged grant", run_id)
            return
        self._ledger.runs.start(grant, started.run_key, at, True, narrowed, policy)
