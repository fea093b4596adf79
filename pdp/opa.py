"""OPA's Go engine, made the one way the PDP makes it: ``new_engine()``.

The engine is a Go shared library whose runtime starts its threads when the first engine
is made, and every thread it starts later takes the signal mask of that moment. SIGTERM
and SIGINT must never land on one of them: Python's handler would run on a goroutine's
small stack (Go asks foreign handlers for SA_ONSTACK; Python's has none). A PDP in the
tests once logged no stop 15 s after SIGTERM. Made with both blocked, the Go threads keep
them blocked, and the kernel hands a stop to a Python thread.
"""

from __future__ import annotations

import signal

from opa_bindings import OpaEngine, OpaError

__all__ = ["OpaEngine", "OpaError", "new_engine"]

_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def new_engine() -> OpaEngine:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return OpaEngine()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
