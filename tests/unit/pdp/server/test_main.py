"""abc-pdp's start-up compile check (the policy meets the data shape a manifest gives it),
and its stop on a signal."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from pdp.bundle import load_bundle
from pdp.engine.rego import compile_modules
from pdp.errors import ConfigError
from pdp.server.main import check_bundle_compiles, stop_on_signal

POLICIES = Path(__file__).resolve().parents[4] / "policies"
# The data the check used to compile with, a shape policy_data no longer produces.
_OLD_EMPTY = {
    "abc": {"manifest": {}, "index": {"models": {}, "tools": {}, "http": {}, "steps": {}}}
}


def test_the_shipped_bundle_passes() -> None:
    check_bundle_compiles(load_bundle(POLICIES))


def test_a_policy_failing_only_with_the_real_data_shape_stops_start_up(tmp_path: Path) -> None:
    bundle_dir = tmp_path / "policies"
    bundle_dir.mkdir()
    for rego in POLICIES.rglob("*.rego"):
        (bundle_dir / rego.name).write_bytes(rego.read_bytes())
    # A rule where policy_data puts the manifest's index: a conflict OPA reports at compile.
    (bundle_dir / "clash.rego").write_text("package abc.index\n\ntargets := {}\n")
    bundle = load_bundle(bundle_dir)
    compile_modules(bundle.rego_modules(), _OLD_EMPTY).close()  # the old check let it through
    with pytest.raises(ConfigError, match="conflicting rule"):
        check_bundle_compiles(bundle)


def test_a_signal_landing_while_the_wait_holds_the_events_lock_still_stops() -> None:
    """Where the main thread is when SIGTERM's handler runs inside ``stop.wait``: holding
    the event's own lock. Setting the event there directly never returned."""
    stop = threading.Event()
    on_signal = stop_on_signal(stop)
    handled = threading.Event()

    def main_thread() -> None:
        with stop._cond:  # type: ignore[attr-defined]  # the lock Event.wait holds
            on_signal(signal.SIGTERM, None)
        handled.set()

    threading.Thread(target=main_thread, daemon=True).start()
    assert handled.wait(5), "the handler blocked on the lock its own thread holds"
    assert stop.wait(5)
