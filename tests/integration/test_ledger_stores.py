"""One contract, two run stores: in-process, and a real redis-server on loopback."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import redis

from pdp.errors import ManifestRollback, ManifestUnknown, RunClosed, StoreUnavailable
from pdp.ledger import ClaimInFlight, Fleet, MemoryRunStore, RunStore, Usage
from pdp.ledger.redis import RedisRunStore
from tests.harness import RedisProcess, free_port

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=10)
LIMITS = Usage(tokens=1000, usd_micros=500, tool_calls=3, requests=10)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, redis_server: RedisProcess) -> Iterator[RunStore]:
    if request.param == "memory":
        yield MemoryRunStore()
        return
    # A prefix per test: tests share the server, never each other's keys.
    shared = RedisRunStore(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield shared
    shared.close()


def opened(
    store: RunStore, limits: Usage = LIMITS, lineage: str = "acme/a", version: int = 1
) -> str:
    run_id = "run_" + uuid.uuid4().hex
    store.open(run_id, "research", Usage(**limits.as_dict()), lineage, version)
    return run_id


def test_open_is_idempotent_and_starts_at_the_first_step(store: RunStore) -> None:
    run_id = opened(store)
    assert store.move(run_id, "research", "answer")
    store.open(run_id, "research", LIMITS, "acme/a", 1)  # registering again resets nothing
    state = store.state(run_id, "acme/a")
    assert (state.step, state.completed_steps, state.outcome) == ("answer", ("research",), "")
    assert store.books(run_id).limits == LIMITS


def test_move_is_a_compare_and_set_and_an_ending_is_final(store: RunStore) -> None:
    run_id = opened(store)
    assert not store.move(run_id, "answer", "publish")  # not where the caller saw it
    assert store.move(run_id, "research", "answer")
    assert not store.move(run_id, "research", "answer")  # the second of two racers loses
    assert store.move(run_id, "answer", "answer", outcome="completed")
    assert not store.move(run_id, "answer", "publish")
    assert not store.move(run_id, "answer", "answer", outcome="failed")
    state = store.state(run_id, "acme/a")
    assert (state.step, state.completed_steps, state.outcome) == (
        "answer",
        ("research",),
        "completed",
    )


def test_a_newer_version_of_the_lineage_shows_in_the_older_runs_state(store: RunStore) -> None:
    old = opened(store, lineage="acme/versions", version=1)
    assert store.state(old, "acme/versions").latest_version == 1
    opened(store, lineage="acme/versions", version=3)
    opened(store, lineage="acme/versions", version=2)  # a late, lower one lowers nothing
    assert store.state(old, "acme/versions").latest_version == 3


def test_reserve_holds_every_budget_or_nothing(store: RunStore) -> None:
    run_id = opened(store)
    assert store.reserve(run_id, "rsv_a", Usage(tokens=600, tool_calls=1, requests=1), LATER)
    assert not store.reserve(run_id, "rsv_b", Usage(tokens=401, requests=1), LATER)
    assert not store.reserve(run_id, "rsv_c", Usage(tool_calls=3, requests=1), LATER)
    assert store.reserve(run_id, "rsv_d", Usage(tokens=400, tool_calls=2, requests=1), LATER)
    books = store.books(run_id)
    assert books.reserved == Usage(tokens=1000, tool_calls=3, requests=2)
    assert books.remaining() == Usage(tokens=0, usd_micros=500, tool_calls=0, requests=8)


def test_a_move_is_undone_only_where_it_left_the_run(store: RunStore) -> None:
    run_id = opened(store)
    assert store.move(run_id, "research", "answer")
    store.unmove(run_id, "research", "answer")
    state = store.state(run_id, "acme/a")
    assert (state.step, state.completed_steps) == ("research", ())
    assert store.move(run_id, "research", "answer") and store.move(run_id, "answer", "publish")
    store.unmove(run_id, "research", "answer")  # moved on since: nothing to undo
    assert store.state(run_id, "acme/a").step == "publish"


def test_an_ended_run_holds_nothing_more(store: RunStore) -> None:
    """A decision that passed its running check before another request ended the run
    reserves nothing: a hold on an ended run would be dropped by its release uncharged."""
    run_id = opened(store)
    assert store.move(run_id, "research", "research", outcome="completed")
    for force in (False, True):  # a shadow run's forced hold too
        with pytest.raises(RunClosed):
            store.reserve(run_id, f"rsv_{force}", Usage(tokens=10, requests=1), LATER, force)
    assert store.books(run_id).reserved == Usage()
    # Read back from the log, a hold made before an ending another decision logged first.
    assert store.reserve(run_id, "rsv_logged", Usage(tokens=10), LATER, True, replayed=True)
    assert store.books(run_id).reserved == Usage(tokens=10)


def test_settle_charges_the_real_usage_once(store: RunStore) -> None:
    run_id = opened(store)
    assert store.reserve(run_id, "rsv_a", Usage(tokens=600, tool_calls=1, requests=1), LATER)
    assert store.settle("rsv_a", 120, 30) == run_id
    assert store.settle("rsv_a", 120, 30) is None  # already settled: never charged twice
    assert store.settle("rsv_unknown", 1, 1) is None
    books = store.books(run_id)
    assert books.spent == Usage(tokens=120, usd_micros=30, tool_calls=1, requests=1)
    assert books.reserved == Usage()


def test_release_gives_the_reservation_back_uncharged(store: RunStore) -> None:
    run_id = opened(store)
    assert store.reserve(run_id, "rsv_a", Usage(tokens=1000, requests=1), LATER)
    store.release("rsv_a")
    assert store.books(run_id).spent == Usage() and store.books(run_id).reserved == Usage()
    assert store.settle("rsv_a", 5, 5) is None


def test_an_exhausted_money_budget_refuses(store: RunStore) -> None:
    run_id = opened(store)
    assert store.reserve(run_id, "rsv_a", Usage(tokens=10, requests=1), LATER)
    assert store.settle("rsv_a", 10, 500) == run_id  # the money is known only afterwards
    assert not store.reserve(run_id, "rsv_b", Usage(tokens=10, requests=1), LATER)


def test_expired_reservations_settle_at_their_worst_case(store: RunStore) -> None:
    run_id = opened(store)
    store.reserve(run_id, "rsv_old", Usage(tokens=300, tool_calls=1, requests=1), NOW)
    store.reserve(run_id, "rsv_new", Usage(tokens=100, requests=1), LATER)
    assert store.expire(run_id, NOW) == [("rsv_old", Usage(300, 0, 1, 1))]
    assert store.expire(run_id, NOW) == []
    books = store.books(run_id)
    assert books.spent == Usage(300, 0, 1, 1) and books.reserved == Usage(100, 0, 0, 1)
    assert store.settle("rsv_old", 1, 1) is None


def test_large_budgets_stay_exact(store: RunStore) -> None:
    # Lua prints a large number as 1e+15; amounts must travel as exact integers.
    big = Usage(tokens=10**15 + 7, usd_micros=10**15 + 3, tool_calls=1, requests=1)
    run_id = opened(store, limits=big)
    assert store.reserve(run_id, "rsv_a", Usage(tokens=10**15 + 1, requests=1), LATER)
    assert store.settle("rsv_a", 10**15 + 1, 10**15 + 1) == run_id
    assert store.books(run_id).remaining() == Usage(6, 2, 1, 0)


def test_concurrent_reservations_never_overspend(store: RunStore) -> None:
    run_id = opened(store, limits=Usage(tokens=10**6, usd_micros=1, tool_calls=100, requests=100))
    with ThreadPoolExecutor(max_workers=8) as pool:
        granted = list(
            pool.map(
                lambda i: store.reserve(run_id, f"rsv_{i}", Usage(tool_calls=1, requests=1), LATER),
                range(300),
            )
        )
    assert granted.count(True) == 100
    assert store.books(run_id).remaining().requests == 0


def test_a_request_id_is_answered_once_and_a_duplicate_waits_for_it(store: RunStore) -> None:
    run_id = opened(store)
    assert store.claim(run_id, "req-1") is None  # first: decide it
    seen: list[object] = []
    waiter = threading.Thread(target=lambda: seen.append(store.claim(run_id, "req-1")))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive()  # the duplicate waits while the first is in flight
    store.answer(run_id, "req-1", {"decision_id": "dec_1", "allow": True})
    waiter.join(timeout=5)
    assert seen == [{"decision_id": "dec_1", "allow": True}]
    assert store.claim(run_id, "req-1") == {"decision_id": "dec_1", "allow": True}


def test_a_duplicate_whose_first_decision_never_ends_is_refused_not_decided_again(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pdp.ledger.memory._IN_FLIGHT_SECONDS", 0.3)
    monkeypatch.setattr("pdp.ledger.redis._IN_FLIGHT_MS", 300)
    run_id = opened(store)
    assert store.claim(run_id, "req-1") is None  # decided, and stuck (a disk that hangs)

    # Other answers of the run meanwhile do not reset the wait.
    def answer_others() -> None:
        for i in range(40):
            time.sleep(0.02)
            store.answer(run_id, f"other-{i}", {"n": i})

    busy = threading.Thread(target=answer_others)
    busy.start()
    with pytest.raises(StoreUnavailable, match="still under way"):
        store.claim(run_id, "req-1")  # not claimed again: it would be charged twice
    busy.join()
    store.answer(run_id, "req-1", {"decision_id": "dec_1", "allow": True})
    assert store.claim(run_id, "req-1") == {"decision_id": "dec_1", "allow": True}


def test_a_duplicate_whose_first_decision_was_unclaimed_decides(store: RunStore) -> None:
    run_id = opened(store)
    assert store.claim(run_id, "req-1") is None
    seen: list[object] = []
    waiter = threading.Thread(target=lambda: seen.append(store.claim(run_id, "req-1")))
    waiter.start()
    waiter.join(timeout=0.2)
    store.unclaim(run_id, "req-1")  # the first was not kept (an outage): the next decides
    waiter.join(timeout=5)
    assert seen == [None]


def test_redis_due_runs_are_leased_until_released(
    redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pdp.ledger.redis._DUE_LEASE_MS", 200)
    store = RedisRunStore(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    first, second = opened(store), opened(store)
    store.schedule(first, NOW)
    store.schedule(second, LATER)
    store.schedule(second, NOW)  # an ending's earlier time wins
    store.schedule(first, LATER)  # a later one changes nothing
    assert sorted(store.due_runs(NOW, 10)) == sorted([first, second])
    assert store.due_runs(NOW, 10) == []  # taken: each goes to one caller
    store.release_run(first, "completed")
    # The one taken but never released (its taker failed or died) is taken again later.
    assert store.due_runs(NOW + timedelta(seconds=1), 10) == [second]


def test_unknown_runs_are_refused(store: RunStore) -> None:
    with pytest.raises(ManifestUnknown):
        store.state("run_nope", "acme/a")
    with pytest.raises(ManifestUnknown):
        store.reserve("run_nope", "rsv_a", Usage(requests=1), LATER)
    with pytest.raises(ManifestUnknown):
        store.move("run_nope", "research", "answer")


# ---- Redis only -----------------------------------------------------------------------


def test_redis_rollback_marks_are_shared(redis_server: RedisProcess) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    replica_a = RedisRunStore(redis_server.url, prefix=prefix)
    replica_b = RedisRunStore(redis_server.url, prefix=prefix)
    replica_a.admit("acme/a", 2, "sha256:two")
    replica_b.admit("acme/a", 2, "sha256:two")  # the same manifest again is no rollback
    with pytest.raises(ManifestRollback):
        replica_b.admit("acme/a", 1, "sha256:one")
    with pytest.raises(ManifestRollback):
        replica_b.admit("acme/a", 2, "sha256:other")
    replica_b.admit("acme/a", 3, "sha256:three")
    with pytest.raises(ManifestRollback):
        replica_a.admit("acme/a", 2, "sha256:two")


def test_redis_envelopes_are_kept_for_other_replicas(redis_server: RedisProcess) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    RedisRunStore(redis_server.url, prefix=prefix).put_envelope("run_x", b'{"payload": 1}')
    assert RedisRunStore(redis_server.url, prefix=prefix).envelope("run_x") == b'{"payload": 1}'
    assert RedisRunStore(redis_server.url, prefix=prefix).envelope("run_y") is None


def test_a_released_grant_takes_its_fleet_books_and_envelope_with_it(
    store: RunStore, redis_server: RedisProcess
) -> None:
    grant = "run_" + uuid.uuid4().hex
    store.open_fleet(grant, Fleet(Usage(**LIMITS.as_dict()), runs=2))
    store.open(grant, "research", LIMITS, "acme/g", 1, fleet=grant)
    store.put_envelope(grant, b'{"payload": 1}')
    run = "run_" + uuid.uuid4().hex
    store.open(
        run, "research", LIMITS, "acme/g", 1, (grant, "job-1", ""), grant, (NOW, LATER, False)
    )
    assert store.reserve(run, "rsv_a", Usage(tokens=100, requests=1), LATER)
    assert store.reserve(run, "rsv_b", Usage(tokens=100, requests=1), LATER)
    store.release_run(grant, "expired")  # a replica that held no run of it any more
    assert store.released(grant) == "expired"
    assert store.fleet_books(grant) is None and store.envelope(grant) is None
    # A run of it settled, expired and released late, elsewhere, leaves no books behind.
    assert store.settle("rsv_a", 40, 0) == run
    assert [rid for rid, _ in store.expire(run, LATER)] == ["rsv_b"]
    store.release_run(run, "expired")
    assert store.fleet_books(grant) is None
    if isinstance(store, RedisRunStore):  # no key of the grant's is left in Redis
        assert redis.Redis.from_url(redis_server.url).keys(f"*{grant}*") == []


def test_an_unreachable_redis_is_store_unavailable() -> None:
    store = RedisRunStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(StoreUnavailable):
        store.ping()
    with pytest.raises(StoreUnavailable):
        store.reserve("run_x", "rsv_a", Usage(requests=1), LATER)


def test_a_forced_reservation_is_held_and_says_it_did_not_fit(store: RunStore) -> None:
    run_id = opened(store, limits=Usage(tokens=100, usd_micros=5, tool_calls=1, requests=1))
    assert store.reserve(run_id, "rsv_a", Usage(tool_calls=1, requests=1), LATER, force=True)
    assert not store.reserve(run_id, "rsv_b", Usage(tool_calls=1, requests=1), LATER, force=True)
    assert store.books(run_id).remaining() == Usage(100, 5, -1, -1)  # shadow over-spend shows
    assert store.settle("rsv_b", 0, 0) == run_id


def test_an_unclaimed_request_id_is_decided_anew_without_waiting(store: RunStore) -> None:
    run_id = opened(store)
    assert store.claim(run_id, "req-1") is None
    store.unclaim(run_id, "req-1")  # e.g. the answer was pdp_unavailable: not kept
    assert store.claim(run_id, "req-1") is None  # at once, not after the in-flight wait
    store.answer(run_id, "req-1", {"decision_id": "dec_2"})
    store.unclaim(run_id, "req-1")  # an answer is never dropped
    assert store.claim(run_id, "req-1") == {"decision_id": "dec_2"}


def test_a_charge_that_overflows_writes_nothing(redis_server: RedisProcess) -> None:
    # The PDP bounds reports (MAX_REPORTED); the script still leaves no half-taken reservation.
    store = RedisRunStore(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    run_id = opened(store)
    for rid in ("rsv_a", "rsv_b"):
        assert store.reserve(run_id, rid, Usage(tokens=10, tool_calls=1, requests=1), LATER)
    assert store.settle("rsv_a", 2**62, 0) == run_id
    with pytest.raises(StoreUnavailable):  # 2^62 + 2^62 overflows the counter
        store.settle("rsv_b", 2**62, 0)
    books = store.books(run_id)
    assert books.reserved == Usage(tokens=10, tool_calls=1, requests=1)  # rsv_b still held
    assert books.spent == Usage(tokens=2**62, tool_calls=1, requests=1)
    assert store.settle("rsv_b", 1, 0) == run_id  # and can still be settled


def test_answers_are_kept_for_a_bounded_window_of_request_ids(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The window is what bounds memory: patched small so the test writes tens, not 10,000.
    monkeypatch.setattr("pdp.ledger.memory.ANSWER_WINDOW", 5)
    monkeypatch.setattr("pdp.ledger.redis.ANSWER_WINDOW", 5)
    run_id = opened(store)
    for i in range(8):
        assert store.claim(run_id, f"r{i}") is None
        store.answer(run_id, f"r{i}", {"n": i})
    assert [store.claim(run_id, f"r{i}") for i in range(3, 8)] == [{"n": i} for i in range(3, 8)]
    # The oldest fell out of the window: a retry of one is decided anew.
    assert store.claim(run_id, "r0") is None
    store.unclaim(run_id, "r0")


def test_settled_reservations_do_not_pile_up_in_the_expiry_heap() -> None:
    store = MemoryRunStore()
    run_id = opened(store, limits=Usage(tokens=10**9, usd_micros=10**9, tool_calls=10**9,
                                        requests=10**9))  # fmt: skip
    for i in range(10_000):
        assert store.reserve(run_id, f"rsv{i}", Usage(tool_calls=1, requests=1), LATER)
        assert store.settle(f"rsv{i}", 0, 0) == run_id
    # Every reservation was settled long before it could expire: the heap must not keep
    # 10,000 dead entries until then.
    assert len(store._runs[run_id].expiries) <= 2048


def test_a_claim_that_may_not_wait_says_so_and_one_that_waited_before_never_takes_a_lapsed_mark(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch holding claims claims without waiting (``ClaimInFlight``), answers what it
    holds, then claims again as one that waited: a mark that lapsed meanwhile (a replica
    stuck or gone) is refused, not decided and charged a second time."""
    monkeypatch.setattr("pdp.ledger.memory._IN_FLIGHT_SECONDS", 0.3)
    monkeypatch.setattr("pdp.ledger.redis._IN_FLIGHT_MS", 300)
    run_id = opened(store)
    assert store.claim(run_id, "req-1") is None  # being decided elsewhere
    started = time.monotonic()
    with pytest.raises(ClaimInFlight):
        store.claim(run_id, "req-1", wait=False)
    assert time.monotonic() - started < 0.1  # at once
    time.sleep(0.4)  # the first one's mark lapses, unanswered
    with pytest.raises(StoreUnavailable, match="still under way"):
        store.claim(run_id, "req-1", waited=True)
