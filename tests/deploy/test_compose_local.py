"""How compose.yaml is mapped onto local processes: consistently, and refusing what cannot work."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.deploy.compose import LocalCompose, interpolate, load_compose, parse_duration


@pytest.fixture
def compose() -> dict:
    return load_compose()


def local(compose: dict) -> LocalCompose:
    return LocalCompose(compose, {"model-cache": Path("/tmp/model-cache")})


def test_addresses_follow_the_declared_ports(compose: dict) -> None:
    mapped = local(compose)
    services = {
        s.name: s for s in mapped.local_services({"RADIXSERVE_CACHE_DIR": "/var/cache/radixserve"})
    }
    scheduler, executor = services["scheduler"], services["executor"]
    assert (
        scheduler.argv[scheduler.argv.index("--executor") + 1]
        == f"127.0.0.1:{executor.ports[30002]}"
    )
    assert executor.argv[executor.argv.index("--port") + 1] == str(executor.ports[30002])
    for svc, port in [(executor, 9401), (scheduler, 9402), (services["tokenizer"], 9400)]:
        assert svc.argv[svc.argv.index("--metrics-port") + 1] == str(svc.ports[port]), svc.name
    metrics_ports = [
        s.argv[s.argv.index("--metrics-port") + 1]
        for s in services.values()
        if "--metrics-port" in s.argv
    ]
    assert len(set(metrics_ports)) == 3, "one local port per service, as one per container"
    assert executor.env["RADIXSERVE_CACHE_DIR"] == "/tmp/model-cache"
    assert str(services["gateway"].ports[8000]) in services["gateway"].healthcheck[-1]
    assert services["gateway"].depends_on == {
        "tokenizer": "service_healthy",
        "scheduler": "service_healthy",
    }


@pytest.mark.parametrize(
    ("service", "old", "new", "error"),
    [
        ("scheduler", "executor:30002", "executor:30001", "declares only ports"),
        ("scheduler", "executor:30002", "engine:30002", "names no service"),
        ("executor", "30002", "30009", "does not declare"),
        ("scheduler", "9402", "9409", "does not declare"),
    ],
)
def test_wiring_mistakes_are_refused(
    compose: dict, service: str, old: str, new: str, error: str
) -> None:
    broken = copy.deepcopy(compose)
    broken["services"][service]["command"] = [
        new if a == old else a for a in broken["services"][service]["command"]
    ]
    with pytest.raises(ValueError, match=error):
        local(broken).local_services({})


def test_interpolation_defaults() -> None:
    doc = {"a": "${X:-1}", "b": ["${Y-2}", "$${Z}"], "c": "${X:-1}:${W:-8000}"}
    assert interpolate(doc, {}) == {"a": "1", "b": ["2", "${Z}"], "c": "1:8000"}
    assert interpolate(doc, {"X": "5", "Y": ""}) == {"a": "5", "b": ["", "${Z}"], "c": "5:8000"}


def test_durations() -> None:
    assert parse_duration("1m30s") == 90 and parse_duration("250ms") == 0.25
