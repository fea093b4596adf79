"""DecisionService in-process: its fail-closed branches, each with real collaborators (the
shipped policy bundle, a decision log on disk, the memory run store); only a policy that
fails to decide is written here for the case."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from pdp.action import Action, validate_action
from pdp.api import pdp_pb2
from pdp.bundle import load_bundle
from pdp.decisionlog import (
    DecisionLog,
    DecisionRecord,
    MaskRule,
    Queued,
    RunStartRecord,
    SettlementRecord,
    read_verified_log,
)
from pdp.decisionlog.recovery import restore_from_log
from pdp.errors import (
    BadRequest,
    LogUnavailable,
    ManifestExpired,
    ManifestRollback,
    ManifestUnknown,
    ReasonCode,
    RunClosed,
    RunReleased,
    SignatureInvalid,
    StoreUnavailable,
)
from pdp.ledger import MemoryRunStore, Usage
from pdp.manifest import SqliteHighWater
from pdp.metrics import PdpMetrics
from pdp.server.servicer import DecisionServicer
from pdp.service import DecisionService
from tests.factories import NOW, manifest_document, signed_envelope, trust_entry, trust_store

POLICIES = Path(__file__).resolve().parents[3] / "policies"
KEY = Ed25519PrivateKey.generate()
LOG_KEY = Ed25519PrivateKey.generate()


class _Pdp:
    def __init__(
        self,
        tmp_path: Path,
        policies: Path = POLICIES,
        store: MemoryRunStore | None = None,
        run_retention: timedelta = timedelta(hours=1),
        masks: tuple[MaskRule, ...] = (),
    ) -> None:
        self.bundle = load_bundle(policies)
        self.log_path = tmp_path / "decisions.log"
        self.log = DecisionLog(self.log_path, LOG_KEY, masks=masks)
        self.store = store or MemoryRunStore()
        self.marks = SqliteHighWater(tmp_path / "abc.db")
        self.registry = CollectorRegistry()
        self.service = DecisionService(
            self.bundle,
            trust_store(trust_entry(KEY, modes=("enforce", "shadow"))),
            self.marks,
            PdpMetrics(self.registry),
            self.log,
            store=self.store,
            run_retention=run_retention,
            clock=lambda: NOW,
        )

    def register(
        self, version: int = 7, key: Ed25519PrivateKey = KEY, mode: str = "enforce"
    ) -> str:
        document = manifest_document(version=version)
        document["policy"]["bundle_digest"] = self.bundle.digest
        document["enforcement"] = mode
        return self.service.register_manifest(signed_envelope(key, document), NOW).run_id

    def decisions(self) -> list[DecisionRecord]:
        self.log.close()
        records = read_verified_log(self.log_path, LOG_KEY.public_key()).records
        return [r for r in records if isinstance(r, DecisionRecord)]


@pytest.fixture
def pdp(tmp_path: Path) -> _Pdp:
    return _Pdp(tmp_path)


def _hiccup_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The log's next fsync fails (a disk hiccup); those after it succeed."""
    synced, failures = os.fdatasync, iter([OSError(errno.EIO, "a disk hiccup")])

    def hiccup(fd: int) -> None:
        for failure in failures:
            raise failure
        synced(fd)

    monkeypatch.setattr("pdp.decisionlog.writer.os.fdatasync", hiccup)


def _model(max_tokens: int = 100) -> Action:
    return validate_action("model", "model:openai/gpt-4o-mini", max_tokens=max_tokens)


def test_an_allowed_call_reserves_its_worst_case(pdp: _Pdp) -> None:
    run_id = pdp.register()
    outcome = pdp.service.decide(run_id, "req-1", _model(100), NOW)
    assert outcome.decision.allow and outcome.reservation_id
    assert pdp.store.books(run_id).reserved == Usage(tokens=100, requests=1)


def test_an_unwritable_log_refuses_as_unavailable_and_reserves_nothing(pdp: _Pdp) -> None:
    run_id = pdp.register()
    pdp.log.close()  # a closed log takes no record: LogUnavailable
    outcome = pdp.service.decide(run_id, "req-1", _model(), NOW)
    assert not outcome.forward
    assert outcome.reason is ReasonCode.PDP_UNAVAILABLE
    books = pdp.store.books(run_id)
    assert books.reserved == Usage() and books.spent == Usage()
    # Not kept as the answer: the request id decides anew once the log writes again.
    assert pdp.store.claim(run_id, "req-1") is None


