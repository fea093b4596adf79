"""pdp/action.py: what an action may be before the engine sees it, and the wire mapping
every door shares (gRPC message, REST JSON)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import struct_pb2

from pdp.action import (
    MAX_ARGS_BYTES,
    action_from_json,
    action_from_proto,
    validate_action,
)
from pdp.api import pdp_pb2
from pdp.errors import BadRequest


@pytest.mark.parametrize(
    ("kind", "target", "extra"),
    [
        ("rocket", "rocket:x", {}),
        ("model", "model:no-slash", {}),
        ("tool", "tool:kb/search extra", {}),
        ("http", "http:UPPER.case", {"method": "GET", "path": "/"}),
        ("step", "step:@", {}),
        ("model", "model:openai/gpt", {"max_tokens": -1}),
        ("model", "model:openai/gpt", {"max_tokens": 10**9 + 1}),
        ("model", "model:openai/gpt", {"args": {"a": 1}}),
        ("tool", "tool:kb/search", {"args": {"bad name": 1}}),
        ("tool", "tool:kb/search", {"args": {"n": 2**53}}),
        ("tool", "tool:kb/search", {"args_json": b"[1]"}),
        ("tool", "tool:kb/search", {"args_json": b'{"a": 1, "a": 2}'}),
        ("tool", "tool:kb/search", {"args_json": b'{"a":"' + b"x" * MAX_ARGS_BYTES + b'"}'}),
        ("http", "http:billing.internal", {"method": "TRACE", "path": "/"}),
        ("http", "http:billing.internal", {"method": "GET", "path": "no-slash"}),
        ("http", "http:billing.internal", {"method": "GET", "path": "/a b"}),
        ("model", "model:openai/gpt", {"method": "GET"}),
        ("http", "http:billing.internal", {"probe": True}),
    ],
    ids=[
        "unknown-kind",
        "malformed-model",
        "malformed-tool",
        "uppercase-host",
        "empty-ending",
        "negative-tokens",
        "tokens-too-large",
        "model-with-args",
        "arg-name-not-identifier",
        "inexact-integer",
        "args-not-object",
        "duplicate-arg",
        "args-too-large",
        "unsupported-method",
        "relative-path",
        "path-with-space",
        "method-on-model",
        "probe-of-http",
    ],
)
def test_refused(kind: str, target: str, extra: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        validate_action(kind, target, **extra)


def test_policy_input_carries_only_what_the_kind_is_judged_on() -> None:
    model = validate_action("model", "model:openai/gpt-4o", max_tokens=5, input_bytes=9)
    assert model.policy_input() == {
        "kind": "model",
        "target": "model:openai/gpt-4o",
        "max_tokens": 5,
    }
    tool = validate_action("tool", "tool:kb/search", args_json=b'{"q":"x","n":5}')
    assert tool.policy_input()["args"] == {"q": "x", "n": 5}
    http = validate_action("http", "http:billing.internal", method="GET", path="/v1/x")
    assert http.policy_input() == {
        "kind": "http",
        "target": "http:billing.internal",
        "method": "GET",
        "path": "/v1/x",
    }
    probe = validate_action("tool", "tool:kb/search", probe=True)
    assert probe.policy_input() == {"kind": "tool", "target": "tool:kb/search", "probe": True}
    ending = validate_action("step", "step:@completed")
    assert ending.policy_input() == {"kind": "step", "target": "step:@completed"}


def test_args_json_wins_over_the_struct_and_keeps_integers() -> None:
    args = struct_pb2.Struct()
    args.update({"n": 1})
    message = pdp_pb2.Action(kind="tool", target="tool:kb/search", args=args, args_json=b'{"n": 7}')
    action = action_from_proto(message)
    assert action.args == {"n": 7} and isinstance(action.args["n"], int)


def test_a_struct_double_that_holds_an_integer_becomes_one() -> None:
    args = struct_pb2.Struct()
    args.update({"n": 5})  # arrives as 5.0
    action = action_from_proto(pdp_pb2.Action(kind="tool", target="tool:kb/search", args=args))
    assert action.args == {"n": 5} and isinstance(action.args["n"], int)


def test_the_json_form_goes_through_the_same_checks() -> None:
    action = action_from_json(
        {"kind": "tool", "target": "tool:kb/search", "args": {"n": 9007199254740991}}
    )
    assert action.args == {"n": 9007199254740991}
    for bad in (
        [],
        {"kind": "tool", "target": "tool:kb/search", "extra": 1},
        {"kind": "tool", "target": "tool:kb/search", "max_tokens": "many"},
        {"kind": "tool", "target": "tool:kb/search", "args": [1]},
        {"kind": "model", "target": "model:no-slash"},
    ):
        with pytest.raises(BadRequest):
            action_from_json(bad)
