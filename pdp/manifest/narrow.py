"""Narrowing (attenuation): a run started with less than its signed grant allows.

A narrower is a JSON document in the manifest's own shape, every field optional:

    {"metadata": {"not_before": ..., "expires_at": ...},
     "enforcement": "enforce",
     "capabilities": {"models": [...], "tools": [...], "http": [...],
                      "resources": [...], "prompts": [...]},
     "budgets": {"tokens": 4000},
     "assembly": {"steps": [...]}}

A field left out keeps the grant's; a capability list given replaces the grant's list of
that kind, each entry written in full; budgets are replaced one by one; the step list is
replaced whole. The result (the effective grant) must validate as any manifest does, and
must be provably no wider than the grant, field by field; anything that cannot be proven
narrower is refused (``NotNarrower``, naming the field). No signature is needed: the
grant's signer allowed everything the effective grant allows.

Why each rule is enough (a narrowed run can do nothing its grant's run could not):
- a capability is kept by its target (a resource may lengthen its URI prefix); per-call
  caps may only go down, HTTP methods only be dropped, prefixes only be lengthened;
- a tool argument constraint keeps every bound of the grant's or tightens it (required
  stays required, enum a subset, min up, max down, lengths inward, the same pattern); an
  argument the grant does not list stays unlisted (refused);
- steps keep the grant's order, use only what the grant's step of that id used, and keep
  every prerequisite (``after``) the grant named: every step move of the narrowed run is
  one the grant's run could make (its first step included: dropped earlier steps only
  make fewer steps "done").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from pdp.errors import BadRequest, NotNarrower
from pdp.manifest.canonical import canonical_bytes, digest, parse_strict_json
from pdp.manifest.model import (
    ArgConstraint,
    Assembly,
    Capabilities,
    Count,
    HttpCapability,
    Manifest,
    ModelCapability,
    PromptCapability,
    ResourceCapability,
    Timestamp,
    ToolCapability,
    parse_timestamp,
)

__all__ = ["MAX_NARROWER_BYTES", "Narrowed", "Narrower", "narrow", "parse_narrower"]

# A narrower travels in every first StartRun of its run key and in the log: kept small.
MAX_NARROWER_BYTES = 64 * 1024

T = TypeVar("T")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NarrowerMetadata(_Strict):
    not_before: Timestamp | None = None
    expires_at: Timestamp | None = None

    @field_validator("not_before", "expires_at")
    @classmethod
    def _an_instant(cls, value: str | None) -> str | None:
        if value is not None:
            parse_timestamp(value)  # the pattern alone lets 2026-13-45 through
        return value


class NarrowerCapabilities(_Strict):
    models: tuple[ModelCapability, ...] | None = None
    tools: tuple[ToolCapability, ...] | None = None
    http: tuple[HttpCapability, ...] | None = None
    resources: tuple[ResourceCapability, ...] | None = None
    prompts: tuple[PromptCapability, ...] | None = None


class NarrowerBudgets(_Strict):
    tokens: Count | None = None
    usd_micros: Count | None = None
    tool_calls: Count | None = None
    requests: Count | None = None


class Narrower(_Strict):
    """What a run takes away from its grant; a field left out keeps the grant's."""

    metadata: NarrowerMetadata = NarrowerMetadata()
    enforcement: Literal["enforce", "shadow"] | None = None
    capabilities: NarrowerCapabilities = NarrowerCapabilities()
    budgets: NarrowerBudgets = NarrowerBudgets()
    assembly: Assembly | None = None


@dataclass(frozen=True)
class Narrowed:
    """A run's effective grant: the narrower as canonical JSON, the manifest it leaves,
    and that manifest's digest (what the run start record pins)."""

    narrower: bytes
    manifest: Manifest
    digest: str


