"""How ``abcctl suggest`` writes the next intent: a ``Draft`` (the intent's pieces and the
evidence for each) rendered as YAML in the demo intent's layout, with the evidence as
comments, and read back to check that what is written is exactly the intent meant.

``enforce`` is the operator's choice (``abcctl suggest --enforce``): a suggestion never
changes the enforcement mode on its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from pdp.errors import ConfigError
from pdp.ledger import BUDGETS
from pdp.manifest.intent import Intent, IntentError, parse_intent
from pdp.manifest.model import (
    ArgConstraint,
    Budgets,
    HttpCapability,
    Manifest,
    ModelCapability,
    PromptCapability,
    ResourceCapability,
    Step,
    ToolCapability,
)

__all__ = ["Draft", "as_intent", "check_round_trip", "next_intent", "render_intent"]

_PLAIN = re.compile(r"[A-Za-z0-9/][A-Za-z0-9._/:@-]*")


@dataclass
class Draft:
    """The next intent's pieces while they are worked out, with their evidence."""

    base: Manifest
    models: list[ModelCapability]
    tools: list[ToolCapability]
    http: list[HttpCapability]
    uses: dict[str, list[str]]  # step id -> uses, in order
    before: dict[str, list[str]] = field(default_factory=dict)  # target/step -> comment lines
    step_notes: dict[str, list[str]] = field(default_factory=dict)  # step id -> comment lines
    removed: dict[str, Any] = field(default_factory=dict)  # target -> removed capability
    budget_notes: dict[str, str] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # refused, not proposed

    def declared(self) -> set[str]:
        return {
            *(c.target for c in self.models),
            *(c.target for c in self.tools),
            *(c.target for c in self.http),
        }


