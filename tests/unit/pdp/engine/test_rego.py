"""PreparedPolicy: compiled once, evaluated safely from many threads, failing closed."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from pdp.bundle import load_bundle
from pdp.engine import EngineError, PreparedPolicy, policy_data
from pdp.manifest.model import Manifest
from tests.factories import manifest_document

POLICIES = Path(__file__).resolve().parents[4] / "policies"


def prepared(tools: int = 5) -> PreparedPolicy:
    document = manifest_document()
    document["capabilities"]["tools"] = [
        {"server": "s", "name": f"t{i}", "args": {"q": {"type": "string", "maxLength": 5}}}
        for i in range(tools)
    ]
    document["assembly"]["steps"] = [
        {"id": "work", "uses": [f"tool:s/t{i}" for i in range(tools)]},
        {"id": "later", "uses": ["model:openai/gpt-4o-mini"], "after": ["work"]},
    ]
    manifest = Manifest.model_validate_json(json.dumps(document))
    bundle = load_bundle(POLICIES)
    return PreparedPolicy(bundle.rego_modules(), policy_data(manifest), bundle.digest, "m")


def tool_input(name: str, query: str, step: str = "work") -> dict[str, Any]:
    return {
        "action": {"kind": "tool", "target": f"tool:s/{name}", "args": {"q": query}},
        "run": {"step": step, "completed_steps": []},
    }


def test_every_target_is_found_through_the_index() -> None:
    policy = prepared(300)
    for i in range(300):
        assert policy.evaluate(tool_input(f"t{i}", "ok")).allow, f"t{i}"
    assert not policy.evaluate(tool_input("t300", "ok")).allow


def test_a_refused_name_is_explained_by_its_closest_allowed_names() -> None:
    # Found through the prefix table with a bounded number of lookups, at any size.
    policy = prepared(300)
    refused = policy.evaluate(tool_input("t29x", "ok"))
    assert refused.reasons[0].evidence["closest"] == ["tool:s/t29", "tool:s/t290", "tool:s/t291"]
    assert policy.evaluate(tool_input("zz", "ok")).reasons[0].evidence["closest"] == []
    step = {"kind": "step", "target": "step:latr"}
    late = policy.evaluate({"action": step, "run": {"step": "work", "completed_steps": []}})
    assert late.reasons[0].evidence["closest"] == ["step:later"]


def test_capability_outside_the_step_is_refused() -> None:
    decision = prepared().evaluate(tool_input("t1", "ok", step="later"))
    assert [r.code.value for r in decision.reasons] == ["step_out_of_order"]


def test_threads_never_see_each_others_input() -> None:
    """Threads take engines from the pool one at a time: none decides on another's input."""
    policy = prepared()
    wrong: list[int] = []

    def worker(offset: int) -> None:
        for i in range(300):
            allowed = (i + offset) % 2 == 0
            # Unique queries: every call evaluates instead of hitting the cache.
            query = f"{i % 10}" if allowed else f"{i}-too-long-{offset}"
            if policy.evaluate(tool_input("t1", query)).allow != allowed:
                wrong.append(i)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_a_builtin_error_stops_the_decision_instead_of_passing_it() -> None:
    # Undefined would make `not regex.match` true and allow: a builtin error must stop it.
    module = """
package abc.authz
import rego.v1
default decision := {"allow": false, "reasons": [{"code": "bad_request", "message": "m"}],
    "obligations": {}}
decision := {"allow": true, "reasons": [], "obligations": {}} if {
    not regex.match(input.action.pattern, input.action.target)
}
"""
    policy = PreparedPolicy({"abc/authz.rego": module}, {}, "p", "m")
    with pytest.raises(EngineError):
        policy.evaluate({"action": {"target": "x", "pattern": "(unclosed"}})


def test_a_policy_that_does_not_compile_is_refused() -> None:
    with pytest.raises(EngineError, match=r"authz\.rego"):
        PreparedPolicy({"abc/authz.rego": "package abc.authz\ndecision := {\n"}, {}, "p", "m")


def test_undefined_decision_is_an_engine_error() -> None:
    policy = PreparedPolicy({"abc/authz.rego": "package abc.authz\n"}, {}, "p", "m")
    with pytest.raises(EngineError):
        policy.evaluate({"action": {}})
