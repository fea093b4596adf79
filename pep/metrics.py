"""PEP metrics. Label values come from closed sets only; every series exists from start-up."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from pdp.api import ReasonCode

__all__ = ["DECISIONS", "ROUTES", "TRANSPORTS", "PepMetrics"]

# No `_created` series: one per counter and histogram child doubled each scrape, and
# nothing (dashboard, alerts) reads it. Process-wide, and set before any scrape.
disable_created_metrics()  # type: ignore[no-untyped-call]

ROUTES = ("openai", "anthropic", "mcp", "http", "unknown")
# "pass": forwarded without a decision (MCP initialize, notifications, session traffic).
DECISIONS = ("allow", "deny", "pass")
# How decisions reach the PDP: gRPC, the PDP's decide socket (--pdp-socket), or the same
# over TLS (--pdp-decide).
TRANSPORTS = ("grpc", "decide_socket", "decide_tls")
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)


class PepMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "abc_pep_requests",
            "Requests seen, by route and outcome.",
            ["route", "decision"],
            registry=registry,
        )
        self.denials = Counter(
            "abc_pep_denials",
            "Requests refused, by route and reason code.",
            ["route", "reason"],
            registry=registry,
        )
        self.shadow_denials = Counter(
            "abc_pep_shadow_denials",
            "Requests a shadow-mode run forwarded that enforcing would have refused.",
            ["route", "reason"],
            registry=registry,
        )
        # What a tool list's filter asked the PDP: one probe per listed tool, counted apart
        # from requests, so a list that hides tools refuses no request.
        self.probes = Counter(
            "abc_pep_probes",
            "Tool-list probes (may a listed tool be shown?), by outcome.",
            ["decision"],
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "abc_pep_decision_seconds",
            "Time waiting for the PDP's decision.",
            buckets=_BUCKETS,
            registry=registry,
        )
        self.upstream_seconds = Histogram(
            "abc_pep_upstream_seconds",
            "Time from forwarding to the end of the upstream response.",
            ["route"],
            buckets=_BUCKETS,
            registry=registry,
        )
        # Which way this sidecar's decisions go, for a dashboard to tell a sidecar that is
        # meant to decide on the socket but was started without it. Set once, at start-up.
        self.pdp_transport = Gauge(
            "abc_pep_pdp_transport",
            "1 for the transport this sidecar's decisions take to the PDP, 0 for the others.",
            ["transport"],
            registry=registry,
        )
        for transport in TRANSPORTS:
            self.pdp_transport.labels(transport)
        # Every child made here, once, and kept: a ``.labels()`` lookup on each request costs
        # more than the ``inc()`` it leads to. A label value outside the sets is a KeyError,
        # never a new series.
        self._probes = {allowed: self.probes.labels(allowed) for allowed in ("allow", "deny")}
        self._requests = {
            (route, decision): self.requests.labels(route, decision)
            for route in ROUTES
            for decision in DECISIONS
        }
        self._denials = {
            (route, code): self.denials.labels(route, code.value)
            for route in ROUTES
            for code in ReasonCode
        }
        self._shadow_denials = {
            (route, code): self.shadow_denials.labels(route, code.value)
            for route in ROUTES
            for code in ReasonCode
        }
        self._upstream_seconds = {route: self.upstream_seconds.labels(route) for route in ROUTES}

    def decide_over(self, transport: str) -> None:
        if transport not in TRANSPORTS:
            raise KeyError(transport)
        for name in TRANSPORTS:
            self.pdp_transport.labels(name).set(1 if name == transport else 0)

    def count_shadow(self, route: str, reason: ReasonCode | None) -> None:
        if reason is not None:
            self._shadow_denials[route, reason].inc()

    def count(self, route: str, decision: str, reason: ReasonCode | None = None) -> None:
        self._requests[route, decision].inc()
        if decision == "deny" and reason is not None:
            self._denials[route, reason].inc()

    def count_probe(self, allowed: bool) -> None:
        self._probes["allow" if allowed else "deny"].inc()

    def observe_upstream(self, route: str, seconds: float) -> None:
        self._upstream_seconds[route].observe(seconds)