def test_a_step_the_log_cannot_record_is_not_entered(tmp_path: Path) -> None:
    pdp = _Pdp(tmp_path)
    run_id = pdp.register()
    pdp.log.close()
    outcome = pdp.service.decide(run_id, "req-1", validate_action("step", "step:answer"), NOW)
    assert outcome.reason is ReasonCode.PDP_UNAVAILABLE
    # Live as after a restart: the run is where it was, and the step can be entered later.
    run = pdp.service.get_run(run_id, NOW)
    assert (run.step, run.completed_steps) == ("research", ())


def test_a_policy_that_fails_to_decide_refuses_as_unavailable(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    # A builtin error on every input: OPA's strict errors stop the evaluation.
    (policies / "authz.rego").write_text(
        "package abc.authz\n\n"
        'decision := {"allow": true, "reasons": [], "obligations": {}} if {\n'
        "\tto_number(input.action.target) > 0\n"
        "}\n"
    )
    pdp = _Pdp(tmp_path, policies)
    run_id = pdp.register()
    outcome = pdp.service.decide(run_id, "req-1", _model(), NOW)
    assert not outcome.forward
    assert outcome.reason is ReasonCode.PDP_UNAVAILABLE
    assert pdp.store.books(run_id).reserved == Usage()
    (record,) = pdp.decisions()
    assert record.result["reasons"][0]["code"] == "pdp_unavailable"


class _BrokenStore(MemoryRunStore):
    def reserve(self, *args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("a bug, not the caller's input")


def test_a_bug_while_deciding_refuses_as_unavailable_and_is_decided_anew(tmp_path: Path) -> None:
    pdp = _Pdp(tmp_path, store=_BrokenStore())
    run_id = pdp.register()
    outcome = pdp.service.decide(run_id, "req-1", _model(), NOW)
    assert not outcome.forward and outcome.reason is ReasonCode.PDP_UNAVAILABLE
    (record,) = pdp.decisions()  # refused, and logged as such
    assert record.result["reasons"][0]["code"] == "pdp_unavailable"
    assert pdp.store.claim(run_id, "req-1") is None  # not kept: a retry decides anew


def test_an_action_a_door_could_not_validate_is_refused_and_logged(pdp: _Pdp) -> None:
    run_id = pdp.register()
    outcome = pdp.service.refuse(run_id, "req-1", BadRequest("malformed model target"), NOW)
    assert not outcome.forward and outcome.reason is ReasonCode.BAD_REQUEST
    # For a run that does not exist, that is the answer, as for any decision.
    unknown = pdp.service.refuse("run_nope", "req-2", BadRequest("malformed"), NOW)
    assert unknown.reason is ReasonCode.MANIFEST_UNKNOWN
    record, refused_unknown = pdp.decisions()
    assert record.decision_id == outcome.decision_id and record.manifest_digest
    assert record.result["reasons"][0]["message"] == "malformed model target"
    assert refused_unknown.run_id == "run_nope" and not refused_unknown.manifest_digest


def test_a_policy_that_fails_to_decide_refuses_a_shadow_run_too(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "authz.rego").write_text(
        "package abc.authz\n\n"
        'decision := {"allow": false, "reasons": [], "obligations": {}} if {\n'
        "\tto_number(input.action.target) > 0\n"
        "}\n"
    )
    pdp = _Pdp(tmp_path, policies)
    run_id = pdp.register(mode="shadow")
    outcome = pdp.service.decide(run_id, "req-1", _model(), NOW)
    # Shadow lifts the policy's verdict; a policy with no verdict is not lifted.
    assert not outcome.forward and outcome.reason is ReasonCode.PDP_UNAVAILABLE


def test_a_request_id_reused_for_another_action_is_refused_and_the_first_answer_kept(
    pdp: _Pdp,
) -> None:
    run_id = pdp.register()
    first = pdp.service.decide(run_id, "req-1", _model(100), NOW)
    assert first.decision.allow
    reused = pdp.service.decide(run_id, "req-1", _model(200), NOW)
    assert not reused.forward and reused.reason is ReasonCode.BAD_REQUEST
    assert reused.decision_id != first.decision_id
    again = pdp.service.decide(run_id, "req-1", _model(100), NOW)
    assert (again.decision_id, again.reservation_id) == (first.decision_id, first.reservation_id)
    assert again.decision.allow
    # One charge only: the refusal reserved nothing, the retry nothing more.
    assert pdp.store.books(run_id).reserved == Usage(tokens=100, requests=1)
    assert [r.reused_request_id for r in pdp.decisions()] == [False, True]


def test_a_refused_registration_never_moves_the_rollback_mark(pdp: _Pdp) -> None:
    with pytest.raises(SignatureInvalid):
        pdp.register(version=99, key=Ed25519PrivateKey.generate())
    assert pdp.marks.mark("acme/support-bot") is None
    pdp.register(version=7)
    assert pdp.marks.mark("acme/support-bot") == 7
    with pytest.raises(ManifestRollback):
        pdp.register(version=6)


def test_a_settlement_whose_write_was_lost_is_written_when_it_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pdp = _Pdp(tmp_path)
    run_id = pdp.register()
    reservation = pdp.service.decide(run_id, "req-1", _model(100), NOW).reservation_id
    _hiccup_once(monkeypatch)
    with pytest.raises(LogUnavailable):
        pdp.service.report_usage(reservation, 40, 0, NOW)
    # The caller retries once the disk is back: the settlement is written, then answered.
    assert pdp.service.report_usage(reservation, 40, 0, NOW) is not None
    assert pdp.service.report_usage(reservation, 40, 0, NOW) is None  # now settled, once
    live = pdp.service.get_run(run_id, NOW)
    pdp.log.close()
    settled = [
        r
        for r in read_verified_log(pdp.log_path, LOG_KEY.public_key()).records
        if isinstance(r, SettlementRecord)
    ]
    assert [(r.reservation_id, r.tokens) for r in settled] == [(reservation, 40)]
    restarted = _Pdp(tmp_path)
    restore_from_log(restarted.service, pdp.log_path, LOG_KEY.public_key())
    assert restarted.service.get_run(run_id, NOW) == live


def test_a_kept_allow_is_not_given_again_once_the_run_has_ended(tmp_path: Path) -> None:
    pdp = _Pdp(tmp_path)
    run_id = pdp.register()
    first = pdp.service.decide(run_id, "req-1", _model(100), NOW)
    assert pdp.service.decide(run_id, "req-1", _model(100), NOW).decision_id == first.decision_id
    end = validate_action("step", "step:@completed")
    ended = pdp.service.decide(run_id, "req-end", end, NOW)
    replayed = pdp.service.decide(run_id, "req-1", _model(100), NOW)
    assert not replayed.forward and replayed.reason is ReasonCode.RUN_CLOSED
    # The step that ended the run is its own retry's answer still.
    assert pdp.service.decide(run_id, "req-end", end, NOW).decision_id == ended.decision_id
    pdp.log.close()
    restarted = _Pdp(tmp_path)
    restore_from_log(restarted.service, pdp.log_path, LOG_KEY.public_key())
    # The refused retry was logged as a retry: the kept answer came back, and is refused again.
    again = restarted.service.decide(run_id, "req-1", _model(100), NOW)
    assert not again.forward and again.reason is ReasonCode.RUN_CLOSED
    assert restarted.service.decide(run_id, "req-end", end, NOW).decision_id == ended.decision_id


def test_a_registration_the_log_cannot_record_is_never_used(pdp: _Pdp) -> None:
    run_id = pdp.register(version=7)
    pdp.log.close()  # the next record cannot be written: LogUnavailable
    with pytest.raises(LogUnavailable):
        pdp.register(version=8)
    # Not registered live either: v8 does not revoke v7, as after a restart it would not.
    assert pdp.service.get_run(run_id, NOW).status == "running"


def test_a_settlement_is_said_settled_only_once_it_is_durable(pdp: _Pdp) -> None:
    run_id = pdp.register()
    reservation = pdp.service.decide(run_id, "req-1", _model(100), NOW).reservation_id
    # Carried with a decision: queued for the log's next commit, not yet on disk.
    with pdp.service.batch() as batch:
        assert batch.report_usage(reservation, 40, 0, NOW) is not None
    # A retry of it finds it settled, and says so only once the first record is durable.
    assert pdp.service.report_usage(reservation, 40, 0, NOW) is None
    on_disk = read_verified_log(pdp.log_path, LOG_KEY.public_key(), allow_tail=True).records
    settled = [r for r in on_disk if isinstance(r, SettlementRecord)]
    assert [(r.reservation_id, r.tokens) for r in settled] == [(reservation, 40)]


def test_a_masked_secret_is_kept_nowhere_and_its_retry_decides_anew(tmp_path: Path) -> None:
    masks = (MaskRule.parse("action.args.query"),)
    pdp = _Pdp(tmp_path, masks=masks)
    run_id = pdp.register()
    search = validate_action("tool", "tool:kb/search", args={"query": "SECRET-42"})
    first = pdp.service.decide(run_id, "req-1", search, NOW)
    again = pdp.service.decide(run_id, "req-1", search, NOW)
    assert first.decision.allow and again.decision.allow
    assert again.decision_id != first.decision_id  # no answer kept: decided anew
    _, state = pdp.service.export_state()
    assert "SECRET-42" not in json.dumps(state)  # what a snapshot would write
    pdp.log.close()
    restarted = _Pdp(tmp_path, masks=masks)
    restore_from_log(restarted.service, pdp.log_path, LOG_KEY.public_key())
    # The log holds it masked; replay keeps no answer either, so a retry is decided as live.
    assert restarted.service.decide(run_id, "req-1", search, NOW).decision.allow


def _digest(pdp: _Pdp, run_id: str) -> str:
    return pdp.service.get_run(run_id, NOW).manifest_digest


def test_runs_of_one_grant_each_have_their_own_budget_and_step(pdp: _Pdp) -> None:
    digest = _digest(pdp, pdp.register())
    first, started = pdp.service.start_run(digest, "conversation-1", NOW)
    again, started_again = pdp.service.start_run(digest, "conversation-1", NOW)
    second, _ = pdp.service.start_run(digest, "conversation-2", NOW)
    assert started and not started_again and again.run_id == first.run_id
    assert len({first.run_id, second.run_id}) == 2
    assert pdp.service.decide(first.run_id, "req-1", _model(100), NOW).decision.allow
    step = validate_action("step", "step:answer")
    assert pdp.service.decide(first.run_id, "req-2", step, NOW).decision.allow
    one, two = (pdp.service.get_run(r.run_id, NOW) for r in (first, second))
    assert one.reserved["tokens"] == 100 and two.reserved["tokens"] == 0
    assert (one.step, two.step) == ("answer", "research")
    assert (one.run_key, two.run_key) == ("conversation-1", "conversation-2")
    # The same request id in another run is another request.
    assert pdp.service.decide(second.run_id, "req-1", _model(5), NOW).decision.allow


def test_ending_the_default_run_ends_no_other_run_of_its_grant(pdp: _Pdp) -> None:
    default = pdp.register()
    run, _ = pdp.service.start_run(_digest(pdp, default), "job-7", NOW)
    end = validate_action("step", "step:@completed")
    assert pdp.service.decide(default, "end", end, NOW).decision.allow
    assert pdp.service.get_run(default, NOW).status == "completed"
    assert pdp.service.get_run(run.run_id, NOW).status == "running"
    assert pdp.service.start_run(_digest(pdp, default), "job-8", NOW)[1]


def test_the_budget_gauge_reads_only_the_runs_that_can_still_spend(pdp: _Pdp) -> None:
    old = pdp.register(version=7)
    for n in range(4):  # 4 of the old grant's 500 requests
        assert pdp.service.decide(old, f"old-{n}", _model(), NOW).decision.allow
    digest = _digest(pdp, pdp.register(version=8))  # revokes version 7 and its run
    ended, _ = pdp.service.start_run(digest, "job-ended", NOW)
    for n in range(3):
        assert pdp.service.decide(ended.run_id, f"e-{n}", _model(), NOW).decision.allow
    end = validate_action("step", "step:@completed")
    assert pdp.service.decide(ended.run_id, "end", end, NOW).decision.allow
    live, _ = pdp.service.start_run(digest, "job-live", NOW)
    assert pdp.service.decide(live.run_id, "l-1", _model(), NOW).decision.allow
    assert pdp.service.get_run(old, NOW).status == "revoked"
    assert pdp.service.get_run(ended.run_id, NOW).status == "completed"

    ratio = pdp.registry.get_sample_value("abc_pdp_budget_remaining_ratio", {"budget": "requests"})
    assert ratio == 499 / 500  # the live run's, not the revoked or the ended run's 496


@pytest.mark.parametrize("key", ["", "-leading-dash", "has space", "x" * 129, "naïve", "a\nb"])
def test_a_malformed_run_key_is_refused(pdp: _Pdp, key: str) -> None:
    digest = _digest(pdp, pdp.register())
    with pytest.raises(BadRequest):
        pdp.service.start_run(digest, key, NOW)


def test_a_run_is_started_only_under_a_registered_grant_in_its_window(pdp: _Pdp) -> None:
    with pytest.raises(ManifestUnknown):
        pdp.service.start_run("sha256:" + "0" * 64, "job-1", NOW)
    digest = _digest(pdp, pdp.register())
    with pytest.raises(ManifestUnknown):  # the default run's id prefix, another digest
        pdp.service.start_run(digest[:-4] + "0000", "job-1", NOW)
    with pytest.raises(ManifestExpired):  # expired at 18:00; kept for the hour's retention
        pdp.service.start_run(digest, "job-1", NOW + timedelta(hours=6, minutes=30))
    pdp.register(version=8)  # a newer version of the lineage revokes the older grant
    with pytest.raises(RunClosed):
        pdp.service.start_run(digest, "job-1", NOW)
    with pytest.raises(RunReleased, match="expired"):  # and then released, grant and all
        pdp.service.start_run(digest, "job-1", NOW + timedelta(days=1))


def test_started_runs_and_their_state_come_back_from_the_log(tmp_path: Path) -> None:
    pdp = _Pdp(tmp_path)
    digest = _digest(pdp, pdp.register())
    run, _ = pdp.service.start_run(digest, "conversation-1", NOW)
    assert pdp.service.decide(run.run_id, "req-1", _model(100), NOW).decision.allow
    before = pdp.service.get_run(run.run_id, NOW)
    pdp.log.close()
    restarted = _Pdp(tmp_path)
    restore_from_log(restarted.service, pdp.log_path, LOG_KEY.public_key())
    assert restarted.service.get_run(run.run_id, NOW) == before
    again, started = restarted.service.start_run(digest, "conversation-1", NOW)
    assert again.run_id == run.run_id and not started
    records = read_verified_log(pdp.log_path, LOG_KEY.public_key()).records
    (start,) = [r for r in records if isinstance(r, RunStartRecord)]
    assert (start.run_id, start.run_key, start.manifest_digest) == (
        run.run_id,
        "conversation-1",
        digest,
    )


def test_a_caller_of_another_grant_leaves_the_request_id_to_the_run_after_a_restart(
    tmp_path: Path,
) -> None:
    pdp = _Pdp(tmp_path)
    run_id = pdp.register()
    misbound = pdp.service.decide(run_id, "req-1", _model(), NOW, bound="sha256:" + "0" * 64)
    assert misbound.reason is ReasonCode.RUN_NOT_BOUND
    pdp.log.close()
    restarted = _Pdp(tmp_path)
    restore_from_log(restarted.service, pdp.log_path, LOG_KEY.public_key())
    # As before the restart: the refusal was never the request id's answer.
    assert restarted.service.decide(run_id, "req-1", _model(), NOW).decision.allow


def test_a_key_two_callers_start_at_once_is_logged_once_and_replays_with_its_books(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pdp = _Pdp(tmp_path)
    digest = _digest(pdp, pdp.register())
    # The first caller's start record is slow to write (a busy disk): the second caller
    # arrives meanwhile, and the run's decisions follow its answer.
    writing, written = threading.Event(), threading.Event()
    append = pdp.log.append

    def slow_append(record: Any) -> int:
        if isinstance(record, RunStartRecord) and not writing.is_set():
            writing.set()
            written.wait(0.5)
        return append(record)

    monkeypatch.setattr(pdp.log, "append", slow_append)
    first = threading.Thread(target=pdp.service.start_run, args=(digest, "job-1", NOW))
    first.start()
    assert writing.wait(5)
    run, started = pdp.service.start_run(digest, "job-1", NOW)  # waits for the first
    written.set()
    first.join(5)
    assert not started
    for n in range(3):
        outcome = pdp.service.decide(run.run_id, f"req-{n}", _model(100), NOW)
        pdp.service.report_usage(outcome.reservation_id, 90, 0, NOW)
    before = pdp.service.get_run(run.run_id, NOW)
    assert before.spent["tokens"] == 270
    pdp.log.close()
    records = read_verified_log(pdp.log_path, LOG_KEY.public_key()).records
    assert len([r for r in records if isinstance(r, RunStartRecord)]) == 1
    restarted = _Pdp(tmp_path)
    restore_from_log(restarted.service, pdp.log_path, LOG_KEY.public_key())
    assert restarted.service.get_run(run.run_id, NOW) == before


def test_step_changes_are_logged_in_the_order_they_are_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pdp = _Pdp(tmp_path)
    run_id = pdp.register()
    # The first step change is slow to write (a busy disk); an ending arrives meanwhile.
    writing, written = threading.Event(), threading.Event()
    queue = pdp.log.queue

    def slow_queue(record: Any) -> Queued:
        if isinstance(record, DecisionRecord) and record.step and not writing.is_set():
            writing.set()
            written.wait(0.5)
        return queue(record)

    monkeypatch.setattr(pdp.log, "queue", slow_queue)
    enter = validate_action("step", "step:answer")
    first = threading.Thread(target=pdp.service.decide, args=(run_id, "req-1", enter, NOW))
    first.start()
    assert writing.wait(5)
    end = validate_action("step", "step:@completed")
    assert pdp.service.decide(run_id, "req-2", end, NOW).decision.allow
    written.set()
    first.join(5)
    live = pdp.service.get_run(run_id, NOW)
    assert (live.step, live.completed_steps, live.status) == ("answer", ("research",), "completed")
    pdp.log.close()
    restarted = _Pdp(tmp_path)
    restore_from_log(restarted.service, pdp.log_path, LOG_KEY.public_key())
    assert restarted.service.get_run(run_id, NOW) == live


def test_a_key_started_again_after_its_run_was_released_replays_as_that_fresh_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Released runs are forgotten at once, as they are after 10,000 later releases: the
    # key then starts a fresh run with the same id, and a restart must bring back that one.
    monkeypatch.setattr("pdp.ledger.memory.RELEASED_WINDOW", 0)
    pdp = _Pdp(tmp_path, run_retention=timedelta(0))
    digest = _digest(pdp, pdp.register())
    first = pdp.service.start_run(digest, "conv-1", NOW)[0].run_id
    outcome = pdp.service.decide(first, "req-0", _model(10), NOW)
    pdp.service.report_usage(outcome.reservation_id, 7, 3, NOW)
    assert pdp.service.decide(first, "end", validate_action("step", "step:@completed"), NOW).forward
    later = NOW + timedelta(seconds=1)
    pdp.service.sweep(later)
    fresh, started = pdp.service.start_run(digest, "conv-1", later)
    assert started and fresh.run_id == first
    before = pdp.service.get_run(first, later)
    assert before.status == "running" and not any(before.spent.values())
    pdp.log.close()

    restarted = _Pdp(tmp_path, run_retention=timedelta(0))
    restore_from_log(restarted.service, pdp.log_path, LOG_KEY.public_key())
    restarted.service.sweep(later, limit=1000)  # as abc-pdp does after its replay
    assert restarted.service.get_run(first, later) == before


def test_a_narrowed_run_is_released_after_its_own_shorter_window(tmp_path: Path) -> None:
    pdp = _Pdp(tmp_path, run_retention=timedelta(0))
    digest = _digest(pdp, pdp.register())
    narrower = b'{"metadata": {"expires_at": "2026-11-22T13:00:00Z"}}'  # the grant's: 18:00
    run_id = pdp.service.start_run(digest, "short", NOW, narrower)[0].run_id
    after = datetime(2026, 11, 22, 14, 0, 0, tzinfo=UTC)  # past the run's, not the grant's
    pdp.service.sweep(after)
    with pytest.raises(RunReleased):
        pdp.service.get_run(run_id, after)


def test_a_batch_is_made_durable_with_one_fsync_and_answered_only_once_left(
    pdp: _Pdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = pdp.register()
    synced, syncs = os.fdatasync, []

    def counted(fd: int) -> None:
        syncs.append(fd)
        synced(fd)

    monkeypatch.setattr("pdp.decisionlog.writer.os.fdatasync", counted)
    with pdp.service.batch() as batch:
        held = [batch.decide(run_id, f"req-{n}", _model(100), NOW) for n in range(5)]
        with pytest.raises(RuntimeError, match="before the batch"):
            held[0].outcome  # noqa: B018 - not durable yet: nothing of it may be given
        assert syncs == []
    assert len(syncs) == 1
    assert [h.outcome.decision.allow for h in held] == [True] * 5
    assert len({h.outcome.reservation_id for h in held}) == 5
    assert pdp.store.books(run_id).reserved == Usage(tokens=500, requests=5)
    # Each one's answer is kept: a retry gets the same decision.
    again = pdp.service.decide(run_id, "req-3", _model(100), NOW)
    assert again.decision_id == held[3].outcome.decision_id


def test_a_settlement_answered_pending_is_written_by_the_decision_carrying_it_again(
    pdp: _Pdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``confirm_by_decision``: the batch is settled and answered at once, with no fsync of
    its own; the next decision carries it again, and that decision's one fsync makes both
    durable. Without ``within`` (a store other replicas read) the answer waits for it."""
    servicer = DecisionServicer(pdp.service, clock=lambda: NOW)
    run_id = pdp.register()
    model = pdp_pb2.Action(kind="model", target="model:openai/gpt-4o-mini", max_tokens=100)

    def decide(request_id: str, *carried: pdp_pb2.ReportUsageRequest) -> Any:
        request = pdp_pb2.DecideRequest(
            run_id=run_id, request_id=request_id, action=model, settlements=carried
        )
        return servicer.decide_all([request])[0]

    first, other = decide("req-1"), decide("req-2")
    report = pdp_pb2.ReportUsageRequest(reservation_id=first.reservation_id, tokens=10)
    synced, syncs = os.fdatasync, []

    def counted(fd: int) -> None:
        syncs.append(fd)
        synced(fd)

    monkeypatch.setattr("pdp.decisionlog.writer.os.fdatasync", counted)
    ask = pdp_pb2.ReportUsageBatchRequest(reports=[report], confirm_by_decision=True)
    lazy = servicer.settle(ask, within=0.5)
    assert list(lazy.settled) == [True] and lazy.pending and syncs == []
    assert pdp.store.books(run_id).spent.tokens == 10  # settled at once
    third = decide("req-3", report)
    assert list(third.settled) == [True] and len(syncs) == 1
    late = pdp_pb2.ReportUsageRequest(reservation_id=other.reservation_id, tokens=5)
    asked = pdp_pb2.ReportUsageBatchRequest(reports=[late], confirm_by_decision=True)
    durable = servicer.settle(asked)
    assert list(durable.settled) == [True] and not durable.pending and len(syncs) == 2
    pdp.log.close()
    records = read_verified_log(pdp.log_path, LOG_KEY.public_key()).records
    settled = [r.reservation_id for r in records if isinstance(r, SettlementRecord)]
    assert settled == [first.reservation_id, other.reservation_id]  # each written once


def test_a_batch_whose_commit_fails_refuses_each_and_gives_back_what_they_held(
    pdp: _Pdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = pdp.register()
    _hiccup_once(monkeypatch)
    with pdp.service.batch() as batch:
        held = [batch.decide(run_id, f"req-{n}", _model(100), NOW) for n in range(3)]
    assert [h.outcome.reason for h in held] == [ReasonCode.PDP_UNAVAILABLE] * 3
    assert pdp.store.books(run_id).reserved == Usage()
    # Not kept: once the disk is back the same request id is decided anew, and allowed.
    assert pdp.service.decide(run_id, "req-1", _model(100), NOW).decision.allow
    assert [d.request_id for d in pdp.decisions()] == ["req-1"]


def test_a_request_id_again_in_one_batch_gets_the_first_ones_answer(pdp: _Pdp) -> None:
    """Its claim is held until the batch is answered: the batch commits first, rather than
    wait for itself."""
    run_id = pdp.register()
    with pdp.service.batch() as batch:
        first = batch.decide(run_id, "req-1", _model(100), NOW)
        again = batch.decide(run_id, "req-1", _model(100), NOW)
    assert again.outcome.decision_id == first.outcome.decision_id
    assert pdp.store.books(run_id).reserved == Usage(tokens=100, requests=1)


def test_batches_claiming_the_same_request_ids_in_crossed_order_do_not_stall(pdp: _Pdp) -> None:
    """Each holds one claim the other wants next: neither waits while holding one, so both
    finish at once (not after the store's 10 s in-flight limit), each id decided once."""
    run_id = pdp.register()
    crossed = threading.Barrier(2)
    answers: dict[str, list[str]] = {}

    def batch(first: str, then: str) -> None:
        with pdp.service.batch() as held:
            one = held.decide(run_id, first, _model(100), NOW)
            crossed.wait(5)
            two = held.decide(run_id, then, _model(100), NOW)
        answers[first] = [one.outcome.decision_id, two.outcome.decision_id]

    threads = [
        threading.Thread(target=batch, args=ids) for ids in (("req-x", "req-y"), ("req-y", "req-x"))
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert time.monotonic() - started < 5
    assert answers["req-x"] == answers["req-y"][::-1]  # the same decision for each id
    assert pdp.store.books(run_id).reserved == Usage(tokens=200, requests=2)


def test_a_step_that_fails_in_a_batch_fails_alone(
    pdp: _Pdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = pdp.register()
    keep = pdp.service._ledger.keep

    def keep_but_steps(run: str, request_id: str, action: Any, outcome: Any) -> None:
        if action["kind"] == "step":
            raise RuntimeError("a bug")
        keep(run, request_id, action, outcome)

    monkeypatch.setattr(pdp.service._ledger, "keep", keep_but_steps)
    with pdp.service.batch() as batch:
        before = batch.decide(run_id, "req-1", _model(100), NOW)
        step = batch.decide(run_id, "req-2", validate_action("step", "step:answer"), NOW)
        after = batch.decide(run_id, "req-3", _model(100), NOW)
    with pytest.raises(RuntimeError, match="a bug"):
        step.outcome  # noqa: B018
    assert before.outcome.decision.allow and after.outcome.decision.allow


def test_an_answer_the_store_could_not_keep_is_given_and_never_decided_again(
    pdp: _Pdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durable and charged, so answered; its request id stays claimed, so a retry is
    refused rather than decided and charged a second time."""
    monkeypatch.setattr("pdp.ledger.memory._IN_FLIGHT_SECONDS", 0.2)
    run_id = pdp.register()

    def unkept(*args: Any) -> None:
        raise StoreUnavailable("the store went away")

    keep = pdp.service._ledger.keep
    monkeypatch.setattr(pdp.service._ledger, "keep", unkept)
    assert pdp.service.decide(run_id, "req-1", _model(100), NOW).decision.allow
    monkeypatch.setattr(pdp.service._ledger, "keep", keep)
    retried = pdp.service.decide(run_id, "req-1", _model(100), NOW)
    assert retried.reason is ReasonCode.PDP_UNAVAILABLE
    assert pdp.store.books(run_id).reserved == Usage(tokens=100, requests=1)


def test_a_batch_that_may_not_wait_refuses_a_request_id_decided_elsewhere_at_once(
    pdp: _Pdp,
) -> None:
    """A sidecar's decisions share one connection: one waiting for another's request id
    would hold up all those behind it."""
    run_id = pdp.register()
    assert pdp.store.claim(run_id, "req-1") is None  # being decided elsewhere, and stuck
    started = time.monotonic()
    with pdp.service.batch(wait_for_claims=False) as batch:
        stuck = batch.decide(run_id, "req-1", _model(100), NOW)
        other = batch.decide(run_id, "req-2", _model(100), NOW)
    assert time.monotonic() - started < 1  # not the store's 10 s in-flight limit
    assert stuck.outcome.reason is ReasonCode.PDP_UNAVAILABLE
    assert other.outcome.decision.allow
