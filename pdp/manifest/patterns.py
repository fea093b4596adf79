"""Argument patterns are Go RE2 regexes, as OPA's ``regex.match`` reads them.

The policy judges a pattern with OPA's engine, so a pattern is checked by that same
engine when a manifest is frozen and again when it is verified: one that OPA does not
compile (Python-only syntax such as lookarounds or backreferences) is refused there,
naming the field, instead of failing every decision that uses it.
"""

from __future__ import annotations

from pdp.opa import OpaError, new_engine

__all__ = ["check_pattern"]


def check_pattern(pattern: str) -> str:
    """``pattern`` if OPA compiles it; ``ValueError`` saying why not."""
    engine = new_engine()
    try:
        rows = engine.eval_query("valid := regex.is_valid(input.pattern)", {"pattern": pattern})
    except OpaError as exc:
        raise ValueError(f"pattern is not text OPA can read: {exc.message}") from exc
    finally:
        engine.close()
    if rows != [{"valid": True}]:
        raise ValueError("pattern does not compile in OPA's regex.match (Go RE2 syntax)")
    return pattern
