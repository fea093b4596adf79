"""Narrowing: every kind of widening is refused naming its field; what only takes away is
accepted, and the effective grant is the manifest the run is judged by."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.errors import BadRequest, NotNarrower
from pdp.manifest.canonical import canonical_bytes, digest
from pdp.manifest.model import Manifest
from pdp.manifest.narrow import MAX_NARROWER_BYTES, narrow
from tests.factories import manifest_document


def _grant() -> Manifest:
    document = manifest_document()
    document["capabilities"]["tools"][0]["args"]["mode"] = {
        "type": "string",
        "enum": ["fast", "deep", "web"],
    }
    document["capabilities"]["tools"][0]["args"]["limit"] = {
        "type": "integer",
        "minimum": 1,
        "maximum": 50,
    }
    document["capabilities"]["tools"][0]["args"]["lang"] = {"type": "string", "pattern": "[a-z]{2}"}
    document["capabilities"]["resources"] = [{"server": "kb", "uri_prefix": "file:///docs/"}]
    document["assembly"]["steps"][0]["uses"].append("resource:kb/file:///docs/")
    return Manifest.model_validate_json(json.dumps(document))


GRANT = _grant()
TOOL = GRANT.document()["capabilities"]["tools"][0]


def _tool(**args: Any) -> dict[str, Any]:
    tool = json.loads(json.dumps(TOOL))
    for name, constraint in args.items():
        if constraint is None:
            del tool["args"][name]
        else:
            tool["args"][name] = constraint
    return tool


def _narrow(narrower: dict[str, Any]) -> Manifest:
    narrowed = narrow(GRANT, json.dumps(narrower).encode())
    assert narrowed is not None
    return narrowed.manifest


def _refused(narrower: dict[str, Any]) -> str:
    with pytest.raises(NotNarrower) as caught:
        narrow(GRANT, json.dumps(narrower).encode())
    return str(caught.value)


def test_an_empty_narrower_takes_nothing_away_and_is_the_grant_itself() -> None:
    assert narrow(GRANT, b"{}") is None
    assert narrow(GRANT, json.dumps({"budgets": {"tokens": 200000}}).encode()) is None


def test_a_narrower_that_only_takes_away_is_the_effective_grant_pinned_by_digest() -> None:
    narrower = {
        "metadata": {"not_before": "2026-11-22T11:00:00Z", "expires_at": "2026-11-22T12:30:00Z"},
        "capabilities": {
            "tools": [_tool(mode={"type": "string", "enum": ["fast"]}, lang=None)],
            "http": [],
            "resources": [{"server": "kb", "uri_prefix": "file:///docs/public/"}],
        },
        "budgets": {"tokens": 4000, "tool_calls": 3},
        "assembly": {
            "steps": [
                {
                    "id": "research",
                    "uses": ["tool:kb/search", "resource:kb/file:///docs/public/"],
                }
            ]
        },
    }
    narrowed = narrow(GRANT, json.dumps(narrower).encode())
    assert narrowed is not None
    effective = narrowed.manifest
    assert effective.budgets.tokens == 4000 and effective.budgets.requests == 500
    assert effective.metadata.expires_at == "2026-11-22T12:30:00Z"
    assert effective.capabilities.http == ()
    assert effective.capabilities.models == GRANT.capabilities.models  # not named: kept
    assert [s.id for s in effective.assembly.steps] == ["research"]
    assert narrowed.digest == digest(canonical_bytes(effective.document()))
    # The narrower as given, canonical: the same whatever its spelling.
    respelled = json.dumps(narrower, indent=2, sort_keys=True).encode()
    again = narrow(GRANT, respelled)
    assert again is not None and again.narrower == narrowed.narrower
    assert again.digest == narrowed.digest


def test_an_extra_tool_is_refused() -> None:
    extra = {"server": "kb", "name": "delete", "args": {}}
    message = _refused({"capabilities": {"tools": [TOOL, extra]}})
    assert message == "capabilities.tools[1]: tool:kb/delete is not a capability of the grant"


def test_an_extra_model_http_host_prompt_or_resource_is_refused() -> None:
    model = {"provider": "openai", "model": "gpt-4o", "max_tokens_per_call": 10}
    assert "capabilities.models[0]: model:openai/gpt-4o" in _refused(
        {"capabilities": {"models": [model]}}
    )
    http = {"host": "evil.example", "methods": ["GET"]}
    assert "capabilities.http[0]" in _refused({"capabilities": {"http": [http]}})
    prompt = {"server": "kb", "name": "p"}
    assert "capabilities.prompts[0]" in _refused({"capabilities": {"prompts": [prompt]}})
    resource = {"server": "kb", "uri_prefix": "file:///"}
    assert "capabilities.resources[0]" in _refused({"capabilities": {"resources": [resource]}})


def test_a_larger_budget_is_refused_naming_it() -> None:
    assert _refused({"budgets": {"tokens": 200001}}) == (
        "budgets.tokens: 200001 is more than the grant's 200000"
    )


def test_a_larger_per_call_cap_more_methods_or_a_wider_path_are_refused() -> None:
    model = {"provider": "openai", "model": "gpt-4o-mini", "max_tokens_per_call": 4096}
    assert "max_tokens_per_call: 4096 is more than the grant's 2048" in _refused(
        {"capabilities": {"models": [model]}}
    )
    post = {"host": "billing.internal", "methods": ["GET", "POST"], "path_prefix": "/v1/"}
    assert "capabilities.http[0].methods: POST" in _refused({"capabilities": {"http": [post]}})
    wider = {"host": "billing.internal", "methods": ["GET"], "path_prefix": "/"}
    assert "capabilities.http[0].path_prefix" in _refused({"capabilities": {"http": [wider]}})


def test_a_longer_lifetime_is_refused_either_end() -> None:
    assert _refused({"metadata": {"expires_at": "2026-11-22T18:00:01Z"}}) == (
        "metadata.expires_at: 2026-11-22T18:00:01Z is after the grant's 2026-11-22T18:00:00Z"
    )
    assert "metadata.not_before" in _refused({"metadata": {"not_before": "2026-11-22T09:00:00Z"}})


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"query": {"type": "string", "maxLength": 200}}, "args.query.required"),
        ({"query": {"type": "string", "required": True, "maxLength": 201}}, "query.maxLength"),
        ({"query": {"type": "string", "required": True}}, "args.query.maxLength: no bound"),
        ({"query": None}, "args.query: the grant requires this argument"),
        ({"query": {"type": "integer", "required": True}}, "args.query.type"),
        ({"mode": {"type": "string", "enum": ["fast", "slow"]}}, "args.mode.enum: ['slow']"),
        ({"mode": {"type": "string"}}, "args.mode.enum: any value"),
        ({"limit": {"type": "integer", "minimum": 0, "maximum": 50}}, "args.limit.minimum"),
        ({"limit": {"type": "integer", "minimum": 1, "maximum": 51}}, "args.limit.maximum"),
        ({"lang": {"type": "string", "pattern": "[a-z]{3}"}}, "args.lang.pattern"),
        ({"lang": {"type": "string"}}, "args.lang.pattern"),
        ({"extra": {"type": "string"}}, "args.extra: the grant does not allow this argument"),
    ],
)
def test_a_looser_argument_constraint_is_refused(args: dict[str, Any], field: str) -> None:
    message = _refused({"capabilities": {"tools": [_tool(**args)]}})
    assert message.startswith("capabilities.tools[0].args.") and field in message


def test_tighter_argument_constraints_are_accepted() -> None:
    tighter = _tool(
        query={"type": "string", "required": True, "minLength": 3, "maxLength": 50},
        mode={"type": "string", "required": True, "enum": ["deep"]},
        limit={"type": "integer", "minimum": 5, "maximum": 10},
        lang={"type": "string", "pattern": "[a-z]{2}", "maxLength": 2},
    )
    effective = _narrow({"capabilities": {"tools": [tighter]}})
    assert effective.capabilities.tools[0].args["limit"].maximum == 10


def test_an_unknown_step_is_refused() -> None:
    steps = [
        {"id": "research", "uses": ["tool:kb/search"]},
        {"id": "publish", "uses": ["tool:kb/search"]},
    ]
    assert _refused({"assembly": {"steps": steps}}) == (
        "assembly.steps[1]: step 'publish' is not a step of the grant"
    )


def test_a_step_using_more_dropping_a_prerequisite_or_reordered_is_refused() -> None:
    uses_more = [{"id": "answer", "uses": ["tool:kb/search"]}]
    assert "assembly.steps[0].uses: tool:kb/search" in _refused({"assembly": {"steps": uses_more}})
    # "answer" without "research" would skip what the grant requires first.
    skips = [{"id": "answer", "uses": ["model:openai/gpt-4o-mini"]}]
    assert "comes after research in the grant" in _refused({"assembly": {"steps": skips}})
    document = manifest_document()
    document["assembly"]["steps"][1]["after"] = []
    free = Manifest.model_validate_json(json.dumps(document))
    reordered = [
        {"id": "answer", "uses": ["model:openai/gpt-4o-mini"]},
        {"id": "research", "uses": ["tool:kb/search"]},
    ]
    with pytest.raises(NotNarrower, match="out of the grant's order"):
        narrow(free, json.dumps({"assembly": {"steps": reordered}}).encode())


def test_what_leaves_no_valid_manifest_is_refused_as_not_narrower() -> None:
    # The tool dropped while a step still uses it: not a valid Assembly.
    message = _refused({"capabilities": {"tools": []}})
    assert message.startswith("the narrowed manifest is not valid: ")
    assert "tool:kb/search" in message
    assert "not valid" in _refused(
        {"metadata": {"not_before": "2026-11-22T17:00:00Z", "expires_at": "2026-11-22T16:00:00Z"}}
    )


def test_shadow_is_wider_than_enforce() -> None:
    assert _refused({"enforcement": "shadow"}).startswith("enforcement: shadow")


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'{"policy": {"bundle_digest": "x"}}',  # what cannot be narrowed is not a field
        b'{"metadata": {"lineage": "acme/other"}}',
        b'{"metadata": {"expires_at": "2026-13-45T10:00:00Z"}}',
        b'{"budgets": {"tokens": 1.5}}',
        b'{"budgets": {"tokens": 1, "tokens": 2}}',
        b"{" + b" " * MAX_NARROWER_BYTES + b"}",
    ],
)
def test_a_malformed_narrower_is_a_bad_request(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        narrow(GRANT, raw)


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(0, 400000),
    tool_calls=st.integers(0, 200),
    max_tokens=st.integers(1, 4096),
    maximum=st.integers(1, 100),
)
def test_accepted_exactly_when_every_bound_is_within_the_grants(
    tokens: int, tool_calls: int, max_tokens: int, maximum: int
) -> None:
    model = {"provider": "openai", "model": "gpt-4o-mini", "max_tokens_per_call": max_tokens}
    tool = _tool(limit={"type": "integer", "minimum": 1, "maximum": maximum})
    narrower = {
        "budgets": {"tokens": tokens, "tool_calls": tool_calls},
        "capabilities": {"models": [model], "tools": [tool]},
    }
    within = tokens <= 200000 and tool_calls <= 100 and max_tokens <= 2048 and maximum <= 50
    try:
        narrowed = narrow(GRANT, json.dumps(narrower).encode())
    except NotNarrower:
        assert not within
        return
    assert within
    effective = narrowed.manifest if narrowed is not None else GRANT
    assert effective.budgets.tokens == tokens
    assert effective.capabilities.models[0].max_tokens_per_call == max_tokens
