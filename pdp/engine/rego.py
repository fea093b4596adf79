"""Rego evaluation with OPA's own Go engine: compile once per (policy, manifest), evaluate many.

The engine is ``github.com/open-policy-agent/opa/v1/rego`` itself, loaded in-process as a
Go shared library (``opa-golib-python-bindings``), so the PDP decides exactly as OPA
does: the reference operators write Rego for. It replaced rego-cpp (regopy 1.5.2), which
read backslash literals as two characters, cut strings at NUL, refused regex flags,
matched regexes byte by byte and leaked ~23 KB per evaluation (README, "The Rego engine").

What this module contains:

- One ``OpaEngine`` serializes its evaluations behind a lock, so a prepared policy keeps a
  small pool of engines over the same modules and data, up to one per core (Go runs
  outside the GIL): a thread takes one, decides, gives it back. The first is compiled
  before the policy is accepted; another only when a decision finds them all busy, in the
  background, so no decision waits for a compile (~0.1-0.3 s each here: a sidecar's 250
  ms deadline would not) and a grant decided one call at a time holds one engine (about
  3 MB), not one per core.
- Builtin errors stop the evaluation (the bridge evaluates with OPA's strict builtin
  errors): an error must never become an undefined that ``not`` turns into an allow.
- Input crosses into Go as JSON text. The bridge refuses what Go would change (a lone
  surrogate would become U+FFFD); callers refuse it earlier with a reason
  (``pdp.engine.inputs``), and anything that still fails here is an ``EngineError``: deny.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from pdp.engine.decision import Decision, EngineError, parse_decision
from pdp.opa import OpaEngine, OpaError, new_engine

__all__ = ["ENTRYPOINT", "PreparedPolicy", "compile_modules", "production_modules"]

# The decision document, as OPA's REST API names it (data.abc.authz.decision).
ENTRYPOINT = "abc.authz.decision"
# Decisions kept per prepared policy (least recently used go first).
CACHE_LIMIT = 4096
# Engines per prepared policy: one per core, at most four.
ENGINES = min(4, os.cpu_count() or 1)


def production_modules(modules: Mapping[str, str]) -> dict[str, str]:
    return {name: source for name, source in modules.items() if not name.endswith("_test.rego")}


def compile_modules(modules: Mapping[str, str], data: Mapping[str, Any]) -> OpaEngine:
    """An engine holding ``modules`` and ``data``; ``EngineError`` naming the file and line
    of the first problem when they do not compile."""
    engine = new_engine()
    # Rego's own print() would go to stderr, outside the decision log: dropped.
    engine.print_handler = _drop_print
    try:
        for name, source in sorted(modules.items()):
            engine.add_policy(name, source)
        engine.add_data(dict(data))
        # Compilation is lazy in the bridge: one query forces it, so a broken bundle is
        # refused here and not at the first decision.
        engine.eval_query("true")
    except OpaError as exc:
        engine.close()
        raise EngineError(f"policy does not compile: {_first_line(exc.message)}") from exc
    return engine


def _drop_print(message: str, location: str) -> None:
    del message, location


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    # "2 errors occurred:" heads OPA's list; the first error itself is what helps.
    if len(lines) > 1 and lines[0].endswith("occurred:"):
        return lines[1][:300]
    return lines[0][:300] if lines else "unknown error"


class PreparedPolicy:
    """One policy bundle compiled with one manifest's data; thread-safe ``evaluate``.

    Decisions are pure functions of (policy digest, manifest digest, input), so the last
    ``CACHE_LIMIT`` are kept by input: a bounded window, whatever the traffic.
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
        self._modules = production_modules(modules)
        self._data = dict(data)
        # The first engine is compiled now, so a broken bundle is refused at registration.
        first = self._compile()
        self._pool: queue.SimpleQueue[OpaEngine] = queue.SimpleQueue()
        self._pool.put(first)
        self._engines = 1  # made or being made
        self._grow_lock = threading.Lock()
        self._cache: OrderedDict[str, Decision] = OrderedDict()
        self._cache_lock = threading.Lock()

    def _compile(self) -> OpaEngine:
        engine = compile_modules(self._modules, self._data)
        # The decision query is prepared on its first use: done here, not in a decision. A
        # policy may refuse an empty input; real inputs report their own errors.
        with contextlib.suppress(OpaError):
            engine.eval_document(ENTRYPOINT, {})
        return engine

    def _grow(self) -> None:
        """Start compiling one more engine, unless there are ``ENGINES`` already."""
        with self._grow_lock:
            if self._engines >= ENGINES:
                return
            self._engines += 1
        threading.Thread(target=self._add_engine, daemon=True).start()

    def _add_engine(self) -> None:
        try:
            self._pool.put(self._compile())
        except BaseException:
            # It compiled before, so this is the process (memory, say): the pool carries
            # on with what it has, and the next busy moment tries again.
            with self._grow_lock:
                self._engines -= 1
            raise

    def evaluate(self, policy_input: dict[str, Any]) -> Decision:
        """Decide; ``EngineError`` when the policy yields no valid decision."""
        key = json.dumps(policy_input, sort_keys=True, separators=(",", ":"))
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        decision = parse_decision(self.evaluate_raw(policy_input))
        with self._cache_lock:
            self._cache[key] = decision
            if len(self._cache) > CACHE_LIMIT:
                self._cache.popitem(last=False)
        return decision

    def evaluate_raw(self, policy_input: dict[str, Any]) -> Any:
        try:
            engine = self._pool.get_nowait()
        except queue.Empty:
            self._grow()
            engine = self._pool.get()  # the first engine given back, or the new one
        try:
            return engine.eval_document(ENTRYPOINT, policy_input)
        except OpaError as exc:  # undefined included: no decision is a denial
            raise EngineError(f"evaluation failed: {_first_line(exc.message)}") from exc
        finally:
            self._pool.put(engine)
