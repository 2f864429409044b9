"""Starts LocalServices the way compose does: each once its dependencies meet their condition."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.deploy.compose import LocalService
from tests.procs import ServiceProcess

POLL_S = 0.5


class Stack:
    """Running LocalServices; `healthy` runs a service's own healthcheck command."""

    def __init__(self, services: list[LocalService], log_dir: Path) -> None:
        self.services = {s.name: s for s in services}
        self.log_dir = log_dir
        self.procs: dict[str, ServiceProcess] = {}
        self._healthy: set[str] = set()

    def healthy(self, name: str) -> bool:
        if name in self._healthy:
            return True
        svc = self.services[name]
        if svc.healthcheck is None:
            return name in self.procs
        try:
            done = subprocess.run(svc.healthcheck, capture_output=True, timeout=svc.health_timeout)
        except subprocess.TimeoutExpired:
            return False
        if done.returncode == 0:
            self._healthy.add(name)
        return done.returncode == 0

    def _ready_to_start(self, svc: LocalService) -> bool:
        for dep, condition in svc.depends_on.items():
            assert dep in self.services, f"{svc.name} depends on {dep}, which is not started here"
            if dep not in self.procs:
                return False
            if condition == "service_healthy" and not self.healthy(dep):
                return False
            assert condition in ("service_started", "service_healthy"), condition
        return True

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.proc is not None and proc.proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}"
                )

    def up(self, timeout: float) -> None:
        """Starts everything and waits until every service with a healthcheck passes it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            for svc in self.services.values():
                if svc.name not in self.procs and self._ready_to_start(svc):
                    proc = ServiceProcess(svc.argv, self.log_dir / f"{svc.name}.log", svc.env)
                    self.procs[svc.name] = proc.__enter__()
            if len(self.procs) == len(self.services) and all(
                self.healthy(n) for n in self.services
            ):
                return
            time.sleep(POLL_S)
        waiting = [n for n in self.services if not (n in self.procs and self.healthy(n))]
        logs = "\n".join(f"--- {n}\n{p.output()[-2000:]}" for n, p in self.procs.items())
        raise TimeoutError(f"not healthy after {timeout:.0f}s: {waiting}\n{logs}")

    def down(self) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].stop()


@contextlib.contextmanager
def running(services: list[LocalService], log_dir: Path, timeout: float) -> Iterator[Stack]:
    stack = Stack(services, log_dir)
    try:
        stack.up(timeout)
        yield stack
    finally:
        stack.down()
