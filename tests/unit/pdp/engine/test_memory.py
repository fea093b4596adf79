"""Memory stays flat however many distinct decisions the engine makes.

regopy leaked ~23 KB per evaluation (230 MB over the 10,000 below); OPA's engine and the
bounded decision cache must not grow. RSS is read from /proc, after a warm-up that fills
the cache, so the figure measures growth, not start-up.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from pdp.bundle import load_bundle
from pdp.engine import PreparedPolicy, policy_data
from pdp.engine.rego import CACHE_LIMIT
from pdp.manifest.model import Manifest
from tests.factories import manifest_document

POLICIES = Path(__file__).resolve().parents[4] / "policies"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_rss_is_flat_over_distinct_decisions() -> None:
    bundle = load_bundle(POLICIES)
    manifest = Manifest.model_validate_json(json.dumps(manifest_document()))
    policy = PreparedPolicy(bundle.rego_modules(), policy_data(manifest), bundle.digest, "m")

    def decide(i: int) -> None:
        query = f"distinct query {i} é\x00"
        policy_input = {
            "action": {"kind": "tool", "target": "tool:kb/search", "args": {"query": query}},
            "run": {"step": "research", "completed_steps": []},
        }
        assert policy.evaluate(policy_input).allow

    warm_up = CACHE_LIMIT + 1000  # the cache is full from here on
    for i in range(warm_up):
        decide(i)
    gc.collect()
    warm = rss_bytes()
    for i in range(warm_up, warm_up + 10_000):
        decide(i)
    gc.collect()
    grown = rss_bytes() - warm
    assert grown < 0.2 * warm, f"RSS grew {grown / 2**20:.1f} MB over 10,000 decisions"
