"""The metrics the deploy files use and where they scrape them.

Uses: every series the dashboard, the alerts, the KEDA trigger and the adapter rule name. Reference:
docs/metrics.md's table (metric -> the services that serve it, its type). Scrapes: the targets of
compose's Prometheus (prometheus.yml over compose.yaml's services) and of the Kubernetes
PodMonitors (over the containers whose named ports they scrape), each with the port the service's
own command line serves metrics on, so the two can be compared.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.cli import service_config
from tests.deploy.compose import image_env, is_own_image, load_compose
from tests.deploy.manifests import Cluster, command_of

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "radixserve.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
KEDA = ROOT / "deploy" / "k8s" / "base" / "engine-keda.yaml"
ADAPTER_VALUES = ROOT / "deploy" / "k8s" / "overlays" / "prometheus-adapter" / "adapter-values.yaml"
METRICS_DOC = ROOT / "docs" / "metrics.md"
PREFIX = "radixserve:"
SERVICES = ("gateway", "tokenizer", "scheduler", "executor")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
IMAGE_ENV = {k: v for k, v in image_env().items() if k.startswith("RADIXSERVE_")}
_TOKEN = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


# --- docs/metrics.md ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Documented:
    services: frozenset[str]
    type: str  # counter, gauge, histogram


@functools.cache
def documented_metrics() -> dict[str, Documented]:
    """docs/metrics.md's reference table: metric name -> the services that serve it, its type."""
    lines = METRICS_DOC.read_text().splitlines()
    (start,) = [i for i, ln in enumerate(lines) if ln.startswith("| metric | service | type |")]
    out: dict[str, Documented] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        name, services, kind = cells[0].strip("`"), cells[1], cells[2]
        served = (
            set(SERVICES)
            if services == "every service"
            else {s.strip() for s in services.split(",")}
        )
        assert served <= set(SERVICES), f"docs/metrics.md: {name} is served by {served}"
        assert kind in ("counter", "gauge", "histogram"), f"docs/metrics.md: {name} is a {kind}"
        out[name] = Documented(frozenset(served), kind)
    assert out, "docs/metrics.md has no reference table"
    return out


def documented_metric(series: str) -> str | None:
    """The metric of docs/metrics.md a series belongs to (a histogram's `_bucket`, `_count` and
    `_sum` series belong to the histogram), or None."""
    docs = documented_metrics()
    if series in docs:
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and base in docs and docs[base].type == "histogram":
            return base
    return None


def serving(series: str) -> frozenset[str]:
    """The services docs/metrics.md says serve a series (empty if it is not documented)."""
    metric = documented_metric(series)
    return documented_metrics()[metric].services if metric else frozenset()


# --- what the deploy files use ------------------------------------------------------------------


def names_in(expr: str) -> set[str]:
    """The series a PromQL expression names: radixserve's own, and the documented standard ones
    (http_*, grpc_server_*, process_*). Label values and functions are not series."""
    tokens = _TOKEN.findall(_STRING.sub('""', expr))
    return {t for t in tokens if t.startswith(PREFIX) or documented_metric(t)}


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for g in groups for rule in g["rules"]]


def keda_queries() -> list[str]:
    doc = yaml.safe_load(KEDA.read_text())
    return [t["metadata"]["query"] for t in doc["spec"]["triggers"] if t["type"] == "prometheus"]


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["external"]


def referenced_metrics() -> dict[str, set[str]]:
    """source -> series names it uses; every source names at least one radixserve series."""
    sources = {
        "dashboard": dashboard_exprs(),
        "alerts": alert_exprs(),
        "KEDA ScaledObject": keda_queries(),
        "prometheus-adapter rule": [r["seriesQuery"] for r in adapter_rules()],
    }
    out = {name: set().union(*(names_in(e) for e in exprs)) for name, exprs in sources.items()}
    for name, names in out.items():
        assert any(n.startswith(PREFIX) for n in names), f"{name} names no radixserve metric"
    return out


