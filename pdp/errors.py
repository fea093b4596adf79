"""ABC's error tree and the one closed set of reason codes.

::

    AbcError                 hostile or invalid input: becomes a denial with a reason code
    ├── BadRequest           malformed request or document        -> bad_request
    │   ├── MappingError     a protocol request not judgeable as sent
    │   └── RequestIdReused  a request id already answered for another action
    ├── SignatureInvalid     envelope, signature or key scope      -> signature_invalid
    ├── ManifestExpired      outside the manifest's validity window -> manifest_expired
    ├── ManifestRollback     version not above the lineage's mark  -> manifest_rollback
    ├── ManifestUnknown      no such run or manifest               -> manifest_unknown
    ├── ShadowNotAllowed     shadow manifest from a key not granted it -> shadow_not_allowed
    ├── RunClosed            the run completed, failed or was revoked -> run_closed
    ├── NotNarrower          a run's narrower widens its grant     -> not_narrower
    ├── RunKeyConflict       a run key started with another narrower -> not_narrower
    ├── RunNotBound          a run of another manifest than the caller's -> run_not_bound
    ├── RunReleased          an ended run's live state was released -> run_released
    ├── FleetRunsExhausted   the grant has as many live runs as it allows -> fleet_runs_exhausted
    ├── StoreUnavailable     the shared run store cannot be reached -> pdp_unavailable
    ├── LogUnavailable       the decision log cannot make a record durable -> pdp_unavailable
    └── PolicyMismatch       pinned policy is not the loaded one   -> policy_mismatch
    ConfigError              the operator's mistake: stops start-up, never a denial

Servers and the PEP read ``AbcError.reason`` and never match message text.
Outward, the reason code is the whole answer; the message is detail for the log.
"""

from __future__ import annotations

from pdp.api.config import ConfigError
from pdp.api.reasons import AbcError, BadRequest, MappingError, ReasonCode

__all__ = [
    "AbcError",
    "BadRequest",
    "ConfigError",
    "FleetRunsExhausted",
    "LogUnavailable",
    "ManifestExpired",
    "ManifestRollback",
    "ManifestUnknown",
    "MappingError",
    "NotNarrower",
    "PolicyMismatch",
    "ReasonCode",
    "RequestIdReused",
    "RunClosed",
    "RunKeyConflict",
    "RunNotBound",
    "RunReleased",
    "ShadowNotAllowed",
    "SignatureInvalid",
    "StoreUnavailable",
]


class RequestIdReused(BadRequest):
    """Logged as a refusal; the first answer given to the request id stays its answer."""

    reason = ReasonCode.BAD_REQUEST


class SignatureInvalid(AbcError):
    reason = ReasonCode.SIGNATURE_INVALID


class ManifestExpired(AbcError):
    reason = ReasonCode.MANIFEST_EXPIRED


class ManifestRollback(AbcError):
    reason = ReasonCode.MANIFEST_ROLLBACK


class ManifestUnknown(AbcError):
    reason = ReasonCode.MANIFEST_UNKNOWN


class ShadowNotAllowed(AbcError):
    reason = ReasonCode.SHADOW_NOT_ALLOWED


class RunClosed(AbcError):
    reason = ReasonCode.RUN_CLOSED


class NotNarrower(AbcError):
    """A narrower that would widen its grant, or leaves no valid manifest."""

    reason = ReasonCode.NOT_NARROWER


class RunKeyConflict(AbcError):
    """A run key already started with another narrower: one key is one run, one grant."""

    reason = ReasonCode.NOT_NARROWER


class RunNotBound(AbcError):
    """A run id named by a caller bound to another manifest than the run's grant."""

    reason = ReasonCode.RUN_NOT_BOUND


class RunReleased(AbcError):
    reason = ReasonCode.RUN_RELEASED


class FleetRunsExhausted(AbcError):
    reason = ReasonCode.FLEET_RUNS_EXHAUSTED


class StoreUnavailable(AbcError):
    """Not the caller's fault, but an answer all the same: without the run's state the PDP
    cannot decide, so it refuses (fail closed)."""

    reason = ReasonCode.PDP_UNAVAILABLE


class LogUnavailable(AbcError):
    """The decision log could not make a record durable (a full disk, an I/O error, a
    closed log). No decision is given unlogged, so the PDP refuses (fail closed). Not a
    ``StoreUnavailable``: what was written to the run store is not the log's to undo."""

    reason = ReasonCode.PDP_UNAVAILABLE


class PolicyMismatch(AbcError):
    reason = ReasonCode.POLICY_MISMATCH
