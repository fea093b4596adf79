"""An action as the PDP judges it: validated, bounded, and shaped for the policy input.

Validation here is hygiene, not judgement: it refuses what no manifest could allow
(malformed targets, unknown kinds, oversized or non-exact arguments) so that only
well-formed values reach the engine, and reason messages can name targets safely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdp.api.actions import MAX_TOKENS, TARGETS, MappingError, check_http_path, exact_value_problem
from pdp.engine.inputs import check_arg_names, engine_value
from pdp.errors import BadRequest
from pdp.manifest.canonical import parse_strict_json

__all__ = ["KINDS", "MAX_ARGS_BYTES", "Action", "validate_action"]

KINDS = ("model", "tool", "http", "step")
MAX_ARGS_BYTES = 64 * 1024
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class Action:
    kind: str
    target: str
    args: dict[str, Any] = field(default_factory=dict)
    max_tokens: int = 0
    method: str = ""
    path: str = ""
    probe: bool = False
    input_bytes: int = 0

    def policy_input(self) -> dict[str, Any]:
        action: dict[str, Any] = {"kind": self.kind, "target": self.target}
        if self.probe:
            # Only the target is judged: a probe carries no arguments, tokens or path.
            action["probe"] = True
            return action
        if self.kind == "tool":
            action["args"] = self.args
        elif self.kind == "model":
            action["max_tokens"] = self.max_tokens
        elif self.kind == "http":
            action["method"], action["path"] = self.method, self.path
        return action


def validate_action(
    kind: str,
    target: str,
    *,
    args: dict[str, Any] | None = None,
    args_json: bytes = b"",
    max_tokens: int = 0,
    method: str = "",
    path: str = "",
    probe: bool = False,
    input_bytes: int = 0,
) -> Action:
    """Build an ``Action`` or raise ``BadRequest``; ``args_json``, when set, wins over ``args``."""
    if probe:
        if kind not in ("model", "tool"):
            raise BadRequest("only model and tool targets can be probed")
        if not TARGETS[kind].fullmatch(target):
            raise BadRequest(f"malformed {kind} target")
        return Action(kind, target, probe=True)
    if kind not in KINDS:
        raise BadRequest("action kind must be one of model, tool, http, step")
    if not TARGETS[kind].fullmatch(target):
        raise BadRequest(f"malformed {kind} target")
    if not 0 <= max_tokens <= MAX_TOKENS or not 0 <= input_bytes <= MAX_TOKENS:
        raise BadRequest("max_tokens or input_bytes out of range")
    if args_json:
        if len(args_json) > MAX_ARGS_BYTES:
            raise BadRequest(f"arguments over {MAX_ARGS_BYTES} bytes")
        args = parse_strict_json(args_json, allow_floats=True)
    args = args or {}
    if not isinstance(args, dict):
        raise BadRequest("arguments must be a JSON object")
    if kind != "tool" and args:
        raise BadRequest("only tool actions carry arguments")
    check_arg_names(args)
    problem = exact_value_problem(args)
    if problem is not None:
        raise BadRequest(problem)
    safe_args = engine_value(args)
    if kind == "http":
        if method not in _METHODS:
            raise BadRequest("unsupported HTTP method")
        try:
            check_http_path(path)
        except MappingError as exc:
            raise BadRequest(str(exc)) from exc
    elif method or path:
        raise BadRequest("only http actions carry a method and path")
    return Action(kind, target, safe_args, max_tokens, method, path, input_bytes=input_bytes)
