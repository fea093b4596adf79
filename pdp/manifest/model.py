"""The RunManifest document: capabilities (the VCS), budgets, and the Assembly.

These models are the authoritative schema (DESIGN.md's example is illustrative).
They are strict: unknown fields, wrong types and floats are refused, so what was
signed is exactly what is enforced.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from pdp.manifest.patterns import check_pattern

__all__ = [
    "API_VERSION",
    "ArgConstraint",
    "Assembly",
    "Budgets",
    "Capabilities",
    "FleetLimits",
    "HttpCapability",
    "Lineage",
    "Manifest",
    "ManifestMetadata",
    "ModelCapability",
    "PlanError",
    "PolicyPin",
    "PromptCapability",
    "ResourceCapability",
    "Step",
    "ToolCapability",
    "check_assembly",
    "format_timestamp",
    "parse_timestamp",
]

API_VERSION = "abc/v1"
MANIFEST_KIND = "RunManifest"

_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


def parse_timestamp(text: str) -> datetime:
    """Parse ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, whole seconds: one spelling per instant)."""
    if not _TIMESTAMP.fullmatch(text):
        raise ValueError(f"timestamp {text!r} is not YYYY-MM-DDTHH:MM:SSZ")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def format_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _timestamp(value: str) -> str:
    parse_timestamp(value)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]
Host = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?$")
]
Lineage = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$", max_length=200)
]
Timestamp = Annotated[str, Field(pattern=_TIMESTAMP.pattern)]
Count = Annotated[int, Field(ge=0)]
ArgType = Literal["string", "integer", "number", "boolean", "array", "object", "null"]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class ArgConstraint(_Strict):
    """Constraints on one tool argument (a JSON-Schema-like subset, integers only)."""

    type: ArgType = Field(description="the JSON type the argument must have")
    required: bool = Field(False, description="the call is refused when the argument is missing")
    enum: tuple[str | int | bool, ...] | None = Field(None, description="the only values allowed")
    minLength: Count | None = Field(  # noqa: N815 - JSON Schema spelling, kept on the wire
        None, description="shortest string, in characters (type string)"
    )
    maxLength: Count | None = Field(  # noqa: N815
        None, description="longest string, in characters (type string)"
    )
    pattern: str | None = Field(
        None, description="a regular expression the whole string must match (type string)"
    )
    minimum: int | None = Field(None, description="smallest value (type integer or number)")
    maximum: int | None = Field(None, description="largest value (type integer or number)")

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str | None) -> str | None:
        return None if value is None else check_pattern(value)

    @model_validator(mode="after")
    def _fits_type(self) -> ArgConstraint:
        if self.type != "string" and (
            self.minLength is not None or self.maxLength is not None or self.pattern is not None
        ):
            raise ValueError("minLength, maxLength and pattern apply to type string only")
        if self.type not in ("integer", "number") and (
            self.minimum is not None or self.maximum is not None
        ):
            raise ValueError("minimum and maximum apply to type integer or number only")
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError("minimum is above maximum")
        if (
            self.minLength is not None
            and self.maxLength is not None
            and self.minLength > self.maxLength
        ):
            raise ValueError("minLength is above maxLength")
        return self


class ModelCapability(_Strict):
    provider: Name = Field(description="the sidecar route: `openai` or `anthropic`")
    model: ModelName = Field(description="the model name exactly as the agent sends it")
    max_tokens_per_call: Annotated[int, Field(gt=0)] = Field(
        description="cap on every call's output-token field; the sidecar lowers larger requests"
    )

    @property
    def target(self) -> str:
        return f"model:{self.provider}/{self.model}"


class ToolCapability(_Strict):
    server: Name = Field(
        description="the MCP server, as named in `abc-pep --upstream mcp:NAME=URL`"
    )
    name: Name = Field(description="the tool's name on that server")
    args: dict[Name, ArgConstraint] = Field(
        default_factory=dict,
        description="argument name to its constraints; an argument not listed is refused",
    )

    @property
    def target(self) -> str:
        return f"tool:{self.server}/{self.name}"


class ResourceCapability(_Strict):
    """MCP ``resources/read`` of any URI that starts with ``uri_prefix`` (listed likewise)."""

    server: Name = Field(description="the MCP server, as named in `--upstream mcp:SERVER=URL`")
    uri_prefix: Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,2048}$")] = Field(
        description="every URI read must start with this (printable ASCII, no spaces)"
    )

    @property
    def target(self) -> str:
        return f"resource:{self.server}/{self.uri_prefix}"


class PromptCapability(_Strict):
    """MCP ``prompts/get`` of the prompt ``name`` (listed likewise); its arguments unjudged."""

    server: Name = Field(description="the MCP server, as named in `--upstream mcp:SERVER=URL`")
    name: Name = Field(description="the prompt's name")

    @property
    def target(self) -> str:
        return f"prompt:{self.server}/{self.name}"


class HttpCapability(_Strict):
    host: Host = Field(description="the upstream, as named in `abc-pep --upstream http:HOST=URL`")
    methods: tuple[HttpMethod, ...] = Field(min_length=1, description="the methods allowed")
    path_prefix: Annotated[str, StringConstraints(pattern=r"^/[^\s?#]*$")] = Field(
        "/", description="every request's path must start with this (no `.`/`..` segments)"
    )

    @field_validator("path_prefix")
    @classmethod
    def _no_dot_segments(cls, value: str) -> str:
        if any(segment in (".", "..") for segment in value.split("/")):
            raise ValueError("path_prefix may not contain '.' or '..' segments")
        return value

    @property
    def target(self) -> str:
        return f"http:{self.host}"


class Capabilities(_Strict):
    models: tuple[ModelCapability, ...] = ()
    tools: tuple[ToolCapability, ...] = ()
    http: tuple[HttpCapability, ...] = ()
    resources: tuple[ResourceCapability, ...] = ()
    prompts: tuple[PromptCapability, ...] = ()

    @model_validator(mode="after")
    def _unique_targets(self) -> Capabilities:
        seen: set[str] = set()
        for target in self.target_list():
            if target in seen:
                raise ValueError(f"capability {target} is declared twice")
            seen.add(target)
        return self

    def target_list(self) -> list[str]:
        return [
            *(m.target for m in self.models),
            *(t.target for t in self.tools),
            *(h.target for h in self.http),
            *(r.target for r in self.resources),
            *(p.target for p in self.prompts),
        ]

    def targets(self) -> set[str]:
        return set(self.target_list())


class Budgets(_Strict):
    tokens: Count = Field(description="model tokens, prompt and output, over the whole run")
    usd_micros: Count = Field(description="spend in millionths of a US dollar")
    tool_calls: Count = Field(description="MCP tool calls")
    requests: Count = Field(description="decided requests of every kind")


class FleetLimits(_Strict):
    """Limits over all runs of one manifest together (each run still has its own budgets).
    A limit left out is not enforced; the fleet's books are shared by PDP replicas."""

    tokens: Count | None = Field(None, description="model tokens spent by all runs together")
    usd_micros: Count | None = Field(None, description="spend of all runs together, in micros")
    tool_calls: Count | None = Field(None, description="MCP tool calls of all runs together")
    requests: Count | None = Field(None, description="decided requests of all runs together")
    runs: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="runs at once: StartRun is refused while this many runs started under"
        " a run key are live (neither completed, failed nor expired)",
    )