# --- where they are scraped ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One scrape target a deploy file declares, and what its service's command line says."""

    where: str  # the compose service or workload/container scraped
    job: str  # the job name its series get
    service: str  # what runs there: gateway, tokenizer, scheduler or executor
    port: int  # the port scraped
    path: str
    metrics_port: int | None  # the port the service serves /metrics on, per its command line


def metrics_port(argv: list[str], env: dict[str, str], where: str) -> int | None:
    """The port `radixserve <argv>` serves /metrics on: the gateway's HTTP port (unless
    --no-metrics), the gRPC services' --metrics-port (None when unset)."""
    cfg: Any = service_config(argv, {**IMAGE_ENV, **env}, where)
    if argv[0] == "gateway":
        return cfg.port if cfg.metrics else None
    return cfg.metrics_port


def prometheus_jobs() -> list[dict]:
    return yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]


def compose_metrics_ports() -> dict[str, int]:
    """compose service -> the port its command line (and environment) serves /metrics on."""
    out = {}
    for name, svc in load_compose()["services"].items():
        if not is_own_image(svc):
            continue
        env = {k: str(v) for k, v in svc.get("environment", {}).items()}
        port = metrics_port([str(a) for a in svc["command"]], env, f"compose {name}")
        if port is not None:
            out[name] = port
    return out


def compose_scrape_targets() -> list[Target]:
    """prometheus.yml's static targets, each resolved to the compose service it names."""
    services = load_compose()["services"]
    ports = compose_metrics_ports()
    out = []
    for job in prometheus_jobs():
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                assert host in services, (
                    f"prometheus.yml job {job['job_name']}: {host} is no service"
                )
                out.append(
                    Target(
                        where=host,
                        job=job["job_name"],
                        service=str(services[host]["command"][0]),
                        port=int(port),
                        path=job.get("metrics_path", "/metrics"),
                        metrics_port=ports.get(host),
                    )
                )
    return out


def _job_of(monitor: dict, endpoint: dict) -> str:
    """The job label a PodMonitor endpoint's series get: a relabeling's, else the operator's
    default `<namespace>/<name>`."""
    job = f"{monitor['metadata'].get('namespace', '')}/{monitor['metadata']['name']}"
    for rule in endpoint.get("relabelings", []):
        if rule.get("targetLabel") == "job" and rule.get("action", "replace").lower() == "replace":
            assert not rule.get("sourceLabels"), "a job relabeling from a fixed value"
            job = rule["replacement"]
    return job


def k8s_scrape_targets(cluster: Cluster) -> list[Target]:
    """Every (PodMonitor endpoint, container) pair: the container of a selected pod that declares
    the endpoint's named port."""
    out = []
    for monitor in cluster.of_kind("PodMonitor"):
        pods = cluster.selected(monitor["spec"]["selector"])
        assert pods, f"PodMonitor {monitor['metadata']['name']} selects no pod"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for w in pods:
                matches = [
                    (c, p)
                    for c in w["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", [])
                    if p.get("name") == endpoint["port"]
                    or p["containerPort"] == endpoint.get("portNumber")
                ]
                where = f"PodMonitor {monitor['metadata']['name']} on {w['metadata']['name']}"
                assert len(matches) == 1, (
                    f"{where}: port {endpoint.get('port')} in {len(matches)} containers"
                )
                ((container, port),) = matches
                argv = command_of(container)
                out.append(
                    Target(
                        where=f"{w['metadata']['name']}/{container['name']}",
                        job=_job_of(monitor, endpoint),
                        service=argv[0],
                        port=port["containerPort"],
                        path=endpoint.get("path", "/metrics"),
                        metrics_port=metrics_port(argv, cluster.env(container), where),
                    )
                )
    return out


def k8s_metrics_ports(cluster: Cluster) -> dict[tuple[str, str], int]:
    """(workload, container) -> the port its command line serves /metrics on."""
    out = {}
    for w, c in cluster.containers():
        where = f"{w['metadata']['name']}/{c['name']}"
        port = metrics_port(command_of(c), cluster.env(c), where)
        if port is not None:
            out[(w["metadata"]["name"], c["name"])] = port
    return out
