"""The shipped alert rules: valid for Prometheus, unit-tested by promtool, naming real metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.deploy.support import (
    DEPLOY,
    ROOT,
    promtool_parse_problems,
    run,
    selectors,
    tool,
    unknown_names,
)

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_promtool_accepts_the_rules_and_the_compose_config() -> None:
    promtool = tool("promtool")
    rules = run(promtool, "check", "rules", ALERTS)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = run(promtool, "check", "config", PROMETHEUS / "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_unit_tests_pass() -> None:
    done = run(tool("promtool"), "test", "rules", PROMETHEUS / "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_fail_when_a_threshold_changes(tmp_path: Path) -> None:
    """The unit tests pin the thresholds: raising one makes them fail."""
    (tmp_path / "alerts_test.yml").write_text((PROMETHEUS / "alerts_test.yml").read_text())
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text().replace(") > 10", ") > 100"))
    done = run(tool("promtool"), "test", "rules", tmp_path / "alerts_test.yml")
    assert done.returncode != 0
    assert "alertname: AbcDenialBurst" in done.stdout + done.stderr


def test_the_issue_s_alerts_exist_on_the_right_signals() -> None:
    rules = alert_rules()
    watched = {
        name: {(s.name, str(s.matchers)) for s in selectors(rule["expr"])}
        for name, rule in rules.items()
    }
    assert {s for s, _ in watched["AbcDenialBurst"]} == {"abc_pep_denials_total"}
    assert ("abc_pep_denials_total", '{reason="pdp_unavailable"}') in watched["AbcPdpUnavailable"]
    assert (
        "abc_pdp_manifests_rejected_total",
        '{reason="signature_invalid"}',
    ) in watched["AbcManifestSignatureInvalid"]
    assert {s for s, _ in watched["AbcBudgetNearlyExhausted"]} == {"abc_pdp_budget_remaining_ratio"}
    assert {s for s, _ in watched["AbcPdpDecisionLatencyHigh"]} == {"abc_pdp_decide_seconds_bucket"}
    assert "histogram_quantile(0.99" in rules["AbcPdpDecisionLatencyHigh"]["expr"]


def test_alerts_name_only_metrics_and_labels_the_code_exports() -> None:
    problems = {name: unknown_names(rule["expr"]) for name, rule in alert_rules().items()}
    assert not any(problems.values()), problems


def test_the_metric_check_catches_a_misspelt_metric_or_reason(tmp_path: Path) -> None:
    assert unknown_names('increase(abc_pep_denial_total{reason="pdp_unavailable"}[5m])')
    assert unknown_names('increase(abc_pep_denials_total{reason="pdp_unreachable"}[5m])')
    assert promtool_parse_problems({"bad": "sum(rate(abc_pep_denials_total[5m])"}, tmp_path)


def test_every_alert_has_severity_summary_a_unit_test_and_a_readme_entry() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired = {
        check["alertname"]
        for test in tests
        for check in test.get("alert_rule_test", [])
        if check.get("exp_alerts")
    }
    readme = (ROOT / "README.md").read_text()
    deploy_section = readme.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    for name, rule in alert_rules().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        assert name in fired, f"no promtool test sees {name} fire"
        assert f"`{name}`" in deploy_section, f"README 'Deploy' does not explain {name}"
