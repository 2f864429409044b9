"""The deploy files validate offline against their schemas.

compose files: the Compose Specification's JSON Schema (vendored in deploy/schemas). Kubernetes
kinds: the schemas bundled in `kubernetes-validate`, strict (unknown fields fail), for the oldest and
newest versions the manifests target. KEDA's ScaledObject: a focused schema of its own, its HPA
behavior against Kubernetes' HorizontalPodAutoscalerBehavior; the Prometheus Operator's PodMonitor
likewise. Prometheus and Grafana files: their structure and cross-references (which ports they
scrape: test_consistency.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy import manifests, metric_refs
from tests.deploy.compose import COMPOSE_FILE, interpolate

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "deploy" / "schemas"
COMPOSE_FILES = [COMPOSE_FILE, ROOT / "deploy" / "compose.gpu.yaml"]
# grpc probes are GA since 1.27; test against an older supported release and the newest bundled.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


# apiVersion prefix -> focused schema, for the kinds Kubernetes' own schemas do not cover
CUSTOM_SCHEMAS = {
    "keda.sh/": "keda-scaledobject.json",
    "monitoring.coreos.com/": "prometheus-operator-podmonitor.json",
}


def validate_k8s(doc: dict, version: str) -> None:
    custom = [f for prefix, f in CUSTOM_SCHEMAS.items() if doc["apiVersion"].startswith(prefix)]
    if custom:
        jsonschema.Draft202012Validator(schema(custom[0])).validate(doc)
        behavior = (
            doc["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        )
        if behavior is not None:
            validate_k8s(hpa_with_behavior(behavior), version)
        return
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(
            f"{doc['kind']}/{doc['metadata']['name']} ({version}): {exc}"
        ) from None


def hpa_with_behavior(behavior: dict) -> dict:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "behavior-check"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "x"},
            "maxReplicas": 1,
            "behavior": behavior,
        },
    }


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec(path: Path) -> None:
    doc = interpolate(yaml.safe_load(path.read_text()), {})
    validator = jsonschema.Draft201909Validator(schema("compose-spec.json"))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_compose_schema_rejects_a_misspelt_key() -> None:
    doc = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), {})
    doc["services"]["gateway"]["healthchek"] = doc["services"]["gateway"].pop("healthcheck")
    assert not jsonschema.Draft201909Validator(schema("compose-spec.json")).is_valid(doc)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "path", manifests.resource_files(), ids=lambda p: str(p.relative_to(manifests.K8S))
)
def test_manifest_files_validate(path: Path, version: str) -> None:
    for doc in manifests.load_docs(path):
        validate_k8s(doc, version)


@pytest.mark.parametrize("variant", sorted(manifests.VARIANTS))
def test_kustomize_builds_validate(variant: str) -> None:
    if manifests.kubectl() is None:
        pytest.skip("kubectl (which bundles kustomize) is not installed")
    docs = manifests.build(variant)
    assert docs
    for doc in docs:
        validate_k8s(doc, K8S_VERSIONS[-1])
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "radixserve", doc["metadata"]["name"]


@pytest.mark.parametrize(
    "path", manifests.kustomizations(), ids=lambda p: str(p.relative_to(manifests.K8S))
)
def test_kustomizations_use_known_fields_and_existing_paths(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert doc["kind"] == "Kustomization"
    assert set(doc) <= KUSTOMIZATION_KEYS, set(doc) - KUSTOMIZATION_KEYS
    for entry in doc.get("resources", []):
        assert (path.parent / entry).exists(), entry
    for patch in doc.get("patches", []):
        if "path" in patch:
            assert (path.parent / patch["path"]).is_file(), patch["path"]


def test_scaled_object_schema_rejects_a_misspelt_key() -> None:
    doc = yaml.safe_load(metric_refs.KEDA.read_text())
    doc["spec"]["maxReplicas"] = doc["spec"].pop("maxReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(doc, K8S_VERSIONS[-1])


def test_pod_monitor_schema_rejects_a_misspelt_key() -> None:
    (doc, *_) = manifests.load_docs(manifests.BASE / "monitoring.yaml")
    endpoint = doc["spec"]["podMetricsEndpoints"][0]
    endpoint["metricsPath"] = endpoint.pop("path")
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(doc, K8S_VERSIONS[-1])


def test_prometheus_config_scrapes_every_service_and_loads_the_alerts() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    compose = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), {})
    mounts = dict(
        reversed(v.split(":")[:2])
        for v in compose["services"]["prometheus"]["volumes"]
        if v.startswith("./")
    )
    for rule_file in config["rule_files"]:
        assert rule_file in mounts, f"{rule_file} is not mounted into the Prometheus container"
        assert (ROOT / mounts[rule_file]).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {f"radixserve-{s}" for s in metric_refs.SERVICES}
    assert jobs["radixserve-gateway"]["static_configs"][0]["targets"] == ["gateway:8000"]
    assert "8000" in compose["services"]["gateway"]["ports"][0].rsplit(":", 1)[-1]
    watched = set()
    for expr in metric_refs.alert_exprs():
        for op, value in re.findall(r'\bup\{[^}]*\bjob\s*(=~|=)\s*"([^"]*)"', expr):
            matched = {j for j in jobs if (re.fullmatch(value, j) if op == "=~" else j == value)}
            assert matched, f"{expr}: no job of prometheus.yml"
            watched |= matched
    assert watched == set(jobs), f"no alert fires when {sorted(set(jobs) - watched)} goes down"


def test_alert_rules_are_well_formed() -> None:
    groups = yaml.safe_load(metric_refs.ALERTS.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] and rule["expr"].count("(") == rule["expr"].count(")")
            assert rule["labels"]["severity"] in ("warning", "critical")


def test_grafana_dashboard_is_provisioned_with_its_datasource() -> None:
    base = ROOT / "deploy" / "grafana"
    datasources = yaml.safe_load(
        (base / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    providers = yaml.safe_load(
        (base / "provisioning" / "dashboards" / "radixserve.yml").read_text()
    )
    compose = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), {})
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert mounts[providers["providers"][0]["options"]["path"]] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    uid = datasources["datasources"][0]["uid"]
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    dashboard = json.loads(metric_refs.DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    topics = (
        "first token",
        "inter-token",
        "throughput",
        "queue depth",
        "kv cache",
        "prefix cache",
        "preemptions",
        "queue time",
        "prefill time",
        "decode time",
        "iteration tokens",
        "forward time",
        "5xx",
    )
    for topic in topics:
        assert topic in titles, topic
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
