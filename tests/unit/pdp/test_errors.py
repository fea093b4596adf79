"""The reason-code map is total and closed."""

from __future__ import annotations

import pdp.errors as errors
from pdp.errors import AbcError, ConfigError, ReasonCode

DESIGN_CODES = {
    "model_not_allowed",
    "tool_not_allowed",
    "tool_args_invalid",
    "http_not_allowed",
    "step_out_of_order",
    "budget_exhausted",
    "manifest_expired",
    "manifest_unknown",
    "signature_invalid",
    "pdp_unavailable",
    "bad_request",
}


def test_reason_codes_are_the_designs_plus_documented_additions() -> None:
    assert {code.value for code in ReasonCode} == DESIGN_CODES | {
        "manifest_rollback",
        "policy_mismatch",
        "run_closed",
        "shadow_not_allowed",
    }


def test_every_error_type_maps_to_a_reason_code() -> None:
    subclasses = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, AbcError)
    ]
    assert len(subclasses) >= 5
    for error_type in subclasses:
        assert isinstance(error_type.reason, ReasonCode), error_type


def test_config_error_is_not_a_denial() -> None:
    assert not issubclass(ConfigError, AbcError)
