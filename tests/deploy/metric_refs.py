"""Every Prometheus series the deploy files name: dashboard, alerts, KEDA trigger, adapter rule."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "radixserve.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
KEDA = ROOT / "deploy" / "k8s" / "base" / "engine-keda.yaml"
ADAPTER_VALUES = ROOT / "deploy" / "k8s" / "overlays" / "prometheus-adapter" / "adapter-values.yaml"
_NAME = re.compile(r"radixserve:[A-Za-z0-9_:]+")


def names_in(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


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
    """source -> series names it uses; every source names at least one."""
    sources = {
        "dashboard": dashboard_exprs(),
        "alerts": alert_exprs(),
        "KEDA ScaledObject": keda_queries(),
        "prometheus-adapter rule": [r["seriesQuery"] for r in adapter_rules()],
    }
    out = {name: set().union(*(names_in(e) for e in exprs)) for name, exprs in sources.items()}
    for name, names in out.items():
        assert names, f"{name} names no radixserve metric"
    return out
