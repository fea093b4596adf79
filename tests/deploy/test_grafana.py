"""The Grafana dashboard: every query parses and names metrics and labels the code exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.support import DEPLOY, promtool_parse_problems, selectors, unknown_names

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "abc.json"
# Grafana fills these in before Prometheus sees a query; any other variable is a mistake.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def queries() -> dict[str, str]:
    """Each target's PromQL, keyed by panel title and refId, with Grafana's macros filled in."""
    found = {}
    for panel in panels(json.loads(DASHBOARD.read_text())["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for macro, value in GRAFANA_MACROS.items():
                expr = expr.replace(macro, value)
            found[f"{panel['title']}/{target['refId']}"] = expr
    return found


def test_every_query_parses_for_prometheus(tmp_path: Path) -> None:
    exprs = queries()
    assert len(exprs) >= 10
    leftover = {key: expr for key, expr in exprs.items() if "$" in expr}
    assert not leftover, f"unknown Grafana variables: {leftover}"
    assert promtool_parse_problems(exprs, tmp_path) == ""


def test_every_query_names_metrics_and_labels_the_code_exports() -> None:
    problems = {key: unknown_names(expr) for key, expr in queries().items()}
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}


def test_the_dashboard_shows_decisions_denials_by_reason_latency_and_budgets() -> None:
    exprs = queries().values()
    shown = {s.name for expr in exprs for s in selectors(expr)}
    assert {"abc_pdp_decisions_total", "abc_pep_requests_total"} <= shown
    assert any("by (reason)" in e and "abc_pep_denials_total" in e for e in exprs), (
        "no panel shows the sidecar's denials by reason"
    )
    assert {"abc_pdp_decide_seconds_bucket", "abc_pep_decision_seconds_bucket"} <= shown
    assert any(re.search(r"histogram_quantile\(0\.99,", e) for e in exprs)
    assert "abc_pdp_budget_remaining_ratio" in shown


def test_panels_use_the_provisioned_datasource_and_unique_ids() -> None:
    provisioned = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    uids = {source["uid"] for source in provisioned}
    all_panels = list(panels(json.loads(DASHBOARD.read_text())["panels"]))
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids))
    for panel in all_panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for source in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert source == {"type": "prometheus", "uid": source["uid"]}
            assert source["uid"] in uids, panel["title"]
