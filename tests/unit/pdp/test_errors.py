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
        # MCP resources and prompts are capabilities (issue 17).
        "resource_not_allowed",
        "prompt_not_allowed",
        # Narrowed runs and runs bound to their manifest (issue 16).
        "not_narrower",
        "run_not_bound",
        # Many runs of one grant (issue 16): fleet limits and released runs.
        "fleet_budget_exhausted",
        "fleet_runs_exhausted",
        "run_released",
    }


# Every error type and its reason code. A new type must be added here, with its code.
EXPECTED = {
    "BadRequest": ReasonCode.BAD_REQUEST,
    "MappingError": ReasonCode.BAD_REQUEST,
    "RequestIdReused": ReasonCode.BAD_REQUEST,
    "SignatureInvalid": ReasonCode.SIGNATURE_INVALID,
    "ManifestExpired": ReasonCode.MANIFEST_EXPIRED,
    "ManifestRollback": ReasonCode.MANIFEST_ROLLBACK,
    "ManifestUnknown": ReasonCode.MANIFEST_UNKNOWN,
    "ShadowNotAllowed": ReasonCode.SHADOW_NOT_ALLOWED,
    "RunClosed": ReasonCode.RUN_CLOSED,
    "NotNarrower": ReasonCode.NOT_NARROWER,
    "RunKeyConflict": ReasonCode.NOT_NARROWER,
    "RunNotBound": ReasonCode.RUN_NOT_BOUND,
    "RunReleased": ReasonCode.RUN_RELEASED,
    "FleetRunsExhausted": ReasonCode.FLEET_RUNS_EXHAUSTED,
    "StoreUnavailable": ReasonCode.PDP_UNAVAILABLE,
    "LogUnavailable": ReasonCode.PDP_UNAVAILABLE,
    "PolicyMismatch": ReasonCode.POLICY_MISMATCH,
}


def _error_types() -> dict[str, type[AbcError]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, AbcError) and value is not AbcError
    }


def test_every_error_type_maps_to_its_own_reason_code() -> None:
    types = _error_types()
    assert set(types) == set(EXPECTED)
    for name, error_type in types.items():
        # Its own: a subclass that forgets to name one must not pass on AbcError's default.
        assert "reason" in vars(error_type), name
        assert error_type.reason is EXPECTED[name], name


def test_every_reason_the_pdp_raises_has_an_error_type_or_a_policy() -> None:
    # The policy's own codes come from Rego; every other code is raised as a type.
    policy_codes = {
        ReasonCode.MODEL_NOT_ALLOWED,
        ReasonCode.TOOL_NOT_ALLOWED,
        ReasonCode.TOOL_ARGS_INVALID,
        ReasonCode.HTTP_NOT_ALLOWED,
        ReasonCode.RESOURCE_NOT_ALLOWED,
        ReasonCode.PROMPT_NOT_ALLOWED,
        ReasonCode.STEP_OUT_OF_ORDER,
        ReasonCode.BUDGET_EXHAUSTED,
        ReasonCode.FLEET_BUDGET_EXHAUSTED,  # the ledger's verdict, beside budget_exhausted
    }
    assert set(EXPECTED.values()) | policy_codes == set(ReasonCode)


def test_config_error_is_not_a_denial() -> None:
    assert not issubclass(ConfigError, AbcError)
