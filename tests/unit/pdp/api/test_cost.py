"""The one worst-case formula the PDP reserves with and the PEP settles unread usage with."""

from __future__ import annotations

import pytest

from pdp.action import validate_action
from pdp.api.cost import worst_case_tokens
from pdp.engine import Decision
from pdp.ledger import cost_of


@pytest.mark.parametrize(
    ("obligations", "max_tokens", "input_bytes", "worst"),
    [
        ({"max_tokens": 512}, 100, 40, 552),  # the decision's cap wins over the request's
        ({"max_tokens": 512.0}, 0, 0, 512),  # a Struct carries the cap as a double
        ({}, 100, 40, 140),  # no obligation (a shadow run's refused call): the asked cap
        ({}, 0, 40, 40),  # no cap at all: the prompt bound alone
    ],
    ids=["obligation", "double", "no-obligation", "no-cap"],
)
def test_worst_case_tokens(
    obligations: dict[str, float], max_tokens: int, input_bytes: int, worst: int
) -> None:
    assert worst_case_tokens(obligations, max_tokens, input_bytes) == worst


def test_the_pdp_reserves_what_the_pep_settles_for_a_shadow_refusal() -> None:
    action = validate_action("model", "model:openai/gpt-4o", max_tokens=300, input_bytes=50)
    refused = Decision(False, (), {})  # a shadow run forwards it: no cap obligation
    reserved = cost_of(action, refused).tokens
    assert reserved == 350
    assert worst_case_tokens({}, action.max_tokens, action.input_bytes) == reserved
