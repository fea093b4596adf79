"""The intent file: what a run may do, as the user writes it (YAML).

Errors point at the line and column of the offending value, e.g.
``intent.yaml:14:20: tools[0].args.query.maxLength: Input should be a valid integer``.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, ValidationError, field_validator, model_validator

from pdp.errors import ConfigError
from pdp.manifest._yaml import load_yaml
from pdp.manifest.model import (
    Assembly,
    Budgets,
    Capabilities,
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
    apiVersion: Literal["abc/v1"] = "abc/v1"  # noqa: N815 - wire name
    kind: Literal["RunIntent"] = "RunIntent"
    tenant: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    agent: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    lineage: Lineage | None = None
    version: Annotated[int, Field(ge=1)]
    goal: Annotated[str, StringConstraints(max_length=1000)] = ""
    enforcement: Literal["enforce", "shadow"] = "enforce"
    lifetime: Annotated[str, Field(pattern=_DURATION.pattern)] = "8h"
    not_before: Timestamp | None = None
    models: tuple[ModelCapability, ...] = ()
    tools: tuple[ToolCapability, ...] = ()
    http: tuple[HttpCapability, ...] = ()
    resources: tuple[ResourceCapability, ...] = ()
    prompts: tuple[PromptCapability, ...] = ()
    budgets: Budgets
    steps: tuple[Step, ...] = Field(min_length=1)

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
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise IntentError(f"{document.where(loc)}: {_dotted(loc)}: {first['msg']}{more}") from exc
    except (TypeError, ValueError) as exc:
        raise IntentError(f"{source}: {exc}") from exc


def load_intent(path: Path) -> Intent:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IntentError(f"{path}: cannot read intent: {exc}") from exc
    return parse_intent(text, str(path))
