"""Run state and budget ledgers: in this process (default) or in Redis (replicas)."""

from pdp.runstore.base import BUDGETS, Books, RunState, RunStore, Usage
from pdp.runstore.memory import MemoryRunStore

__all__ = [
    "BUDGETS",
    "Books",
    "MemoryRunStore",
    "RunState",
    "RunStore",
    "Usage",
]
