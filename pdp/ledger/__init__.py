"""The ledger: runs, their state and budgets, and what each decision changes in them.

``runs.py`` (a verified manifest and its compiled policy, and its status), ``cost.py`` (the
worst case an action may spend), ``answers.py`` (the answer kept per request id),
``ledger.py`` (reserve, move, settle, expire, release; and the same replayed from the log)
over a run store: ``store.py`` (the interface), ``memory.py`` (this process) or
``redis.py`` (replicas; its scripts in ``lua.py``).
"""

from pdp.ledger.answers import DecisionOutcome
from pdp.ledger.cost import cost_of
from pdp.ledger.ledger import MAX_REPORTED, Applied, Ledger
from pdp.ledger.memory import MemoryRunStore
from pdp.ledger.runs import (
    RegistryState,
    Run,
    RunRegistry,
    check_run_key,
    fleet_of,
    run_id_for,
)
from pdp.ledger.store import (
    ANSWER_WINDOW,
    BUDGETS,
    UNLIMITED,
    Books,
    ClaimInFlight,
    Fleet,
    RunState,
    RunStore,
    Usage,
)

__all__ = [
    "ANSWER_WINDOW",
    "BUDGETS",
    "MAX_REPORTED",
    "UNLIMITED",
    "Applied",
    "Books",
    "ClaimInFlight",
    "DecisionOutcome",
    "Fleet",
    "Ledger",
    "MemoryRunStore",
    "RegistryState",
    "Run",
    "RunRegistry",
    "RunState",
    "RunStore",
    "Usage",
    "check_run_key",
    "cost_of",
    "fleet_of",
    "run_id_for",
]
