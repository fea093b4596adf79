"""Run a bundle's Rego unit tests (rules named ``test_*``); regopy has no runner of its own.

Every ``test_`` rule of every module is built as an entrypoint and must evaluate to
``true``; undefined, false or an error fails it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from regopy import Interpreter, LogLevel, RegoError

from pdp.bundle import PolicyBundle
from pdp.engine.errors import summarize_rego_error

__all__ = ["TestOutcome", "run_policy_tests"]

_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z0-9_.]+)", re.MULTILINE)
_TEST_RULE = re.compile(r"^(test_[A-Za-z0-9_]+)\s*(?:if\b|\{|:=|=)", re.MULTILINE)


@dataclass(frozen=True)
class TestOutcome:
    name: str  # package.rule
    passed: bool
    detail: str = ""


def _discover(bundle: PolicyBundle) -> list[tuple[str, str]]:
    """(entrypoint, display name) of every test rule, in file order."""
    found: list[tuple[str, str]] = []
    for source in bundle.rego_modules().values():
        package = _PACKAGE.search(source)
        if package is None:
            continue
        for name in dict.fromkeys(_TEST_RULE.findall(source)):
            entrypoint = "/".join([*package.group(1).split("."), name])
            found.append((entrypoint, f"{package.group(1)}.{name}"))
    return found


def _data(bundle: PolicyBundle) -> dict[str, Any]:
    document = bundle.files.get("data.json")
    return json.loads(document) if document else {}


def run_policy_tests(bundle: PolicyBundle) -> list[TestOutcome]:
    """Evaluate every test rule; an empty list means the bundle has no tests."""
    tests = _discover(bundle)
    if not tests:
        return []
    interpreter = Interpreter()
    interpreter.log_level = LogLevel.NONE
    interpreter.strict_built_in_errors = True  # as in production (pdp/engine/rego.py)
    try:
        interpreter.add_data_json(json.dumps(_data(bundle), ensure_ascii=False))
        for name, source in sorted(bundle.rego_modules().items()):
            interpreter.add_module(name, source)
        built = interpreter.build(None, [entrypoint for entrypoint, _ in tests])
    except RegoError as exc:
        return [
            TestOutcome("(compile)", False, summarize_rego_error(str(exc), bundle.rego_modules()))
        ]
    outcomes = []
    for entrypoint, name in tests:
        try:
            output = interpreter.query_bundle_entrypoint(built, entrypoint)
            text = str(output)
        except (RegoError, ValueError) as exc:
            outcomes.append(TestOutcome(name, False, f"error: {exc}"))
            continue
        passed = output.ok() and text not in ("undefined", "<error>")
        if passed:
            passed = json.loads(text)["expressions"][0] is True
        outcomes.append(TestOutcome(name, passed, "" if passed else f"result: {text[:200]}"))
    return outcomes
