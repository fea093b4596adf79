"""PDP metrics. Every label value comes from a closed set, and all series exist from start-up."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdp.errors import ReasonCode

__all__ = ["NO_REASON", "PdpMetrics"]

NO_REASON = "none"
_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class PdpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter(
            "abc_pdp_decisions",
            "Decisions made, by outcome and first reason code.",
            ["decision", "reason"],
            registry=registry,
        )
        self.decide_seconds = Histogram(
            "abc_pdp_decide_seconds",
            "Time to decide one action, inside the PDP.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.manifests_rejected = Counter(
            "abc_pdp_manifests_rejected",
            "Manifest registrations refused, by reason code.",
            ["reason"],
            registry=registry,
        )
        self.manifests_registered = Counter(
            "abc_pdp_manifests_registered", "Manifest registrations accepted.", registry=registry
        )
        self.budget_remaining = Gauge(
            "abc_pdp_budget_remaining_ratio",
            "Lowest remaining fraction of each budget across runs.",
            ["budget"],
            registry=registry,
        )
        self.decisions.labels("allow", NO_REASON)
        for code in ReasonCode:
            self.decisions.labels("deny", code.value)
            self.manifests_rejected.labels(code.value)
        for budget in ("tokens", "usd_micros", "tool_calls", "requests"):
            self.budget_remaining.labels(budget).set(1.0)

    def count_decision(self, allow: bool, reason: ReasonCode | None) -> None:
        self.decisions.labels(
            "allow" if allow else "deny", NO_REASON if reason is None else reason.value
        ).inc()

    def set_budget_ratios(self, ratios: dict[str, float]) -> None:
        for budget, ratio in ratios.items():
            self.budget_remaining.labels(budget).set(ratio)
