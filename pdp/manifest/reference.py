"""The intent format's reference (docs/intent.md), generated from the pydantic models.

``python -m pdp.manifest.reference > docs/intent.md`` regenerates it; a test fails when the
file and the models disagree, so the reference cannot drift. Each field's type, whether it
is required, its default and its description come from the model itself.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pdp.manifest.intent import Intent
from pdp.manifest.model import (
    ArgConstraint,
    Budgets,
    FleetLimits,
    HttpCapability,
    ModelCapability,
    PromptCapability,
    ResourceCapability,
    Step,
    ToolCapability,
)

__all__ = ["EXAMPLE_INTENT", "SECTIONS", "example_intent", "render_reference"]

# (where the fields sit in an intent, the model that holds them), in reading order.
SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("(top level)", Intent),
    ("models[]", ModelCapability),
    ("tools[]", ToolCapability),
    ("tools[].args.NAME", ArgConstraint),
    ("http[]", HttpCapability),
    ("resources[]", ResourceCapability),
    ("prompts[]", PromptCapability),
    ("budgets", Budgets),
    ("fleet", FleetLimits),
    ("steps[]", Step),
)
_ANCHORS = {model: where for where, model in SECTIONS}

# The commented intent `abcctl init` writes; it freezes as it is (a test proves it).
EXAMPLE_INTENT = """\
# What one run of {agent} may do. `abcctl freeze` turns this file into a signed,
# frozen RunManifest; anything not granted here is refused. Every field, its type and
# its default: docs/intent.md. Check it with `abcctl freeze` (it reports file:line:column).
apiVersion: abc/v1
kind: RunIntent
tenant: {tenant}  # the signing key must be trusted for it (abcctl trust add --tenant)
agent: {agent}
lineage: {tenant}/{agent}  # versions of one lineage only go up: raise `version` to re-freeze
version: 1
goal: Say in one sentence what this agent is for.
enforcement: enforce  # or shadow: decide and log everything, refuse nothing (needs --mode shadow)
lifetime: 8h          # how long the manifest is valid after freezing (s, m, h, d; at most 30d)

# Models: provider is the sidecar route (openai, anthropic); every call's token field is
# capped at max_tokens_per_call.
models:
  - provider: openai
    model: gpt-4o-mini
    max_tokens_per_call: 1024

# MCP tools: server is the name in `abc-pep --upstream mcp:NAME=URL`. Arguments not listed
# are refused; each listed one may carry type, required, enum, minLength, maxLength,
# pattern, minimum, maximum.
tools:
  - server: kb
    name: search
    args:
      query: {{type: string, required: true, maxLength: 200}}

# Plain HTTP: host is the name in `abc-pep --upstream http:HOST=URL`.
http:
  - host: api.internal
    methods: [GET]
    path_prefix: /v1/

# Budgets for the whole run: a call is refused once it could overspend one of them.
budgets:
  tokens: 100000
  usd_micros: 1000000   # millionths of a dollar
  tool_calls: 50
  requests: 200

# Optional limits over all runs of this manifest together (one run per task id, started
# with x-abc-run-key): each run keeps its own budgets above. Leave out what you need not cap.
# fleet:
#   tokens: 5000000
#   runs: 100           # runs at once; a run that completes, fails or expires frees its slot

# Steps in order: each names the capabilities it uses; `after` lists steps that come first.
steps:
  - id: work
    uses: [model:openai/gpt-4o-mini, tool:kb/search, http:api.internal]
"""


def example_intent(tenant: str = "acme", agent: str = "my-agent") -> str:
    return EXAMPLE_INTENT.format(tenant=tenant, agent=agent)


def _constraints(metadata: list[Any]) -> list[str]:
    found: list[str] = []
    flat = [
        m for item in metadata for m in (item.metadata if isinstance(item, FieldInfo) else [item])
    ]
    for item in flat:
        for name, label in (
            ("pattern", "matching `{}`"),
            ("ge", "≥ {}"),
            ("gt", "> {}"),
            ("min_length", "at least {} long"),
            ("max_length", "at most {} long"),
        ):
            value = getattr(item, name, None)
            if value is not None:
                found.append(label.format(value))
    return found


def _type(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A reader's spelling of a field's type, its constraints included."""
    constraints = _constraints(metadata or [])
    origin, params = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type(params[0], [*(metadata or []), *params[1:]])
    if origin in (Union, types.UnionType):
        return " or ".join(_type(p, metadata) for p in params if p is not type(None))
    if origin is Literal:
        text = "one of " + ", ".join(f"`{p}`" for p in params)
    elif origin is tuple:
        text = f"list of {_type(params[0])}"
    elif origin is dict:
        text = f"mapping of {_type(params[0])} to {_type(params[1])}"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        text = f"[{_ANCHORS[annotation]}](#{_anchor(_ANCHORS[annotation])})"
    else:
        text = {str: "string", int: "integer", bool: "boolean"}[annotation]
    return " ".join([text, *constraints])


def _anchor(where: str) -> str:
    return "".join(c for c in where.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined or value is None:
        return "none"
    if value in ((), {}):
        return "empty"
    if value == "":
        return '`""`'
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def render_reference() -> str:
    lines = [
        "# The intent format (`abcctl freeze INTENT.yaml`)",
        "",
        "<!-- Generated by `python -m pdp.manifest.reference > docs/intent.md`;",
        "     tests/unit/pdp/manifest/test_reference.py fails when it is stale. -->",
        "",
        "An intent is a YAML file (`abcctl init` writes a commented one). `abcctl freeze`",
        "validates it, pins the policy bundle's digest and signs it into a RunManifest. Keys are",
        "strict: an unknown key, a wrong type or a float is refused, and every mistake is",
        "reported as `file:line:column: field: problem` (an unknown key with the closest known",
        "one).",
        "",
    ]
    for where, model in SECTIONS:
        lines += [f"## {where}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            kind = _type(field.annotation, list(field.metadata)).replace("|", "\\|")
            lines.append(f"| `{name}` | {kind} | {_default(field)} | {field.description} |")
        lines.append("")
    lines += ["## Example", "", "```yaml", example_intent().rstrip("\n"), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_reference(), end="")
