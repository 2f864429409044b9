"""compose.yaml, run for real: its services as local processes, wired only by what the file says.

Each radixserve service starts with its `command` and `environment` (over the image's RADIXSERVE_*
ENV) once its `depends_on` conditions hold, checked by running the healthcheck commands the file
declares; then a chat completion goes through the gateway's published port, and every service's
metrics endpoint is scraped where deploy/prometheus/prometheus.yml scrapes it. A wrong command, port,
variable, healthcheck or dependency in the file fails here. The executor's KV pool is made small
(memory-related variables only), and the model-cache volume is the local model cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy import manifests, metric_refs
from tests.deploy.compose import LocalCompose, entrypoint, image_env, load_compose
from tests.deploy.stack import Stack, running

pytestmark = pytest.mark.slow
STARTUP_TIMEOUT_S = 240.0
# Memory only: a small KV pool and request table instead of a workstation's.
LIGHT_EXECUTOR = {
    "RADIXSERVE_MAX_TOTAL_TOKENS": "8192",
    "RADIXSERVE_MAX_RUNNING_REQUESTS": "16",
    "RADIXSERVE_CONTEXT_LENGTH": "1024",
}


@pytest.fixture(scope="module")
def local(default_model_dir: Path) -> LocalCompose:
    cache_root = default_model_dir.parents[1]  # <cache>/models/<model>: the model-cache volume
    return LocalCompose(load_compose(), {"model-cache": cache_root})


@pytest.fixture(scope="module")
def stack(local: LocalCompose, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    assert entrypoint() == ["radixserve"], "the services run as `radixserve <command>`"
    base_env = {k: v for k, v in image_env().items() if k.startswith("RADIXSERVE_")}
    services = local.local_services(base_env)
    for svc in services:
        if svc.argv[0] == "executor":
            svc.env.update(LIGHT_EXECUTOR)
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("RADIXSERVE_")]:
            mp.delenv(key)  # a container sees only its image's and its own environment
        with running(services, tmp_path_factory.mktemp("compose-logs"), STARTUP_TIMEOUT_S) as s:
            yield s


@pytest.fixture(scope="module")
def gateway_url(stack: Stack) -> str:
    gateway = stack.services["gateway"]
    published = load_compose()["services"]["gateway"]["ports"]
    assert published, "the gateway's port is published"
    container_port = int(str(published[0]).rsplit(":", 1)[-1])
    return f"http://127.0.0.1:{gateway.local_port(container_port)}"


@pytest.fixture(scope="module")
def chat_reply(gateway_url: str) -> str:
    client = OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", timeout=120)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name one prime number."}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    return reply.choices[0].message.content or ""


def test_every_service_started_and_passed_its_healthcheck(stack: Stack) -> None:
    assert set(stack.services) == {"tokenizer", "executor", "scheduler", "gateway"}
    for name, svc in stack.services.items():
        assert svc.healthcheck is not None, f"{name} declares no healthcheck"
        assert stack.healthy(name)


def test_chat_completion_through_the_published_port(chat_reply: str) -> None:
    assert chat_reply.strip()


def exposed_series(text: str) -> set[str]:
    """The series names a /metrics page declares: its samples, and the series of every family it
    declares (a labelled counter nothing has counted yet has its HELP and TYPE but no sample)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}{suffix}" for suffix in metric_refs.HISTOGRAM_SUFFIXES}
        else:
            names.add(family.name)
    return names


@pytest.fixture(scope="module")
def scraped(stack: Stack, local: LocalCompose, chat_reply: str) -> dict[str, set[str]]:
    """service (gateway, tokenizer, scheduler, executor) -> the series its endpoint exposes,
    scraped after a chat completion at the targets prometheus.yml gives (mapped like the rest)."""
    out = {}
    for target in metric_refs.compose_scrape_targets():
        address = local.address("prometheus", target.where, target.port)
        response = httpx.get(f"http://{address}{target.path}", timeout=10)
        assert response.status_code == 200, f"{target.job}: {response.status_code}"
        out[target.service] = exposed_series(response.text)
    return out


def test_every_service_exposes_its_metrics_where_prometheus_scrapes(
    scraped: dict[str, set[str]],
) -> None:
    assert set(scraped) == set(metric_refs.SERVICES)
    for service, names in scraped.items():
        assert "process_resident_memory_bytes" in names, service
        assert any(n.startswith("radixserve:") or n.startswith("grpc_server_") for n in names), (
            f"{service} exposes none of its own series"
        )


def test_metrics_named_by_dashboards_alerts_and_autoscalers_are_exposed(
    scraped: dict[str, set[str]],
) -> None:
    """Each series a deploy file uses is on the endpoint of every service docs/metrics.md says
    serves it, and on no other radixserve endpoint (a sum over instances would count it twice)."""
    for source, names in metric_refs.referenced_metrics().items():
        for name in sorted(names):
            servers = metric_refs.serving(name)
            assert servers, f"{source}: {name} is not in docs/metrics.md"
            for service, exposed in scraped.items():
                if service in servers:
                    assert name in exposed, f"{source} uses {name}, which {service} does not expose"
                else:
                    assert name not in exposed, f"{service} exposes {name}, a {servers} series"
    for name in ("radixserve:num_requests_waiting", "radixserve:kv_cache_usage_perc"):
        assert name in scraped["scheduler"] and name not in scraped["gateway"], name


def test_docs_metrics_table_is_what_each_service_serves(scraped: dict[str, set[str]]) -> None:
    """docs/metrics.md's reference table, both ways: every metric it lists is on the endpoint of
    each service it names (with a histogram's series), and every radixserve:, http_ and
    grpc_server_ series a service exposes is listed for that service."""
    ours = ("radixserve:", "http_", "grpc_server_")
    for name, doc in metric_refs.documented_metrics().items():
        series = (
            [f"{name}{suffix}" for suffix in metric_refs.HISTOGRAM_SUFFIXES]
            if doc.type == "histogram"
            else [name]
        )
        for service in doc.services:
            missing = [s for s in series if s not in scraped[service]]
            assert not missing, f"docs/metrics.md lists {name} on the {service}: {missing} absent"
    for service, exposed in scraped.items():
        for series in sorted(exposed):
            if series.startswith(ours):
                assert service in metric_refs.serving(series), (
                    f"the {service} exposes {series}, which docs/metrics.md does not list for it"
                )


def test_probe_paths_answer_on_the_running_gateway(gateway_url: str) -> None:
    paths = {probe["httpGet"]["path"] for probe in manifests.http_probes("gateway")}
    assert paths, "the gateway has HTTP probes"
    for path in sorted(paths):
        assert httpx.get(f"{gateway_url}{path}", timeout=10).status_code == 200, path
