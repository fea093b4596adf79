"""PepMetrics counts through the children made at start-up; its label sets stay closed."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pdp.api import ReasonCode
from pep.metrics import PepMetrics


def _series(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


def test_counts_land_in_the_series_made_at_start_and_no_new_one_appears() -> None:
    registry = CollectorRegistry()
    metrics = PepMetrics(registry)
    before = _series(registry)
    metrics.count("openai", "allow")
    metrics.count("mcp", "deny", ReasonCode.TOOL_NOT_ALLOWED)
    metrics.count_shadow("http", ReasonCode.MODEL_NOT_ALLOWED)
    metrics.count_probe(False)
    metrics.observe_upstream("anthropic", 0.003)
    with pytest.raises(KeyError):
        metrics.count("elsewhere", "allow")
    after = _series(registry)
    assert after.keys() == before.keys()
    changed = {key for key in after if after[key] != before[key]}
    assert (
        "abc_pep_requests_total",
        (("decision", "allow"), ("route", "openai")),
    ) in changed
    assert ("abc_pep_denials_total", (("reason", "tool_not_allowed"), ("route", "mcp"))) in changed
    assert (
        "abc_pep_shadow_denials_total",
        (("reason", "model_not_allowed"), ("route", "http")),
    ) in changed
    assert ("abc_pep_probes_total", (("decision", "deny"),)) in changed
    assert ("abc_pep_upstream_seconds_count", (("route", "anthropic"),)) in changed


def test_the_transport_in_use_is_1_the_other_0_and_no_third_is_made() -> None:
    registry = CollectorRegistry()
    metrics = PepMetrics(registry)
    metrics.decide_over("decide_socket")
    series = _series(registry)
    assert series["abc_pep_pdp_transport", (("transport", "decide_socket"),)] == 1
    assert series["abc_pep_pdp_transport", (("transport", "grpc"),)] == 0
    with pytest.raises(KeyError):
        metrics.decide_over("http")
    assert _series(registry) == series
