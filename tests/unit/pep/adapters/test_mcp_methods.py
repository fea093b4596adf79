"""Which action each MCP method is judged as (the README's table, per revision), and the
params that cannot be judged refused before anything is forwarded."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pdp.api.reasons import MappingError
from pep.adapters.mcp import McpAdapter

MODERN_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}


def judged(method: str, params: dict[str, Any], modern: bool = False) -> str | None:
    """The target the request is decided on; None: forwarded undecided."""
    if modern:
        params = {**params, "_meta": MODERN_META}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    call = McpAdapter().message("kb", body.encode(), None)
    return call.action.target if call.action is not None else None


@pytest.mark.parametrize(
    ("method", "params", "modern", "target"),
    [
        ("resources/subscribe", {"uri": "file:///docs/a"}, False, "resource:kb/file:///docs/a"),
        ("resources/unsubscribe", {"uri": "file:///secret/a"}, False, None),
        ("logging/setLevel", {"level": "debug"}, False, None),
        ("resources/templates/list", {}, False, None),
        (
            "completion/complete",
            {"ref": {"type": "ref/prompt", "name": "summarize"}, "argument": {}},
            False,
            "prompt:kb/summarize",
        ),
        (
            "completion/complete",
            {"ref": {"type": "ref/resource", "uri": "file:///docs/{n}"}, "argument": {}},
            True,
            "resource:kb/file:///docs/{n}",
        ),
        ("subscriptions/listen", {"notifications": {"toolsListChanged": True}}, True, None),
        (
            "subscriptions/listen",
            {"notifications": {"resourceSubscriptions": ["file:///docs/a"]}},
            True,
            "resource:kb/file:///docs/a",
        ),
    ],
)
def test_each_method_is_judged_as_the_capability_it_names(
    method: str, params: dict[str, Any], modern: bool, target: str | None
) -> None:
    assert judged(method, params, modern) == target


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("completion/complete", {"ref": {"type": "ref/tool", "name": "search"}}),
        ("completion/complete", {"ref": {"type": "ref/prompt"}}),
        ("resources/subscribe", {}),
        ("subscriptions/listen", {}),
        ("subscriptions/listen", {"notifications": {"resourceSubscriptions": "file:///a"}}),
        ("subscriptions/listen", {"notifications": {"resourceSubscriptions": ["a", "b"]}}),
        ("tasks/list", {}),
        ("tasks/result", {"taskId": "t1"}),
    ],
)
def test_what_cannot_be_judged_or_is_not_governed_is_refused(
    method: str, params: dict[str, Any]
) -> None:
    with pytest.raises(MappingError):
        judged(method, params)
