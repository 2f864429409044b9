"""The four real services (tokenizer, executor, scheduler, gateway) with the default model."""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from radixserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.procs import ServiceProcess, free_port

API_KEYS = ("key-one", "key-two")
MAX_QUEUED = 8  # small, so a request with n > 8 is refused with 503 at once


@dataclass(frozen=True)
class Stack:
    base_url: str  # http://127.0.0.1:PORT
    api_key: str
    scheduler: scheduler_pb2_grpc.SchedulerStub
    model: str
    tokenizer_port: int  # for a second gateway in front of the same services
    scheduler_port: int
    scheduler_metrics: str  # the scheduler's Prometheus endpoint (http://…/metrics)

    def get_load(self) -> scheduler_pb2.GetLoadResponse:
        return self.scheduler.GetLoad(scheduler_pb2.GetLoadRequest(), timeout=5)


def wait_ready(
    proc: ServiceProcess, url: str, timeout: float = 180.0, verify: ssl.SSLContext | bool = True
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc is not None and proc.proc.poll() is not None:
            raise RuntimeError(f"gateway exited early:\n{proc.output()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2, verify=verify).status_code == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"gateway not ready after {timeout}s:\n{proc.output()[-3000:]}")


def gateway_args(port: int, tokenizer: int, scheduler: int, *extra: str) -> list[str]:
    return [
        "gateway", "--port", str(port),
        "--tokenizer", f"127.0.0.1:{tokenizer}",
        "--scheduler", f"127.0.0.1:{scheduler}",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="package")
def stack(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Started once for the gateway's end-to-end tests; every process stopped at the end."""
    logs = tmp_path_factory.mktemp("gateway-stack")
    tok, exe, sch, gw, sch_metrics = (free_port() for _ in range(5))
    model = str(default_model_dir)
    executor = [
        "executor", "--model-path", model, "--port", str(exe), "--dtype", "float32",
        "--max-total-tokens", "16384", "--max-running-requests", "32", "--context-length", "2048",
    ]  # fmt: skip
    scheduler = [
        "scheduler", "--executor", f"127.0.0.1:{exe}", "--port", str(sch),
        "--max-queued-requests", str(MAX_QUEUED), "--metrics-port", str(sch_metrics),
    ]  # fmt: skip
    with contextlib.ExitStack() as procs:
        t = procs.enter_context(
            ServiceProcess(
                ["tokenizer", "--model-path", model, "--port", str(tok)], logs / "tokenizer.log"
            )
        )
        e = procs.enter_context(ServiceProcess(executor, logs / "executor.log"))
        s = procs.enter_context(ServiceProcess(scheduler, logs / "scheduler.log"))
        g = procs.enter_context(
            ServiceProcess(gateway_args(gw, tok, sch, "--api-key", *API_KEYS), logs / "gateway.log")
        )
        t.wait_grpc_serving(tok)
        e.wait_grpc_serving(exe)
        s.wait_grpc_serving(sch)
        url = f"http://127.0.0.1:{gw}"
        wait_ready(g, url)
        with grpc.insecure_channel(f"127.0.0.1:{sch}") as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
            name = httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
            metrics = f"http://127.0.0.1:{sch_metrics}/metrics"
            yield Stack(url, API_KEYS[0], stub, name, tok, sch, metrics)
        assert g.stop() == 0, g.output()[-3000:]
