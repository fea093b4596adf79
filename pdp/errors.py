"""ABC's error tree and the one closed set of reason codes.

::

    AbcError                 hostile or invalid input: becomes a denial with a reason code
    ├── BadRequest           malformed request or document        -> bad_request
    ├── SignatureInvalid     envelope, signature or key scope      -> signature_invalid
    ├── ManifestExpired      outside the manifest's validity window -> manifest_expired
    ├── ManifestRollback     version not above the lineage's mark  -> manifest_rollback
    ├── ManifestUnknown      no such run or manifest               -> manifest_unknown
    └── PolicyMismatch       pinned policy is not the loaded one   -> policy_mismatch
    ConfigError              the operator's mistake: stops start-up, never a denial

Servers and the PEP read ``AbcError.reason`` and never match message text.
Outward, the reason code is the whole answer; the message is detail for the log.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "AbcError",
    "BadRequest",
    "ConfigError",
    "ManifestExpired",
    "ManifestRollback",
    "ManifestUnknown",
    "PolicyMismatch",
    "ReasonCode",
    "SignatureInvalid",
]


class ReasonCode(StrEnum):
    """The closed set of reason codes (a Prometheus label: never caller text)."""

    MODEL_NOT_ALLOWED = "model_not_allowed"
    TOOL_NOT_ALLOWED = "tool_not_allowed"
    TOOL_ARGS_INVALID = "tool_args_invalid"
    HTTP_NOT_ALLOWED = "http_not_allowed"
    STEP_OUT_OF_ORDER = "step_out_of_order"
    BUDGET_EXHAUSTED = "budget_exhausted"
    MANIFEST_EXPIRED = "manifest_expired"
    MANIFEST_UNKNOWN = "manifest_unknown"
    # Not in DESIGN.md's first list: a rolled-back manifest is validly signed and
    # unexpired, so neither signature_invalid nor manifest_expired would tell the
    # operator what happened (issue 3 asks for "their reason").
    MANIFEST_ROLLBACK = "manifest_rollback"
    # Also an addition: a manifest pinned to another policy bundle than the PDP's is a
    # deployment skew an operator must see as such, not as a bad signature.
    POLICY_MISMATCH = "policy_mismatch"
    SIGNATURE_INVALID = "signature_invalid"
    PDP_UNAVAILABLE = "pdp_unavailable"
    BAD_REQUEST = "bad_request"


class AbcError(Exception):
    """Base of every error that answers hostile or invalid input with a reason code."""

    reason: ReasonCode = ReasonCode.BAD_REQUEST


class BadRequest(AbcError):
    reason = ReasonCode.BAD_REQUEST


class SignatureInvalid(AbcError):
    reason = ReasonCode.SIGNATURE_INVALID


class ManifestExpired(AbcError):
    reason = ReasonCode.MANIFEST_EXPIRED


class ManifestRollback(AbcError):
    reason = ReasonCode.MANIFEST_ROLLBACK


class ManifestUnknown(AbcError):
    reason = ReasonCode.MANIFEST_UNKNOWN


class PolicyMismatch(AbcError):
    reason = ReasonCode.POLICY_MISMATCH


class ConfigError(Exception):
    """A misconfiguration (bad trust store, missing key file, invalid flag).

    Not an ``AbcError``: it stops start-up loudly instead of becoming a denial.
    """
