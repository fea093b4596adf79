"""The policy engine: Rego evaluated by OPA's own Go engine; no gRPC, HTTP or storage in here."""

from pdp.engine.decision import Decision, EngineError, Reason, parse_decision
from pdp.engine.index import policy_data
from pdp.engine.inputs import engine_value
from pdp.engine.rego import ENTRYPOINT, PreparedPolicy

__all__ = [
    "ENTRYPOINT",
    "Decision",
    "EngineError",
    "PreparedPolicy",
    "Reason",
    "engine_value",
    "parse_decision",
    "policy_data",
]
