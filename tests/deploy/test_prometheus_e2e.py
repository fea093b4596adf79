"""A real Prometheus on loopback scrapes a real abc-pdp and abc-pep, loads the shipped alert
rules, and sees AbcDenialBurst go to firing after the sidecar refuses a burst of calls."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import promql_parser
import pytest
import yaml

from tests.deploy.support import DEPLOY, tool
from tests.harness import INTENT, PdpProcess, PepProcess, Signer, free_port, start_pdp, start_pep

ALERT = "AbcDenialBurst"
ROUTE, REASON = "http", "http_not_allowed"
DEADLINE_SECONDS = 60
T = TypeVar("T")


def shipped_rules() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text()))


def threshold_of(alert: str) -> float:
    """The N of the shipped `... > N`, so that the test drives just past it."""
    (rule,) = [r for g in shipped_rules()["groups"] for r in g["rules"] if r.get("alert") == alert]
    expr = promql_parser.parse(rule["expr"])
    assert isinstance(expr, promql_parser.BinaryExpr) and str(expr.op) == ">"
    assert isinstance(expr.rhs, promql_parser.NumberLiteral)
    return float(expr.rhs.val)


def rules_with_short_for() -> str:
    """The shipped rules, expressions untouched; only `for` shortened so the test is quick."""
    rules = shipped_rules()
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    return yaml.safe_dump(rules)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for(what: str, probe: Callable[[], T | None], deadline: float) -> T:
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            found = probe()
            if found is not None:
                return found
        except (OSError, ValueError) as exc:
            last_error = exc
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error})")


class Prometheus:
    def __init__(self, work: Path, pdp: PdpProcess, pep: PepProcess) -> None:
        (work / "alerts.yml").write_text(rules_with_short_for())
        pep_target = urllib.parse.urlsplit(pep.metrics_url).netloc
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {"job_name": "abc-pdp", "static_configs": [{"targets": [pdp.metrics_address]}]},
                {"job_name": "abc-pep", "static_configs": [{"targets": [pep_target]}]},
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = work / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **query: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(query)}"
        reply = get_json(url)
        assert reply["status"] == "success", reply
        return reply["data"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[PepProcess, Prometheus]]:
    signer = Signer(tmp_path / "signer")
    envelope = tmp_path / "envelope.json"
    envelope.write_bytes(signer.freeze(INTENT.read_text(), "e2e"))
    pdp = start_pdp(signer, tmp_path / "state")
    pep = prometheus = None
    try:
        # Refused calls are never forwarded: the upstream may as well be a closed port.
        closed = {"http:billing.internal": f"http://127.0.0.1:{free_port()}"}
        pep = start_pep(pdp.address, closed, tmp_path, "--manifest", str(envelope))
        (tmp_path / "prometheus").mkdir()
        prometheus = Prometheus(tmp_path / "prometheus", pdp, pep)
        yield pep, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        if pep is not None:
            pep.stop()
        pdp.stop()


def refused_call(pep: PepProcess) -> dict[str, Any]:
    try:
        urllib.request.urlopen(f"{pep.url}/http/billing.internal/admin/secrets", timeout=10)
    except urllib.error.HTTPError as refused:
        assert refused.code == 403
        return dict(json.loads(refused.read()))
    raise AssertionError("the sidecar forwarded a call outside the manifest")


def test_a_burst_of_denials_fires_the_shipped_alert(
    stack: tuple[PepProcess, Prometheus],
) -> None:
    pep, prometheus = stack
    deadline = time.monotonic() + DEADLINE_SECONDS
    series = f'abc_pep_denials_total{{route="{ROUTE}",reason="{REASON}"}}'

    def scraped_at_zero() -> bool | None:
        assert prometheus.process.poll() is None, prometheus.output()
        result = prometheus.api("query", query=series)["result"]
        return True if result and result[0]["value"][1] == "0" else None

    # The counter's zero is scraped first, so the burst is an increase Prometheus can see.
    wait_for("Prometheus to scrape the sidecar", scraped_at_zero, deadline)

    def both_up() -> bool | None:
        # Targets are scraped on their own schedules: the PDP's first scrape may come later.
        targets = prometheus.api("targets")["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        assert set(health) == {"abc-pdp", "abc-pep"} and "down" not in health.values(), health
        return True if set(health.values()) == {"up"} else None

    wait_for("Prometheus to scrape the PDP and the sidecar", both_up, deadline)
    assert prometheus.api("query", query="abc_pdp_decisions_total")["result"]

    burst = int(threshold_of(ALERT)) + 5
    for _ in range(burst):
        assert refused_call(pep)["reason"] == REASON
    assert f'abc_pep_denials_total{{reason="{REASON}",route="{ROUTE}"}} {burst}.0' in pep.metrics()

    def firing() -> dict[str, Any] | None:
        for alert in prometheus.api("alerts")["alerts"]:
            labels = alert["labels"]
            if (labels["alertname"], labels.get("route"), labels.get("reason")) == (
                ALERT,
                ROUTE,
                REASON,
            ) and alert["state"] == "firing":
                return dict(alert)
        return None

    alert = wait_for(f"{ALERT} to fire", firing, deadline)
    assert float(alert["value"]) >= burst
    others = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}
    assert others == {ALERT}, "denials for a policy reason raise no other alert"
