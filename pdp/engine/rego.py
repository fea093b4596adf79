"""rego-cpp (regopy) evaluation: compile once per (policy, manifest), evaluate many.

Traps of regopy 1.5.2 this module exists to contain:

- An ``Interpreter`` holds one input at a time; shared by threads it decides with
  another request's input. Each thread gets its own interpreter over the shared,
  compiled bundle.
- Entrypoints must be spelled ``abc/authz/decision``; the dotted form builds and then
  silently evaluates to undefined.
- ``Output.expressions()``/``binding()`` abort the process on an undefined result, so
  results are read from the output's text only.
- Parse errors are printed to stdout unless the log level is NONE.
- ``with input as {...}`` in a test module aborts ``build()``: test files never enter
  the production build.
- Builtin errors are undefined by default, which ``not`` turns into true: strict mode.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

from regopy import Interpreter, LogLevel, RegoError

from pdp.engine.decision import Decision, EngineError, parse_decision
from pdp.engine.errors import summarize_rego_error

__all__ = ["ENTRYPOINT", "PreparedPolicy", "production_modules"]

ENTRYPOINT = "abc/authz/decision"
_CACHE_LIMIT = 4096


def production_modules(modules: Mapping[str, str]) -> dict[str, str]:
    return {name: source for name, source in modules.items() if not name.endswith("_test.rego")}


def _interpreter() -> Interpreter:
    interpreter = Interpreter()
    interpreter.log_level = LogLevel.NONE
    # A builtin error (a bad regex, say) is otherwise undefined, and `not regex.match(...)`
    # would then hold: an error must stop the decision, never let it through.
    interpreter.strict_built_in_errors = True
    return interpreter


class PreparedPolicy:
    """One policy bundle compiled with one manifest's data; thread-safe ``evaluate``.

    Decisions are pure functions of (policy digest, manifest digest, input), so they are
    cached by input; the cache is bounded and cleared when full.
    """

    def __init__(
        self,
        modules: Mapping[str, str],
        data: Mapping[str, Any],
        policy_digest: str,
        manifest_digest: str,
    ) -> None:
        self.policy_digest = policy_digest
        self.manifest_digest = manifest_digest
        builder = _interpreter()
        try:
            builder.add_data_json(json.dumps(data, ensure_ascii=False))
            for name, source in sorted(production_modules(modules).items()):
                builder.add_module(name, source)
            self._bundle = builder.build(None, [ENTRYPOINT])
        except RegoError as exc:
            summary = summarize_rego_error(str(exc), modules)
            raise EngineError(f"policy does not compile: {summary}") from exc
        if not self._bundle.ok():
            raise EngineError("policy does not compile")
        self._local = threading.local()
        self._cache: dict[str, Decision] = {}

    def _thread_interpreter(self) -> Interpreter:
        interpreter: Interpreter | None = getattr(self._local, "interpreter", None)
        if interpreter is None:
            interpreter = _interpreter()
            self._local.interpreter = interpreter
        return interpreter

    def evaluate(self, policy_input: dict[str, Any]) -> Decision:
        """Decide; ``EngineError`` when the policy yields no valid decision."""
        key = json.dumps(policy_input, sort_keys=True, separators=(",", ":"))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        decision = parse_decision(self.evaluate_raw(policy_input))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = decision
        return decision

    def evaluate_raw(self, policy_input: dict[str, Any]) -> Any:
        interpreter = self._thread_interpreter()
        try:
            interpreter.set_input(policy_input)
            output = interpreter.query_bundle_entrypoint(self._bundle, ENTRYPOINT)
            text = str(output)
            ok = output.ok()
        except (RegoError, ValueError) as exc:  # ValueError: output that is not JSON
            raise EngineError(f"evaluation failed: {exc}") from exc
        if not ok or text in ("undefined", "<error>"):
            raise EngineError(f"policy result is {text}")
        try:
            return json.loads(text)["expressions"][0]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EngineError("policy output is not a result") from exc