def parse_narrower(raw: bytes) -> Narrower:
    """Read a narrower document: strict JSON, strict schema, at most 64 KiB."""
    if len(raw) > MAX_NARROWER_BYTES:
        raise BadRequest(f"a narrower is at most {MAX_NARROWER_BYTES} bytes")
    try:
        parse_strict_json(raw)  # duplicate keys, NaN and floats refused first
        return Narrower.model_validate_json(raw)
    except ValidationError as exc:
        raise BadRequest(f"narrower {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def narrow(grant: Manifest, raw: bytes) -> Narrowed | None:
    """The effective grant of a run of ``grant`` narrowed by ``raw``, or None when it
    takes nothing away (the run is the grant's own). ``BadRequest`` for a malformed
    narrower, ``NotNarrower`` for one not provably narrower (widening is named before
    what would leave an invalid manifest)."""
    narrower = parse_narrower(raw)
    check_narrower(grant, narrower)
    document = grant.document()
    # What the narrower says, and nothing it left out: its canonical form, as logged.
    dumped = narrower.model_dump(mode="json", exclude_none=True)
    given = {name: value for name, value in dumped.items() if value != {}}
    for name in ("metadata", "capabilities", "budgets"):
        document[name].update(given.get(name, {}))
    for name in ("enforcement", "assembly"):
        if name in given:
            document[name] = given[name]
    try:
        effective = Manifest.model_validate_json(json.dumps(document))
    except ValidationError as exc:
        raise NotNarrower(f"the narrowed manifest is not valid: {_first_error(exc)}") from None
    canonical = canonical_bytes(effective.document())
    if canonical == canonical_bytes(grant.document()):
        return None
    return Narrowed(canonical_bytes(given), effective, digest(canonical))


def check_narrower(grant: Manifest, narrower: Narrower) -> None:
    """Raise ``NotNarrower`` naming the first field of ``narrower`` wider than ``grant``."""
    _check_lifetime(grant, narrower.metadata)
    if grant.enforcement == "enforce" and narrower.enforcement == "shadow":
        raise NotNarrower("enforcement: shadow is wider than the grant's enforce")
    for name, limit in grant.budgets.model_dump().items():
        value = getattr(narrower.budgets, name)
        if value is not None and value > limit:
            raise NotNarrower(f"budgets.{name}: {value} is more than the grant's {limit}")
    covers = _check_capabilities(grant.capabilities, narrower.capabilities)
    if narrower.assembly is not None:
        _check_steps(grant, narrower.assembly, covers)


def _check_lifetime(grant: Manifest, metadata: NarrowerMetadata) -> None:
    if metadata.not_before is not None and parse_timestamp(metadata.not_before) < grant.not_before:
        raise NotNarrower(
            f"metadata.not_before: {metadata.not_before} is before the grant's"
            f" {grant.metadata.not_before}"
        )
    if metadata.expires_at is not None and parse_timestamp(metadata.expires_at) > grant.expires_at:
        raise NotNarrower(
            f"metadata.expires_at: {metadata.expires_at} is after the grant's"
            f" {grant.metadata.expires_at}"
        )


def _check_capabilities(
    granted: Capabilities, narrower: NarrowerCapabilities
) -> dict[str, set[str]]:
    """Each capability the narrower lists against the grant's it narrows; for each target
    of the effective grant, the grant targets it narrows (a resource may narrow several
    prefixes; a kind the narrower leaves out is the grant's own)."""
    listed = narrower.model_dump(exclude_none=True)
    covers = {target: {target} for target in granted.targets()}
    for kind in listed:
        for capability in getattr(granted, kind):
            del covers[capability.target]
    try:
        effective = Capabilities(**{kind: getattr(narrower, kind) for kind in listed})
    except ValidationError as exc:
        raise NotNarrower(f"capabilities: {_first_error(exc)}") from None
    for i, model in enumerate(effective.models):
        where = f"capabilities.models[{i}]"
        match = _one(where, model.target, {m.target: m for m in granted.models})
        if model.max_tokens_per_call > match.max_tokens_per_call:
            raise NotNarrower(
                f"{where}.max_tokens_per_call: {model.max_tokens_per_call} is more than the"
                f" grant's {match.max_tokens_per_call}"
            )
        covers[model.target] = {model.target}
    for i, tool in enumerate(effective.tools):
        where = f"capabilities.tools[{i}]"
        granted_tool = _one(where, tool.target, {t.target: t for t in granted.tools})
        for arg, constraint in tool.args.items():
            if arg not in granted_tool.args:
                raise NotNarrower(f"{where}.args.{arg}: the grant does not allow this argument")
            _check_arg(f"{where}.args.{arg}", granted_tool.args[arg], constraint)
        for arg, constraint in granted_tool.args.items():
            # Left out, it would be unlisted but not required: a call without it, which the
            # grant refuses, would pass.
            if constraint.required and arg not in tool.args:
                raise NotNarrower(f"{where}.args.{arg}: the grant requires this argument")
        covers[tool.target] = {tool.target}
    for i, http in enumerate(effective.http):
        where = f"capabilities.http[{i}]"
        granted_http = _one(where, http.target, {h.target: h for h in granted.http})
        extra = sorted(set(http.methods) - set(granted_http.methods))
        if extra:
            raise NotNarrower(f"{where}.methods: {', '.join(extra)} not allowed by the grant")
        if not http.path_prefix.startswith(granted_http.path_prefix):
            raise NotNarrower(
                f"{where}.path_prefix: {http.path_prefix!r} is not under the grant's"
                f" {granted_http.path_prefix!r}"
            )
        covers[http.target] = {http.target}
    for i, resource in enumerate(effective.resources):
        narrowed = {
            r.target
            for r in granted.resources
            if r.server == resource.server and resource.uri_prefix.startswith(r.uri_prefix)
        }
        if not narrowed:
            raise NotNarrower(
                f"capabilities.resources[{i}]: {resource.target} is not under a resource"
                " the grant allows"
            )
        covers[resource.target] = narrowed
    for i, prompt in enumerate(effective.prompts):
        _one(f"capabilities.prompts[{i}]", prompt.target, {p.target: p for p in granted.prompts})
        covers[prompt.target] = {prompt.target}
    return covers


def _one(where: str, target: str, granted: dict[str, T]) -> T:
    if target not in granted:
        raise NotNarrower(f"{where}: {target} is not a capability of the grant")
    return granted[target]


def _check_arg(where: str, grant: ArgConstraint, effective: ArgConstraint) -> None:
    if effective.type != grant.type:
        raise NotNarrower(f"{where}.type: {effective.type} is not the grant's {grant.type}")
    if grant.required and not effective.required:
        raise NotNarrower(f"{where}.required: the grant requires this argument")
    if grant.enum is not None:
        outside = [v for v in effective.enum or () if v not in grant.enum]
        if effective.enum is None or outside:
            shown = outside or "any value"
            raise NotNarrower(f"{where}.enum: {shown} not among the grant's {list(grant.enum)}")
    if grant.pattern is not None and effective.pattern != grant.pattern:
        # Whether one regular expression matches less than another is not decided here.
        raise NotNarrower(f"{where}.pattern: not the grant's pattern {grant.pattern!r}")
    for name, tighter in (
        ("minimum", max),
        ("minLength", max),
        ("maximum", min),
        ("maxLength", min),
    ):
        bound: Any = getattr(grant, name)
        value: Any = getattr(effective, name)
        if bound is not None and (value is None or tighter(bound, value) != value):
            shown = "no bound" if value is None else value
            side = "below" if tighter is max else "above"
            raise NotNarrower(f"{where}.{name}: {shown} is {side} the grant's {bound}")


def _check_steps(grant: Manifest, assembly: Assembly, covers: dict[str, set[str]]) -> None:
    granted = {step.id: (i, step) for i, step in enumerate(grant.assembly.steps)}
    last = -1
    for i, step in enumerate(assembly.steps):
        where = f"assembly.steps[{i}]"
        if step.id not in granted:
            raise NotNarrower(f"{where}: step {step.id!r} is not a step of the grant")
        position, granted_step = granted[step.id]
        if position < last:
            raise NotNarrower(f"{where}: step {step.id!r} is out of the grant's order")
        last = position
        for use in step.uses:
            if use not in covers:
                raise NotNarrower(f"{where}.uses: {use} is not a capability of the narrowed grant")
            if not covers[use] & set(granted_step.uses):
                raise NotNarrower(
                    f"{where}.uses: {use} is not used by the grant's step {step.id!r}"
                )
        dropped = sorted(set(granted_step.after) - set(step.after))
        if dropped:
            raise NotNarrower(
                f"{where}.after: step {step.id!r} comes after {', '.join(dropped)} in the grant"
            )