def _lifetime(manifest: Manifest) -> str:
    seconds = int((manifest.expires_at - manifest.not_before).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def next_intent(
    plan: Draft,
    version: int,
    budgets: Budgets,
    steps: list[Step],
    enforcement: Literal["enforce", "shadow"],
) -> Intent:
    base = plan.base
    meta = base.metadata
    return Intent(
        tenant=meta.tenant,
        agent=meta.agent,
        lineage=meta.lineage,
        version=version,
        goal=meta.goal,
        enforcement=enforcement,
        lifetime=_lifetime(base),
        models=tuple(plan.models),
        tools=tuple(plan.tools),
        http=tuple(plan.http),
        # Carried over as granted: suggest does not learn MCP resources and prompts yet.
        resources=base.capabilities.resources,
        prompts=base.capabilities.prompts,
        budgets=budgets,
        steps=tuple(steps),
    )


def as_intent(base: Manifest) -> Intent:
    """The current manifest written as the intent it was frozen from (less its start time)."""
    meta = base.metadata
    return Intent(
        tenant=meta.tenant,
        agent=meta.agent,
        lineage=meta.lineage,
        version=meta.version,
        goal=meta.goal,
        enforcement=base.enforcement,
        lifetime=_lifetime(base),
        models=base.capabilities.models,
        tools=base.capabilities.tools,
        http=base.capabilities.http,
        resources=base.capabilities.resources,
        prompts=base.capabilities.prompts,
        budgets=base.budgets,
        steps=base.assembly.steps,
    )


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def _flow(items: Iterable[str]) -> str:
    return "[" + ", ".join(_scalar(item) for item in items) + "]"


def _constraint(constraint: ArgConstraint) -> str:
    fields = constraint.model_dump(exclude_none=True)
    if not fields.get("required"):
        fields.pop("required", None)
    parts = []
    for key, value in fields.items():
        shown = _flow(value) if isinstance(value, tuple | list) else _scalar(value)
        parts.append(f"{key}: {shown}")
    return "{" + ", ".join(parts) + "}"


def _comment(lines: Iterable[str], indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in lines]


def _capability_lines(capability: Any) -> list[str]:
    if isinstance(capability, ModelCapability):
        return [
            f"- provider: {_scalar(capability.provider)}",
            f"  model: {_scalar(capability.model)}",
            f"  max_tokens_per_call: {capability.max_tokens_per_call}",
        ]
    if isinstance(capability, ToolCapability):
        lines = [f"- server: {_scalar(capability.server)}", f"  name: {_scalar(capability.name)}"]
        if capability.args:
            lines.append("  args:")
            lines.extend(
                f"    {_scalar(name)}: {_constraint(c)}" for name, c in capability.args.items()
            )
        return lines
    if isinstance(capability, ResourceCapability):
        return [
            f"- server: {_scalar(capability.server)}",
            f"  uri_prefix: {_scalar(capability.uri_prefix)}",
        ]
    if isinstance(capability, PromptCapability):
        return [f"- server: {_scalar(capability.server)}", f"  name: {_scalar(capability.name)}"]
    assert isinstance(capability, HttpCapability)
    return [
        f"- host: {_scalar(capability.host)}",
        f"  methods: {_flow(capability.methods)}",
        f"  path_prefix: {_scalar(capability.path_prefix)}",
    ]


def render_intent(intent: Intent, plan: Draft | None, header: list[str]) -> str:
    """The intent as YAML in the demo intent's layout; with ``plan``, its evidence as comments."""
    notes: Callable[[str], list[str]] = (
        (lambda key: plan.before.get(key, [])) if plan else (lambda key: [])
    )
    out = _comment(header, "")
    out += [
        "apiVersion: abc/v1",
        "kind: RunIntent",
        f"tenant: {_scalar(intent.tenant)}",
        f"agent: {_scalar(intent.agent)}",
        f"lineage: {_scalar(intent.lineage_name)}",
        f"version: {intent.version}",
        f"goal: {_scalar(intent.goal)}",
        f"enforcement: {intent.enforcement}",
        f"lifetime: {intent.lifetime}",
    ]
    sections: list[tuple[str, tuple[Any, ...], type]] = [
        ("models", intent.models, ModelCapability),
        ("tools", intent.tools, ToolCapability),
        ("http", intent.http, HttpCapability),
        ("resources", intent.resources, ResourceCapability),
        ("prompts", intent.prompts, PromptCapability),
    ]
    for name, capabilities, kind in sections:
        removed = [c for c in (plan.removed.values() if plan else []) if isinstance(c, kind)]
        if name in ("resources", "prompts") and not capabilities and not removed:
            continue  # MCP resources and prompts, written only where an intent has them
        out.append("")
        out.append(f"{name}:" if capabilities else f"{name}: []")
        for capability in capabilities:
            out += _comment(notes(capability.target), "  ")
            out += ["  " + line for line in _capability_lines(capability)]
        for capability in removed:
            out.append("  # REMOVED, never called (restore it here and in steps to keep it):")
            out += ["  # " + line for line in _capability_lines(capability)]
    out += ["", "budgets:"]
    for name in BUDGETS:
        if plan and name in plan.budget_notes:
            out += _comment([plan.budget_notes[name]], "  ")
        out.append(f"  {name}: {getattr(intent.budgets, name)}")
    out += ["", "steps:"]
    if plan:
        out += _comment(plan.step_notes.get("@order", []), "  ")
    for step in intent.steps:
        if plan:
            out += _comment(plan.step_notes.get(step.id, []), "  ")
        out.append(f"  - id: {_scalar(step.id)}")
        out.append(f"    uses: {_flow(step.uses)}")
        if step.after:
            out.append(f"    after: {_flow(step.after)}")
    return "\n".join(out) + "\n"


def check_round_trip(text: str, intent: Intent) -> None:
    """What is written must read back as exactly the intent meant (a writer bug is loud)."""
    try:
        parsed = parse_intent(text, "<suggested intent>")
    except IntentError as exc:
        raise ConfigError(f"suggest wrote an intent that does not parse: {exc}") from exc
    if parsed != intent:
        raise ConfigError("suggest wrote an intent that reads back differently")
