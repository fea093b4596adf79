"""Run a bundle's Rego unit tests (rules named ``test_*``) with the production engine.

Every ``test_`` rule of every module is evaluated as a document and must be ``true``;
undefined, false or an error fails it. The tests run in the same engine, with the same
strict builtin errors, as the decisions they vouch for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pdp.bundle import PolicyBundle
from pdp.engine.decision import EngineError
from pdp.engine.rego import compile_modules
from pdp.opa import OpaError

__all__ = ["TestOutcome", "run_policy_tests"]

_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z0-9_.]+)", re.MULTILINE)
_TEST_RULE = re.compile(r"^(test_[A-Za-z0-9_]+)\s*(?:if\b|\{|:=|=)", re.MULTILINE)


@dataclass(frozen=True)
class TestOutcome:
    name: str  # package.rule
    passed: bool
    detail: str = ""


def _discover(bundle: PolicyBundle) -> list[str]:
    """``package.rule`` of every test rule, in file order."""
    found: list[str] = []
    for source in bundle.rego_modules().values():
        package = _PACKAGE.search(source)
        if package is None:
            continue
        found.extend(
            f"{package.group(1)}.{name}" for name in dict.fromkeys(_TEST_RULE.findall(source))
        )
    return found


def _data(bundle: PolicyBundle) -> dict[str, Any]:
    document = bundle.files.get("data.json")
    return json.loads(document) if document else {}


def run_policy_tests(bundle: PolicyBundle) -> list[TestOutcome]:
    """Evaluate every test rule; an empty list means the bundle has no tests."""
    tests = _discover(bundle)
    if not tests:
        return []
    try:
        engine = compile_modules(bundle.rego_modules(), _data(bundle))
    except EngineError as exc:
        return [TestOutcome("(compile)", False, str(exc))]
    outcomes = []
    try:
        for name in tests:
            try:
                result = engine.eval_document(name)
            except OpaError as exc:
                outcomes.append(TestOutcome(name, False, f"{exc.code}: {exc.message[:200]}"))
                continue
            passed = result is True
            detail = "" if passed else f"result: {json.dumps(result)[:200]}"
            outcomes.append(TestOutcome(name, passed, detail))
    finally:
        engine.close()
    return outcomes
