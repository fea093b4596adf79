"""PDP metrics. Every label value comes from a closed set, and all series exist from start-up."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from pdp.errors import ReasonCode

__all__ = ["NO_REASON", "PdpMetrics"]

# No `_created` series: one per counter and histogram child doubled each scrape, and
# nothing (dashboard, alerts) reads it. Process-wide, and set before any scrape.
disable_created_metrics()  # type: ignore[no-untyped-call]

NO_REASON = "none"
MODES = ("enforce", "shadow")
_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def _ratio_of(lowest_remaining: Callable[[], dict[str, float]], budget: str) -> Callable[[], float]:
    return lambda: lowest_remaining()[budget]


class PdpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter(
            "abc_pdp_decisions",
            "Decisions made, by outcome and first reason code.",
            ["decision", "reason", "mode"],
            registry=registry,
        )
        # A probe (may this tool be listed?) is no call: counted apart, so a tools/list
        # that hides four tools is not four denials of calls.
        self.probes = Counter(
            "abc_pdp_probes",
            "Tool-list probes decided (may a tool be shown?), by outcome.",
            ["decision"],
            registry=registry,
        )
        self.decide_seconds = Histogram(
            "abc_pdp_decide_seconds",
            "Time to decide one action, inside the PDP, until it is durable (with the"
            " decisions made durable together with it, on the decide socket).",
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
        self.runs_started = Counter(
            "abc_pdp_runs_started",
            "Runs started under a registered grant for a run key (StartRun).",
            registry=registry,
        )
        self.budget_remaining = Gauge(
            "abc_pdp_budget_remaining_ratio",
            "Lowest remaining fraction of each budget across running runs.",
            ["budget"],
            registry=registry,
        )
        # Every series exists from start-up; the hot path only looks children up.
        # mode: "enforce", or "shadow" for what a shadow run would have been answered.
        self._allowed = {mode: self.decisions.labels("allow", NO_REASON, mode) for mode in MODES}
        self._denied = {
            (code, mode): self.decisions.labels("deny", code.value, mode)
            for code in ReasonCode
            for mode in MODES
        }
        self._probed = {ok: self.probes.labels("allow" if ok else "deny") for ok in (True, False)}
        for code in ReasonCode:
            self.manifests_rejected.labels(code.value)

    def count_decision(
        self, allow: bool, reason: ReasonCode | None, enforced: bool = True, probe: bool = False
    ) -> None:
        if probe:
            self._probed[allow].inc()
            return
        mode = "enforce" if enforced else "shadow"
        if allow or reason is None:
            self._allowed[mode].inc()
        else:
            self._denied[reason, mode].inc()

    def watch_budgets(self, lowest_remaining: Callable[[], dict[str, float]]) -> None:
        """Compute the budget gauge when scraped, not on every decision."""
        for budget in ("tokens", "usd_micros", "tool_calls", "requests"):
            self.budget_remaining.labels(budget).set_function(_ratio_of(lowest_remaining, budget))
