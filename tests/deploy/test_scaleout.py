"""The gateway as deploy/k8s configures it, in front of two real engines and two tokenizers.

The gateway's command comes from gateway.yaml. Its engine target, `dns:///radixserve-engine:30003`
(every ready pod of the engines' headless Service, found by DNS), is the one flag value translated:
the gateway runs as `radixserve gateway` itself, with the system resolver, and this machine has no
name that resolves to several local engines. It becomes the static addresses of what the lookup
would return: two running scheduler + executor pairs, and one closed port standing for a pod that
is in the answer but does not answer (stopped since the last lookup). Discovery itself, the answer
changing under a running gateway, is tested in tests/gateway/test_router.py and, with a gateway
process whose test-only resolver reads a file, in tests/gateway/test_routing_e2e.py. The one
tokenizer address (the headless Service, several pods behind one name) becomes one gRPC target naming two
tokenizer processes. The engines run the commands of engine.yaml, made light with executor flags;
every process keeps the metrics endpoint its manifest gives it, on a local port of its own (in the
cluster each pod has its own address). The last test stops one engine for good.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from radixserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.deploy.manifests import Cluster, base_docs, command_of, flag_values, split_address
from tests.procs import SERVE_LIGHT as LIGHT_EXECUTOR
from tests.procs import ServiceProcess, free_port

pytestmark = pytest.mark.slow
RUNNING_ENGINES = 2
REQUESTS = 8


@dataclass
class Engine:
    scheduler: ServiceProcess
    executor: ServiceProcess
    port: int  # the scheduler's gRPC port
    metrics_port: int  # the scheduler's metrics endpoint


@dataclass
class Deployment:
    gateway_url: str
    gateway_pid: int
    scheduler_ports: list[int]
    tokenizer_ports: list[int]
    engines: list[Engine]


def container_args(subcommand: str) -> list[str]:
    (args,) = [
        command_of(c)
        for _, c in Cluster(base_docs()).containers()
        if command_of(c)[0] == subcommand
    ]
    return args


def with_value(argv: list[str], flag: str, values: list[str]) -> list[str]:
    """`argv` with the values after `flag` replaced (the flag stays where the manifest put it)."""
    i = argv.index(flag)
    return [*argv[: i + 1], *values, *argv[i + 1 + len(flag_values(argv, flag)) :]]


def with_metrics_port(argv: list[str]) -> tuple[list[str], int]:
    """`argv` with the metrics endpoint its manifest gives moved to a free local port."""
    assert flag_values(argv, "--metrics-port"), f"the manifest gives {argv[0]} no metrics endpoint"
    port = free_port()
    return with_value(argv, "--metrics-port", [str(port)]), port


def wait_ready(url: str, proc: ServiceProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.proc is not None and proc.proc.poll() is None, proc.output()[-3000:]
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"gateway not ready:\n{proc.output()[-3000:]}")


@pytest.fixture(scope="module")
def deployment(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    logs = tmp_path_factory.mktemp("scaleout-logs")
    gateway_args = container_args("gateway")
    (engine_target,) = flag_values(gateway_args, "--scheduler")
    (tokenizer_target,) = flag_values(gateway_args, "--tokenizer")
    assert engine_target.startswith("dns:///"), "one name, every ready engine pod behind it"
    _, engine_port = split_address(engine_target)
    assert engine_port == int(flag_values(container_args("scheduler"), "--port")[0])
    with ExitStack() as stack:
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        for key in [k for k in os.environ if k.startswith("RADIXSERVE_")]:
            mp.delenv(key)  # only what the manifests and these flags say

        def start(args: list[str], name: str) -> ServiceProcess:
            return stack.enter_context(ServiceProcess(args, logs / f"{name}.log"))

        tokenizer_ports = [free_port() for _ in range(2)]
        tokenizers = []
        for i, p in enumerate(tokenizer_ports):
            args, _ = with_metrics_port(with_value(container_args("tokenizer"), "--port", [str(p)]))
            tokenizers.append(start(args, f"tokenizer{i}"))
        executor_ports = [free_port() for _ in range(RUNNING_ENGINES)]
        executors = []
        for i, p in enumerate(executor_ports):
            args, _ = with_metrics_port(with_value(container_args("executor"), "--port", [str(p)]))
            executors.append(start([*args, *LIGHT_EXECUTOR], f"executor{i}"))
        schedulers = []
        for i, executor_port in enumerate(executor_ports):
            port = free_port()
            args = with_value(container_args("scheduler"), "--port", [str(port)])
            _, pod_executor_port = split_address(flag_values(args, "--executor")[0])
            assert pod_executor_port == int(flag_values(container_args("executor"), "--port")[0])
            args = with_value(args, "--executor", [f"127.0.0.1:{executor_port}"])
            args, metrics_port = with_metrics_port(args)
            schedulers.append((port, metrics_port, start(args, f"scheduler{i}")))
        # What the lookup would return: the running engines and one that does not answer.
        resolved = [f"127.0.0.1:{port}" for port, _, _ in schedulers] + [f"127.0.0.1:{free_port()}"]
        for proc, port in zip(tokenizers, tokenizer_ports, strict=True):
            proc.wait_grpc_serving(port)
        for proc, port in zip(executors, executor_ports, strict=True):
            proc.wait_grpc_serving(port, timeout=240)
        for port, _, proc in schedulers:
            proc.wait_grpc_serving(port)

        assert tokenizer_target.startswith("dns:///")  # one name, every pod behind it
        http_port = free_port()
        args = with_value(gateway_args, "--port", [str(http_port)])
        args = with_value(
            args, "--tokenizer", ["ipv4:" + ",".join(f"127.0.0.1:{p}" for p in tokenizer_ports)]
        )
        args = with_value(args, "--scheduler", resolved)
        gateway = start(args, "gateway")
        url = f"http://127.0.0.1:{http_port}"
        wait_ready(url, gateway)
        assert gateway.proc is not None
        yield Deployment(
            url,
            gateway.proc.pid,
            [p for p, _, _ in schedulers],
            tokenizer_ports,
            [
                Engine(proc, executor, port, metrics_port)
                for (port, metrics_port, proc), executor in zip(schedulers, executors, strict=True)
            ],
        )


def finished(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        load = scheduler_pb2_grpc.SchedulerStub(channel).GetLoad(
            scheduler_pb2.GetLoadRequest(), timeout=5
        )
    return load.requests_finished_total


def distinct_prompt(i: int) -> str:
    """The user message of conversation `i`: unlike the others' from its second word on, and long
    enough (about 66 tokens in the chat template) that what they share, the template's system
    prompt, stays under --cache-threshold (0.3) of it. The gateway's default cache_aware routing
    would keep prompts sharing more on one engine, as it should; different users' conversations
    spread over the engines."""
    return (
        f"Customer {i} writes: please count from one to {i + 2} in words, one number on each line, "
        "with no greeting, no explanation and nothing else before or after the numbers."
    )


async def concurrent_chats(url: str, n: int) -> list[str]:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
    model = (await client.models.list()).data[0].id

    async def one(i: int) -> str:
        reply = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": distinct_prompt(i)}],
            max_tokens=8,
            temperature=0,
        )
        return reply.choices[0].message.content or ""

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


def test_requests_spread_over_the_running_engines(deployment: Deployment) -> None:
    before = [finished(p) for p in deployment.scheduler_ports]
    replies = asyncio.run(concurrent_chats(deployment.gateway_url, REQUESTS))
    assert all(r.strip() for r in replies)
    served = [finished(p) - b for p, b in zip(deployment.scheduler_ports, before, strict=True)]
    assert sum(served) == REQUESTS, served
    assert all(n >= REQUESTS // 4 for n in served), f"uneven spread over the engines: {served}"


def test_gateway_is_ready_while_listed_engines_are_absent(deployment: Deployment) -> None:
    """One address of the lookup's answer does not answer; the other engines serve."""
    assert httpx.get(f"{deployment.gateway_url}/ready", timeout=5).status_code == 200


