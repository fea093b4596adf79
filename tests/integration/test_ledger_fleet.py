"""Fleet books and released runs, one contract for both run stores: in-process, and a real
redis-server on loopback (the ``store`` fixture of test_ledger_stores)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import pytest

from pdp.errors import FleetRunsExhausted, ManifestUnknown
from pdp.ledger import UNLIMITED, Fleet, RunStore, Usage
from tests.integration import test_ledger_stores as contract
from tests.integration.test_ledger_stores import LATER, LIMITS, NOW

store = contract.store  # the same two stores, here for fleet books

FLEET = Usage(tokens=UNLIMITED, usd_micros=UNLIMITED, tool_calls=UNLIMITED, requests=5)


def grant(store: RunStore, fleet: Fleet) -> str:
    grant_id = "run_" + uuid.uuid4().hex
    store.open_fleet(grant_id, fleet)
    store.open_fleet(grant_id, Fleet(Usage(), runs=1))  # opening again changes nothing
    assert store.open(grant_id, "research", LIMITS, "acme/a", 1, fleet=grant_id)
    return grant_id


def run_of(
    store: RunStore,
    grant_id: str,
    now: datetime = NOW,
    until: datetime = LATER,
    force: bool = False,
) -> str:
    run_id = "run_" + uuid.uuid4().hex
    slot = (now, until, force)
    store.open(run_id, "research", LIMITS, "acme/a", 1, (grant_id, run_id, ""), grant_id, slot)
    return run_id


def live_runs(store: RunStore, grant_id: str) -> int:
    _, live = store.fleet_books(grant_id) or pytest.fail("no fleet books")
    return live


def test_a_fleet_budget_holds_across_runs_and_settles_on_both_books(store: RunStore) -> None:
    fleet_id = grant(store, Fleet(FLEET))
    one, two = run_of(store, fleet_id), run_of(store, fleet_id)
    call = Usage(tokens=10, requests=1)
    assert store.reserve(one, "rsv_1", call, LATER)
    assert store.reserve(two, "rsv_2", call, LATER)
    assert store.reserve(fleet_id, "rsv_3", call, LATER)  # the default run counts too
    assert store.reserve(one, "rsv_4", call, LATER)
    assert store.reserve(two, "rsv_5", call, LATER)
    assert not store.reserve(two, "rsv_6", call, LATER)  # run two has room, the fleet not
    assert store.books(two).reserved.requests == 2  # nothing held by the refusal
    store.release("rsv_5")
    assert store.settle("rsv_1", tokens=7, usd_micros=3) == one
    assert store.expire(two, LATER) == [("rsv_2", call)]
    books, live = store.fleet_books(fleet_id) or pytest.fail("no fleet books")
    assert books.spent == Usage(tokens=17, usd_micros=3, requests=2)
    assert books.reserved == Usage(tokens=20, requests=2)
    assert live == 0  # runs at once are not limited: no slot is taken
    assert store.reserve(two, "rsv_7", call, LATER)  # the released request came back
    assert store.fleet_books("run_" + uuid.uuid4().hex) is None


def test_concurrent_runs_never_pass_the_fleet_total(store: RunStore) -> None:
    fleet_id = grant(store, Fleet(FLEET))
    runs = [run_of(store, fleet_id) for _ in range(8)]

    def attempt(n: int) -> bool:
        return store.reserve(runs[n % 8], f"rsv_{n}", Usage(requests=1), LATER)

    with ThreadPoolExecutor(16) as pool:
        held = sum(pool.map(attempt, range(64)))
    assert held == 5
    books, _ = store.fleet_books(fleet_id) or pytest.fail("no fleet books")
    assert books.reserved.requests == 5


def test_runs_at_once_are_refused_at_the_limit_and_freed_by_an_ending_or_expiry(
    store: RunStore,
) -> None:
    fleet_id = grant(store, Fleet(FLEET, runs=2))
    first = run_of(store, fleet_id)
    run_of(store, fleet_id, until=NOW + timedelta(minutes=1))
    with pytest.raises(FleetRunsExhausted, match="2 runs at once"):
        run_of(store, fleet_id)
    assert store.move(first, "research", "research", outcome="completed")
    third = run_of(store, fleet_id)  # the ending freed a slot
    with pytest.raises(FleetRunsExhausted):
        run_of(store, fleet_id)
    run_of(store, fleet_id, now=NOW + timedelta(minutes=2))  # the second expired: its slot
    run_of(store, fleet_id, force=True)  # replaying a start that was admitted: never refused
    assert live_runs(store, fleet_id) == 3
    store.release_run(third, "failed")
    assert live_runs(store, fleet_id) == 2


def test_a_released_run_is_gone_but_remembered_and_its_holds_leave_the_fleet(
    store: RunStore,
) -> None:
    fleet_id = grant(store, Fleet(FLEET))
    run_id = run_of(store, fleet_id)
    assert store.reserve(run_id, "rsv_r", Usage(requests=1), LATER)
    store.claim(run_id, "req-1")
    store.answer(run_id, "req-1", {"answer": 1})
    store.release_run(run_id, "completed")
    with pytest.raises(ManifestUnknown):
        store.books(run_id)
    assert store.released(run_id) == "completed"
    assert store.settle("rsv_r", 1, 1) is None  # its reservation went with it
    books, _ = store.fleet_books(fleet_id) or pytest.fail("no fleet books")
    assert books.reserved == Usage()
    forgotten = run_of(store, fleet_id)
    store.release_run(forgotten, "")  # a start the log could not record: not remembered
    assert store.released(forgotten) is None
    store.release_run(run_id, "failed")  # already released: nothing changes
    assert store.released(run_id) == "completed"


def test_released_runs_are_remembered_within_a_bounded_window(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pdp.ledger.memory.RELEASED_WINDOW", 3)
    monkeypatch.setattr("pdp.ledger.redis.RELEASED_WINDOW", 3)
    fleet_id = grant(store, Fleet(FLEET))
    runs = [run_of(store, fleet_id) for _ in range(5)]
    for run_id in runs:
        store.release_run(run_id, "completed")
    assert [store.released(r) for r in runs] == [None, None, *["completed"] * 3]


def test_an_answer_for_a_run_released_while_deciding_is_not_kept(store: RunStore) -> None:
    fleet_id = grant(store, Fleet(FLEET))
    run_id = run_of(store, fleet_id)
    assert store.claim(run_id, "req-1") is None
    store.release_run(run_id, "completed")
    store.answer(run_id, "req-1", {"answer": 1})  # nothing to keep it in, nothing raised
    store.unclaim(run_id, "req-1")
    try:
        kept = store.claim(run_id, "req-1")  # Redis marks it again, memory has no run
    except ManifestUnknown:
        kept = None
    assert kept is None
