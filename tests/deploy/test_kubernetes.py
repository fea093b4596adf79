"""The Kubernetes manifests: valid for a pinned Kubernetes, and consistent with the project
and with each other (programs, flags, paths, probes, ports, selectors, network policies)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tests.deploy.support import (
    DEPLOY,
    ROOT,
    check_invocation,
    in_image,
    load_yaml_documents,
    option_value,
    port_of,
    run,
    tool,
    under,
)

K8S = DEPLOY / "k8s"
# Native sidecars (init containers with restartPolicy: Always) are GA from 1.33.
KUBERNETES_VERSION = "1.33.0"


def kustomization() -> dict[str, Any]:
    return dict(yaml.safe_load((K8S / "kustomization.yaml").read_text()))


def documents() -> list[dict[str, Any]]:
    return [doc for name in kustomization()["resources"] for doc in load_yaml_documents(K8S / name)]


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


def pod_templates() -> dict[str, dict[str, Any]]:
    return {name: d["spec"]["template"] for name, d in of_kind("Deployment").items()}


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


def container(deployment: str, name: str) -> dict[str, Any]:
    (found,) = [c for c in containers(pod_templates()[deployment]) if c["name"] == name]
    return found


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = selector.get("matchLabels", {})
    return all(labels.get(k) == v for k, v in wanted.items())


def container_port(c: dict[str, Any], port: int | str) -> int:
    for declared in c.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    raise AssertionError(f"{c['name']} declares no port {port}")


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    images = {image["name"] for image in kustomization()["images"]}
    ours = {c["image"].split(":")[0] for p in pod_templates().values() for c in containers(p)}
    assert "abc" in images and "abc" in ours


def test_manifests_validate_against_the_pinned_kubernetes() -> None:
    for doc in documents():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_what_kubernetes_would() -> None:
    deployment = copy.deepcopy(of_kind("Deployment")["abc-pdp"])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_every_container_has_requests_limits_and_a_restricted_security_context() -> None:
    namespace = of_kind("Namespace")["abc"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, pod in pod_templates().items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for c in containers(pod):
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) == {"cpu", "memory"}, (name, c["name"])
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, c["name"]
            assert context["capabilities"]["drop"] == ["ALL"], c["name"]
            assert context["readOnlyRootFilesystem"] is True, c["name"]


def test_our_containers_name_our_programs_flags_and_existing_paths() -> None:
    checked = 0
    for pod in pod_templates().values():
        for c in containers(pod):
            if not c["image"].startswith("abc:"):
                continue
            argv = [*c["command"], *c["args"]]
            assert check_invocation(argv) == [], argv
            mounted = {m["mountPath"] for m in c.get("volumeMounts", [])}
            for value in (a.split("=", 1)[-1] for a in c["args"]):
                if value.startswith("/"):
                    assert under(value, mounted) or in_image(value, "runtime"), value
            checked += 1
    assert checked == 2


def test_volumes_come_from_the_manifests_or_from_objects_the_readme_creates() -> None:
    readme = (ROOT / "README.md").read_text()
    created = set(
        re.findall(r"kubectl -n abc create (?:configmap|secret generic) ([\w-]+)", readme)
    )
    claims = set(of_kind("PersistentVolumeClaim"))
    for name, pod in pod_templates().items():
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        for c in containers(pod):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, (name, mount)
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            elif "configMap" in volume:
                assert volume["configMap"]["name"] in created, volume
            elif "secret" in volume:
                assert volume["secret"]["secretName"] in created, volume
            else:
                assert "emptyDir" in volume, volume


def test_the_pdp_speaks_mtls_and_probes_its_plaintext_health_port() -> None:
    deployment = of_kind("Deployment")["abc-pdp"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pdp = container("abc-pdp", "pdp")
    mounts = {m["mountPath"] for m in pdp["volumeMounts"]}
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca"):
        (path,) = option_value(pdp["args"], flag)
        assert str(Path(path).parent) in mounts, flag  # from the abc-pdp-tls Secret
    (health,) = option_value(pdp["args"], "--health")
    (listen,) = option_value(pdp["args"], "--listen")
    assert port_of(health) != port_of(listen)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert pdp[probe]["grpc"]["port"] == port_of(health) == container_port(pdp, "health")
    (state,) = option_value(pdp["args"], "--state")
    assert state in {m["mountPath"] for m in pdp["volumeMounts"]}


def test_the_sidecar_is_a_native_sidecar_on_loopback_that_the_agent_uses() -> None:
    pod = pod_templates()["support-bot"]
    (pep,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "abc-pep"]
    assert pep["restartPolicy"] == "Always"
    (listen,) = option_value(pep["args"], "--listen")
    assert listen.startswith("127.0.0.1:")
    (metrics,) = option_value(pep["args"], "--metrics")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert pep[probe]["httpGet"]["path"] == "/metrics"
        assert container_port(pep, pep[probe]["httpGet"]["port"]) == port_of(metrics)
    agent = container("support-bot", "agent")
    urls = [e["value"] for e in agent["env"] if e["name"].endswith("_URL")]
    assert urls and all(url.startswith(f"http://{listen}/") for url in urls)
    routes = {urlsplit(url).path.split("/")[1] for url in urls}
    assert routes == {"openai", "anthropic", "mcp", "http"}


@pytest.mark.parametrize(
    ("ours", "theirs"), [("--pdp", "--listen"), ("--pdp-decide", "--decide-listen")]
)
def test_the_sidecar_finds_the_pdp_through_its_service(ours: str, theirs: str) -> None:
    (pep,) = pod_templates()["support-bot"]["spec"]["initContainers"]
    (address,) = option_value(pep["args"], ours)
    host, port = address.rsplit(":", 1)
    name, namespace, *_ = host.split(".")
    service = of_kind("Service")[name]
    assert service["metadata"]["namespace"] == namespace
    assert selects(
        {"matchLabels": service["spec"]["selector"]},
        pod_templates()["abc-pdp"]["metadata"]["labels"],
    )
    (served,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    pdp = container("abc-pdp", "pdp")
    assert container_port(pdp, served["targetPort"]) == port_of(
        option_value(pdp["args"], theirs)[0]
    )
    # Over mTLS: the PDP's certificate must name the Service (abcctl certs --pdp-host).
    mounts = {m["mountPath"] for m in pep["volumeMounts"]}
    for flag in ("--pdp-ca", "--pdp-cert", "--pdp-key"):
        (path,) = option_value(pep["args"], flag)
        assert str(Path(path).parent) in mounts, flag
    readme = (ROOT / "README.md").read_text()
    assert f"--pdp-host {host}" in readme


def test_prometheus_annotations_name_the_metrics_ports() -> None:
    for name, pod in pod_templates().items():
        annotations = pod["metadata"]["annotations"]
        ours = [c for c in containers(pod) if c["image"].startswith("abc:")]
        ports = {port_of(option_value(c["args"], "--metrics")[0]) for c in ours}
        assert {int(annotations["prometheus.io/port"])} == ports, name
        assert annotations["prometheus.io/path"] == "/metrics"


def reaches(peer: dict[str, Any], labels: dict[str, str]) -> bool:
    """A policy peer that selects pods with these labels in the policy's own namespace."""
    return (
        "podSelector" in peer
        and "namespaceSelector" not in peer
        and selects(peer["podSelector"], labels)
    )


