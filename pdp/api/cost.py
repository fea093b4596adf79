"""The worst case a model call may spend: one formula, for the PDP that reserves it and the
PEP that settles a call whose real usage it could not read.

Two formulas let a shadow run settle below what it reserved (the PEP once counted a
refused call's absent cap as 0, where the PDP had reserved the cap the call asked for).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["worst_case_tokens"]


def worst_case_tokens(obligations: Mapping[str, Any], max_tokens: int, input_bytes: int) -> int:
    """The completion cap plus an upper bound on the prompt (its size in bytes).

    The cap is the decision's ``max_tokens`` obligation, else the one the call asked for
    (a refused call forwarded by a shadow run carries no obligation).
    """
    return int(obligations.get("max_tokens", max_tokens or 0)) + input_bytes
