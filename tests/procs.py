"""Starting and stopping real service processes in tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.common.ports import free_port


def free_port_run(n: int, attempts: int = 50) -> int:
    """The first of `n` consecutive ports free on 127.0.0.1 now (for serve's --metrics-port)."""
    for _ in range(attempts):
        base = free_port()
        if base + n > 65536:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + n):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {n} consecutive free ports in {attempts} attempts")


def scrape(url: str) -> dict[str, float]:
    """Every sample of a Prometheus endpoint (`url` ends in /metrics) but histogram buckets,
    keyed `name{k=v,...}` with labels sorted and `model_name` left out; raises AssertionError
    when a radixserve series lacks the label."""
    values = {}
    text = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "le" in s.labels:
                continue
            if s.name.startswith("radixserve:"):
                assert s.labels.get("model_name"), f"{s.name} has no model_name label"
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            values[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return values


class ServiceProcess:
    """`radixserve <args>` as a child process; stopped (SIGTERM, then SIGKILL) on exit.
    `module`: the module run with `python -m` (one that ends in `services.cli.main`)."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        module: str = "services.cli",
    ) -> None:
        self.args, self.log_path, self.module = args, log_path, module
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServiceProcess:
        self.log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", self.module, *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_grpc_serving(self, port: int, timeout: float = 120.0, host: str = "127.0.0.1") -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.args[0]} exited early:\n{self.output()[-3000:]}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{self.args[0]} not serving after {timeout}s:\n{self.output()[-3000:]}")


# Flags that make serve's executor light: float32, a small KV pool and request table.
SERVE_LIGHT = [
    "--dtype",
    "float32",
    "--max-total-tokens",
    "8192",
    "--max-running-requests",
    "16",
    "--context-length",
    "2048",
]


@contextlib.contextmanager
def serving(log: Path, extra: list[str] | None = None) -> Iterator[str]:
    """`radixserve serve` (SERVE_LIGHT, then `extra`) on a free port, ready: its base URL; on
    exit it and every process it started are stopped."""
    port = free_port()
    serve = Serve(port, log, extra)
    try:
        serve.wait_ready()
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.kill_all()


class Serve:
    """`radixserve serve` as a child process (its stdout read for the ready line); kill_all()
    stops it and every process it started."""

    def __init__(self, port: int, log: Path, extra: list[str] | None = None) -> None:
        cmd = [
            sys.executable,
            "-m",
            "services.cli",
            "serve",
            "--port",
            str(port),
            *SERVE_LIGHT,
            *(extra or []),
        ]
        self.log = log
        self.handle = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.handle)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if "ready on" in line:
                self.ready.set()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve not ready:\n{self.stderr()[-4000:]}")

    def stderr(self) -> str:
        self.handle.flush()
        return self.log.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def services(self) -> dict[str, psutil.Process]:
        """The service processes serve started (`python -m services.cli NAME ...`), by NAME."""
        found = {}
        for child in self.children():
            argv = child.cmdline()
            if "services.cli" in argv:
                found[argv[argv.index("services.cli") + 1]] = child
        return found

    def kill_all(self) -> None:
        for child in self.children() if self.proc.poll() is None else []:
            child.kill()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.handle.close()