class Step(_Strict):
    id: Name = Field(description="the step's name, sent by the agent as `x-abc-step`")
    uses: tuple[str, ...] = Field(
        min_length=1,
        description="capability targets usable in this step: `model:PROVIDER/MODEL`,"
        " `tool:SERVER/NAME`, `http:HOST`",
    )
    after: tuple[Name, ...] = Field(
        (), description="steps that must come before this one (earlier in the list)"
    )


class Assembly(_Strict):
    steps: tuple[Step, ...] = Field(min_length=1)


class PlanError(ValueError):
    """A step that does not fit the capabilities or the order; ``loc`` points at it."""

    def __init__(self, loc: tuple[int | str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def check_assembly(steps: tuple[Step, ...], capabilities: Capabilities) -> None:
    """Every step is unique, uses only declared capabilities, and comes after earlier steps only.

    Requiring ``after`` to name earlier steps makes the plan acyclic by construction.
    Raises ``PlanError`` with a location relative to the step list.
    """
    declared = capabilities.targets()
    seen: set[str] = set()
    for i, step in enumerate(steps):
        if step.id in seen:
            raise PlanError((i, "id"), f"step {step.id!r} is declared twice")
        for j, use in enumerate(step.uses):
            if use not in declared:
                raise PlanError(
                    (i, "uses", j),
                    f"step {step.id!r} uses {use!r}, which is not a declared capability",
                )
        for j, before in enumerate(step.after):
            if before not in seen:
                raise PlanError(
                    (i, "after", j),
                    f"step {step.id!r} comes after {before!r}, which is not an earlier step",
                )
        seen.add(step.id)


class ManifestMetadata(_Strict):
    lineage: Lineage
    version: Annotated[int, Field(ge=1)]
    tenant: Name
    agent: Name
    goal: Annotated[str, StringConstraints(max_length=1000)] = ""
    issued_at: Timestamp
    not_before: Timestamp
    expires_at: Timestamp

    @model_validator(mode="after")
    def _lineage_of_tenant(self) -> ManifestMetadata:
        # Lineages are the tenant's: another tenant's key cannot raise acme's mark.
        if not self.lineage.startswith(f"{self.tenant}/"):
            raise ValueError(f"lineage must start with the tenant, {self.tenant}/")
        return self

    @model_validator(mode="after")
    def _window(self) -> ManifestMetadata:
        if parse_timestamp(self.expires_at) <= parse_timestamp(self.not_before):
            raise ValueError("expires_at must be after not_before")
        return self


class PolicyPin(_Strict):
    bundle_digest: Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]


class Manifest(_Strict):
    """A frozen RunManifest, as signed."""

    apiVersion: Literal["abc/v1"]  # noqa: N815 - wire name
    kind: Literal["RunManifest"]
    metadata: ManifestMetadata
    enforcement: Literal["enforce", "shadow"] = "enforce"
    policy: PolicyPin
    capabilities: Capabilities
    budgets: Budgets
    fleet: FleetLimits | None = None
    assembly: Assembly

    @model_validator(mode="after")
    def _assembly_fits(self) -> Manifest:
        check_assembly(self.assembly.steps, self.capabilities)
        return self

    # Parsed once per (frozen) manifest: every decision checks the window.
    @cached_property
    def not_before(self) -> datetime:
        return parse_timestamp(self.metadata.not_before)

    @cached_property
    def expires_at(self) -> datetime:
        return parse_timestamp(self.metadata.expires_at)

    def document(self) -> dict[str, Any]:
        """The JSON document, without defaults left implicit: what gets canonicalized and signed.

        No resources or prompts granted: the keys are left out, so a manifest that grants
        none reads (and signs) exactly as before they existed."""
        document = self.model_dump(mode="json", exclude_none=True)
        for key in ("resources", "prompts"):
            if not document["capabilities"][key]:
                del document["capabilities"][key]
        return document
