"""The intent file: what a run may do, as the user writes it (YAML).

Errors point at the line and column of the offending value, e.g.
``intent.yaml:14:20: tools[0].args.query.maxLength: Input should be a valid integer``.
Every error is reported, one per line, unknown keys first with the closest known one.
"""

from __future__ import annotations

import difflib
import json
import re
import types
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from pdp.errors import ConfigError
from pdp.manifest._yaml import YamlDocument, load_yaml
from pdp.manifest.model import (
    Assembly,
    Budgets,
    Capabilities,
    FleetLimits,
    HttpCapability,
    Lineage,
    ModelCapability,
    PlanError,
    PromptCapability,
    ResourceCapability,
    Step,
    Timestamp,
    ToolCapability,
    _Strict,
    check_assembly,
)

__all__ = ["Intent", "IntentError", "load_intent", "parse_intent"]

_DURATION = re.compile(r"([1-9][0-9]*)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
MAX_LIFETIME = timedelta(days=30)


def _duration(text: str) -> timedelta:
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"duration {text!r} is not a number followed by s, m, h or d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


class IntentError(ConfigError):
    """An intent file that does not parse or validate; the message names file:line:column."""


class Intent(_Strict):
    apiVersion: Literal["abc/v1"] = Field("abc/v1", description="the format's version")  # noqa: N815
    kind: Literal["RunIntent"] = Field("RunIntent", description="always RunIntent")
    tenant: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] = Field(
        description="the owner; the signing key must be trusted for it (`abcctl trust add`)"
    )
    agent: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] = Field(
        description="the agent this run is for"
    )
    lineage: Lineage | None = Field(
        None,
        description="the series of versions this one belongs to, starting with `TENANT/`;"
        " default `TENANT/AGENT`",
    )
    version: Annotated[int, Field(ge=1)] = Field(
        description="must rise with each manifest of a lineage (older ones are refused)"
    )
    goal: Annotated[str, StringConstraints(max_length=1000)] = Field(
        "", description="what the run is for, in words (signed, shown by `abcctl inspect`)"
    )
    enforcement: Literal["enforce", "shadow"] = Field(
        "enforce",
        description="`shadow` decides and logs but refuses nothing (the key needs `--mode shadow`)",
    )
    lifetime: Annotated[str, Field(pattern=_DURATION.pattern)] = Field(
        "8h", description="validity after `not_before`: a number and s, m, h or d; at most 30d"
    )
    not_before: Timestamp | None = Field(
        None, description="start of validity, `YYYY-MM-DDTHH:MM:SSZ`; default: when frozen"
    )
    models: tuple[ModelCapability, ...] = Field((), description="the model calls granted")
    tools: tuple[ToolCapability, ...] = Field((), description="the MCP tool calls granted")
    http: tuple[HttpCapability, ...] = Field((), description="the plain HTTP calls granted")
    resources: tuple[ResourceCapability, ...] = Field(
        (), description="the MCP resources granted (`resources/read`), by URI prefix"
    )
    prompts: tuple[PromptCapability, ...] = Field(
        (), description="the MCP prompts granted (`prompts/get`), by name"
    )
    budgets: Budgets = Field(description="limits for the whole run")
    fleet: FleetLimits | None = Field(
        None,
        description="limits over all runs of this manifest together (runs started per task"
        " id); none by default",
    )
    steps: tuple[Step, ...] = Field(
        min_length=1, description="the Assembly: ordered steps, each naming what it uses"
    )

    @field_validator("lifetime")
    @classmethod
    def _bounded_lifetime(cls, value: str) -> str:
        if _duration(value) > MAX_LIFETIME:
            raise ValueError(f"lifetime {value} is over the maximum of 30d")
        return value

    @model_validator(mode="after")
    def _capabilities_distinct(self) -> Intent:
        self.capabilities  # noqa: B018 - builds Capabilities, which refuses duplicate targets
        return self

    @property
    def lineage_name(self) -> str:
        return self.lineage if self.lineage is not None else f"{self.tenant}/{self.agent}"

    @property
    def lifetime_delta(self) -> timedelta:
        return _duration(self.lifetime)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            models=self.models,
            tools=self.tools,
            http=self.http,
            resources=self.resources,
            prompts=self.prompts,
        )

    @property
    def assembly(self) -> Assembly:
        return Assembly(steps=self.steps)


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class whose fields sit at ``loc`` in an intent, or None (a dict of args)."""
    annotation: Any = Intent
    for part in loc:
        while get_origin(annotation) in (Annotated, Union, types.UnionType):
            # Annotated[X, ...] -> X; X | None -> X (intent unions are optionals only)
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        origin, params = get_origin(annotation), get_args(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        elif origin is tuple and isinstance(part, int):
            annotation = params[0]
        elif origin is dict:
            annotation = params[1]
        else:
            return None
    while get_origin(annotation) in (Annotated, Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))  # fleet
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def _message(error: ErrorDetails) -> str:
    if error["type"] != "extra_forbidden":
        return str(error["msg"])
    loc = tuple(error["loc"])
    model = _model_at(loc[:-1])
    known = list(model.model_fields) if model is not None else []
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
    return f"unknown key {loc[-1]!r}{hint if known else ''}"


def _all_errors(document: YamlDocument, exc: ValidationError) -> str:
    """One line per error, unknown keys first: a typo explains the "Field required" after it."""
    errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
    return "\n".join(
        f"{document.where(tuple(e['loc']))}: {_dotted(tuple(e['loc']))}: {_message(e)}"
        for e in errors
    )


def parse_intent(text: str, source: str = "<intent>") -> Intent:
    """Parse and validate intent YAML; raise ``IntentError`` naming ``source:line:column``."""
    try:
        document = load_yaml(text, source)
    except ConfigError as exc:
        raise IntentError(str(exc)) from exc
    if not isinstance(document.data, dict):
        raise IntentError(f"{document.where(())}: an intent is a mapping of fields")
    try:
        # JSON mode: strict types, with YAML sequences accepted where tuples are declared.
        intent = Intent.model_validate_json(json.dumps(document.data))
        check_assembly(intent.steps, intent.capabilities)
        if not intent.lineage_name.startswith(f"{intent.tenant}/"):
            where = document.where(("lineage",))
            raise IntentError(f"{where}: lineage: must start with the tenant, {intent.tenant}/")
        return intent
    except PlanError as exc:
        loc = ("steps", *exc.loc)
        raise IntentError(f"{document.where(loc)}: {_dotted(loc)}: {exc}") from exc
    except ValidationError as exc:
        raise IntentError(_all_errors(document, exc)) from exc
    except (TypeError, ValueError) as exc:
        raise IntentError(f"{source}: {exc}") from exc


def load_intent(path: Path) -> Intent:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IntentError(f"{path}: cannot read intent: {exc}") from exc
    return parse_intent(text, str(path))