def test_gateway_balances_over_every_tokenizer_behind_one_name(deployment: Deployment) -> None:
    asyncio.run(concurrent_chats(deployment.gateway_url, 4))
    connected = {
        c.raddr.port
        for c in psutil.Process(deployment.gateway_pid).net_connections(kind="tcp")
        if c.raddr and c.status == psutil.CONN_ESTABLISHED
    }
    missing = [p for p in deployment.tokenizer_ports if p not in connected]
    assert not missing, (
        f"the gateway holds no connection to tokenizers on {missing}: its tokenizer channel does not "
        "balance over the addresses one name resolves to (it needs the round_robin LB policy)"
    )


def test_pre_stop_drain_waits_for_in_flight_requests(deployment: Deployment) -> None:
    """The engines' preStop command returns only once its scheduler has nothing left to run."""
    (container,) = [c for _, c in Cluster(base_docs()).containers() if c["name"] == "scheduler"]
    hook = container["lifecycle"]["preStop"]["exec"]["command"]
    client = OpenAI(base_url=f"{deployment.gateway_url}/v1", api_key="unused", timeout=120)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell a long story."}],
        max_tokens=64,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)  # the request is running on one of the engines
    finished_at: list[float] = []
    drainer = threading.Thread(target=lambda: (list(chunks), finished_at.append(time.monotonic())))
    drainer.start()
    for port in deployment.scheduler_ports:
        command = [sys.executable if a == "python" else a for a in hook]
        command = [f"127.0.0.1:{port}" if a.startswith("127.0.0.1:") else a for a in command]
        assert subprocess.run(command, capture_output=True, timeout=150).returncode == 0
    returned_at = time.monotonic()
    drainer.join(60)
    assert finished_at and finished_at[0] <= returned_at, (
        "the drain returned before the request ended"
    )


