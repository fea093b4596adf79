"""The closed set of reason codes (part of the public contract, like the .proto), the error
that carries one, and the HTTP status of a refusal for each.

Both the PDP (which emits them) and the PEP (which counts them as metric labels)
import this module; a code outside it is never trusted as a label.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["AbcError", "BadRequest", "MappingError", "ReasonCode", "refusal_status"]


class ReasonCode(StrEnum):
    MODEL_NOT_ALLOWED = "model_not_allowed"
    TOOL_NOT_ALLOWED = "tool_not_allowed"
    TOOL_ARGS_INVALID = "tool_args_invalid"
    HTTP_NOT_ALLOWED = "http_not_allowed"
    # MCP resources (by URI prefix) and prompts (by name) are capabilities like tools.
    RESOURCE_NOT_ALLOWED = "resource_not_allowed"
    PROMPT_NOT_ALLOWED = "prompt_not_allowed"
    STEP_OUT_OF_ORDER = "step_out_of_order"
    BUDGET_EXHAUSTED = "budget_exhausted"
    MANIFEST_EXPIRED = "manifest_expired"
    MANIFEST_UNKNOWN = "manifest_unknown"
    # Additions to DESIGN.md's first list. A rolled-back manifest is validly signed and
    # unexpired, so neither signature_invalid nor manifest_expired would say what happened.
    MANIFEST_ROLLBACK = "manifest_rollback"
    # A manifest pinned to another policy bundle than the PDP's is deployment skew an
    # operator must see as such, not as a bad signature.
    POLICY_MISMATCH = "policy_mismatch"
    # A run that ended (completed, failed) or was revoked (a newer version of its
    # lineage was registered) decides nothing more; its manifest is still in its window.
    RUN_CLOSED = "run_closed"
    # A shadow manifest (decisions logged, never enforced) signed by a key whose trust
    # entry does not grant shadow mode: validly signed, yet not this signer's to make.
    SHADOW_NOT_ALLOWED = "shadow_not_allowed"
    # A run's narrower that would widen its grant (or leaves no valid manifest): refused at
    # StartRun, naming the field; narrowing needs no signature because it only takes away.
    NOT_NARROWER = "not_narrower"
    # A run named by a caller bound to another manifest: a run id is usable only by a
    # sidecar of its own grant.
    RUN_NOT_BOUND = "run_not_bound"
    # Fleet limits (a grant's limits over all its runs together), apart from one run's
    # own budget: the run may still have budget left, its siblings spent the fleet's.
    FLEET_BUDGET_EXHAUSTED = "fleet_budget_exhausted"
    # StartRun when the grant already has as many live runs as its fleet allows.
    FLEET_RUNS_EXHAUSTED = "fleet_runs_exhausted"
    # A run that ended and whose live state was released after the retention: its final
    # books are in the decision log, no longer in the PDP's memory or the shared store.
    RUN_RELEASED = "run_released"
    SIGNATURE_INVALID = "signature_invalid"
    PDP_UNAVAILABLE = "pdp_unavailable"
    BAD_REQUEST = "bad_request"


def refusal_status(reason: ReasonCode | None) -> int:
    """HTTP status of a refusal: 403 for policy, 400 for a request that cannot be judged,
    503 when no decision could be had."""
    if reason is ReasonCode.PDP_UNAVAILABLE:
        return 503
    if reason in (ReasonCode.BAD_REQUEST, ReasonCode.MANIFEST_UNKNOWN):
        return 400
    return 403


class AbcError(Exception):
    """Base of every error that answers hostile or invalid input with a reason code.

    Callers read ``reason`` and never match message text; the message is detail for the log.
    """

    reason: ReasonCode = ReasonCode.BAD_REQUEST


class BadRequest(AbcError):
    reason = ReasonCode.BAD_REQUEST


class MappingError(BadRequest, ValueError):
    """A protocol request that cannot be mapped to an action as sent: refused."""

    reason = ReasonCode.BAD_REQUEST
