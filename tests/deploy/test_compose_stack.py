"""compose.yaml, run for real: its services as local processes, wired only by what the file says.

Each radixserve service starts with its `command` and `environment` (over the image's RADIXSERVE_*
ENV) once its `depends_on` conditions hold, checked by running the healthcheck commands the file
declares; then a chat completion goes through the gateway's published port. A wrong command, port,
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
def stack(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    assert entrypoint() == ["radixserve"], "the services run as `radixserve <command>`"
    compose = load_compose()
    cache_root = default_model_dir.parents[1]  # <cache>/models/<model>: the model-cache volume
    local = LocalCompose(compose, {"model-cache": cache_root})
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


def test_metrics_named_by_dashboards_alerts_and_autoscalers_are_exposed(
    gateway_url: str, chat_reply: str
) -> None:
    text = httpx.get(f"{gateway_url}/metrics", timeout=10).text
    exposed = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    for source, names in metric_refs.referenced_metrics().items():
        missing = sorted(names - exposed)
        assert not missing, f"{source} names metrics /metrics does not expose: {missing}"


def test_probe_paths_answer_on_the_running_gateway(gateway_url: str) -> None:
    paths = {probe["httpGet"]["path"] for probe in manifests.http_probes("gateway")}
    assert paths, "the gateway has HTTP probes"
    for path in sorted(paths):
        assert httpx.get(f"{gateway_url}{path}", timeout=10).status_code == 200, path
