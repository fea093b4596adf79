"""An action as the PDP judges it: validated, bounded, and shaped for the policy input;
and the one mapping from the wire (the ``Action`` message, or its JSON form) to it, which
every door (gRPC, REST, ext_authz) goes through.

Validation here is hygiene, not judgement: it refuses what no manifest could allow
(malformed targets, unknown kinds, oversized or non-exact arguments) so that only
well-formed values reach the engine, and reason messages can name targets safely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from pdp.api import pdp_pb2
from pdp.api.mapping import MAX_TOKENS, TARGETS
from pdp.api.requests import check_http_path, check_resource_uri, exact_value_problem
from pdp.engine.inputs import check_arg_names, engine_value
from pdp.errors import BadRequest
from pdp.manifest.canonical import parse_strict_json

__all__ = [
    "KINDS",
    "MAX_ARGS_BYTES",
    "Action",
    "action_from_json",
    "action_from_proto",
    "validate_action",
]

KINDS = ("model", "tool", "http", "step", "resource", "prompt")
# Kinds a list may show, and so may be probed (judged by target alone).
PROBED_KINDS = ("model", "tool", "resource", "prompt")
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
        if kind not in PROBED_KINDS:
            raise BadRequest("only model, tool, resource and prompt targets can be probed")
        if not TARGETS[kind].fullmatch(target):
            raise BadRequest(f"malformed {kind} target")
        return Action(kind, target, probe=True)
    if kind not in KINDS:
        raise BadRequest("action kind must be one of " + ", ".join(KINDS))
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
        check_http_path(path)  # MappingError: an AbcError with reason bad_request
    elif method or path:
        raise BadRequest("only http actions carry a method and path")
    if kind == "resource":
        check_resource_uri(target.split("/", 1)[1])  # after "resource:SERVER/"
    return Action(kind, target, safe_args, max_tokens, method, path, input_bytes=input_bytes)


def action_from_proto(message: pdp_pb2.Action) -> Action:
    args: dict[str, Any] | None = None
    if not message.args_json and message.HasField("args"):
        if message.args.ByteSize() > MAX_ARGS_BYTES:
            raise BadRequest(f"arguments over {MAX_ARGS_BYTES} bytes")
        args = json_format.MessageToDict(message.args)
    return validate_action(
        message.kind,
        message.target,
        args=args,
        args_json=message.args_json,
        max_tokens=message.max_tokens,
        method=message.method,
        path=message.path,
        probe=message.probe,
        input_bytes=message.input_bytes,
    )


# The Action message's fields, as the REST door takes them (proto field names).
_JSON_FIELDS = frozenset(
    {"kind", "target", "args", "max_tokens", "method", "path", "probe", "input_bytes"}
)


def action_from_json(value: Any) -> Action:
    """An ``Action`` from its JSON form (the REST door), through the same checks as gRPC's.

    The fields are the message's, by their proto names, typed by protobuf's JSON mapping;
    ``args`` is a plain JSON object carried as ``args_json``, so its integers stay exact
    instead of becoming a ``Struct``'s doubles.
    """
    if not isinstance(value, dict):
        raise BadRequest("input.action must be an object")
    if value.keys() - _JSON_FIELDS:
        # The caller's key names are not quoted back: they would reach the log verbatim.
        raise BadRequest(f"input.action takes only {', '.join(sorted(_JSON_FIELDS))}")
    message = pdp_pb2.Action()
    try:
        json_format.ParseDict({k: v for k, v in value.items() if k != "args"}, message)
    except json_format.ParseError as exc:
        # Not the parser's text: it quotes the caller's values, which end up in the log.
        raise BadRequest("input.action: a field has the wrong type") from exc
    args = value.get("args")
    if args is not None:
        if not isinstance(args, dict):
            raise BadRequest("arguments must be a JSON object")
        try:
            message.args_json = json.dumps(args, ensure_ascii=False, allow_nan=False).encode()
        except ValueError as exc:  # NaN and friends cannot reach here from strict JSON
            raise BadRequest("arguments hold a number JSON cannot carry") from exc
    return action_from_proto(message)