def monotonic_series(url: str) -> dict[tuple[str, frozenset], float]:
    """Every counter and histogram bucket/count series of a /metrics page: (name, labels) -> value."""
    text = httpx.get(url, timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (family.type == "counter" and sample.name.endswith("_total")) or (
                family.type == "histogram" and sample.name.endswith(("_bucket", "_count"))
            ):
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def total(series: dict[tuple[str, frozenset], float], name: str) -> float:
    return sum(v for (n, _), v in series.items() if n == name)


def test_counters_stay_monotonic_when_one_of_two_engines_stops(deployment: Deployment) -> None:
    """Runs last: it stops engine 1 for good. Each service reports only its own numbers, so losing
    an engine drops its series and nothing else: no counter of the gateway or of the surviving
    scheduler goes down (Prometheus would read a decrease as a reset)."""
    survivor, stopped = deployment.engines
    endpoints = {
        "gateway": f"{deployment.gateway_url}/metrics",
        "scheduler0": f"http://127.0.0.1:{survivor.metrics_port}/metrics",
    }
    asyncio.run(concurrent_chats(deployment.gateway_url, 4))
    before = {name: monotonic_series(url) for name, url in endpoints.items()}
    assert monotonic_series(f"http://127.0.0.1:{stopped.metrics_port}/metrics"), "engine 1 reports"
    assert total(before["gateway"], "radixserve:request_success_total") > 0

    stopped.scheduler.stop()
    stopped.executor.stop()
    time.sleep(3)  # a few load polls: the gateway leaves the stopped engine out
    replies = asyncio.run(concurrent_chats(deployment.gateway_url, 4))
    assert all(r.strip() for r in replies), "the surviving engine serves every request"

    after = {name: monotonic_series(url) for name, url in endpoints.items()}
    for name in endpoints:
        assert before[name], f"{name} reports no counter"
        for key, value in before[name].items():
            assert key in after[name], f"{name}: {key} disappeared"
            assert after[name][key] >= value, (
                f"{name}: {key} went from {value} to {after[name][key]}"
            )
    success = "radixserve:request_success_total"
    assert total(after["gateway"], success) >= total(before["gateway"], success) + 4
    generated = "radixserve:generation_tokens_total"
    assert total(after["scheduler0"], generated) > total(before["scheduler0"], generated), (
        "the surviving scheduler generated the new requests' tokens"
    )