def policy_ports(rule: dict[str, Any]) -> set[int]:
    return {int(p["port"]) for p in rule.get("ports", [])}


def test_network_policies_deny_by_default_and_admit_only_the_sidecar_s_needs() -> None:
    policies = of_kind("NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    pods = pod_templates()
    pdp_labels = pods["abc-pdp"]["metadata"]["labels"]
    agent_labels = pods["support-bot"]["metadata"]["labels"]
    pdp = container("abc-pdp", "pdp")
    served = {container_port(pdp, "grpc"), container_port(pdp, "decide")}

    to_pdp = policies["abc-pdp"]["spec"]
    assert selects(to_pdp["podSelector"], pdp_labels)
    assert to_pdp["egress"] == []
    sidecars = [r for r in to_pdp["ingress"] if any("podSelector" in f for f in r["from"])]
    (from_sidecars,) = sidecars
    assert policy_ports(from_sidecars) == served
    assert selects(from_sidecars["from"][0]["podSelector"], agent_labels)
    for rule in to_pdp["ingress"]:
        assert policy_ports(rule) <= {p["containerPort"] for p in pdp["ports"]}

    agent = policies["support-bot"]["spec"]
    assert selects(agent["podSelector"], agent_labels)
    assert set(agent["policyTypes"]) == {"Ingress", "Egress"}
    (pep,) = pods["support-bot"]["spec"]["initContainers"]
    assert all(policy_ports(r) == {container_port(pep, "metrics")} for r in agent["ingress"])
    (to_pdp_rule,) = [r for r in agent["egress"] if any(reaches(f, pdp_labels) for f in r["to"])]
    assert policy_ports(to_pdp_rule) == served
    for rule in agent["egress"]:
        assert rule.get("ports"), "every egress rule names its ports"
        for peer in rule["to"]:
            assert peer.get("ipBlock", {}).get("cidr") != "0.0.0.0/0"
    # The in-cluster upstreams the egress admits are the ones the sidecar forwards to.
    upstream_ports = {
        urlsplit(u.split("=", 1)[1]).port
        for u in option_value(pep["args"], "--upstream")
        if ".svc.cluster.local" in u
    }
    egress_ports = {p for r in agent["egress"] for p in policy_ports(r)}
    assert upstream_ports and upstream_ports <= egress_ports


def test_the_kubernetes_validate_command_agrees() -> None:
    files = [K8S / name for name in kustomization()["resources"]]
    done = run(tool("kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", "--quiet", *files)
    assert done.returncode == 0, done.stdout + done.stderr
