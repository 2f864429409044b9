"""CPU time of the server's service processes over a benchmark run.

The processes come from `--server-pids NAME=PID …`, or are discovered as the children of
`radixserve serve` (`--serve-pid`): serve starts each service as `python -m services.cli NAME …`.
A service's CPU time is its own user + system time plus that of its live descendants (tensor-
parallel ranks, compile workers), read before and after the timed run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

SERVICE_NAMES = ("gateway", "tokenizer", "scheduler", "executor")


@dataclass(frozen=True)
class ServiceCpu:
    """CPU seconds one service spent during the run, and per 1,000 output tokens."""

    name: str
    pid: int
    cpu_s: float
    per_1k_output_tokens: float

    @classmethod
    def over(cls, name: str, pid: int, cpu_s: float, output_tokens: int) -> ServiceCpu:
        """`cpu_s` seconds spent while `output_tokens` tokens were generated (NaN per 1k if 0)."""
        per_1k = cpu_s / output_tokens * 1000 if output_tokens else float("nan")
        return cls(name, pid, cpu_s, per_1k)


def parse_server_pids(specs: list[str]) -> dict[str, int]:
    """`["gateway=101", …]` → {"gateway": 101, …}; raises ValueError on a malformed entry."""
    pids = {}
    for spec in specs:
        name, sep, pid = spec.partition("=")
        if not sep or not name or not pid.isdigit():
            raise ValueError(f"--server-pids entries are NAME=PID, got {spec!r}")
        pids[name] = int(pid)
    return pids


def service_name(cmdline: list[str]) -> str | None:
    """The service a `python -m services.cli NAME …` or `radixserve NAME …` command runs."""
    for i, arg in enumerate(cmdline[:-1]):
        if arg == "services.cli" or arg.endswith("/radixserve") or arg == "radixserve":
            name = cmdline[i + 1]
            return name if name in SERVICE_NAMES else None
    return None


def meter_for(serve_pid: int | None, server_pids: list[str]) -> CpuMeter | None:
    """The meter the bench flags ask for (explicit pids win over discovery), or None."""
    pids = parse_server_pids(server_pids) if server_pids else {}
    if serve_pid is not None:
        pids = {**discover(serve_pid), **pids}
    return CpuMeter(pids) if pids else None


def discover(serve_pid: int) -> dict[str, int]:
    """The service processes `radixserve serve` (pid `serve_pid`) started, by name.
    Raises ValueError when the pid does not exist or has no service children."""
    psutil = _psutil()
    try:
        children = psutil.Process(serve_pid).children()
    except psutil.NoSuchProcess as exc:
        raise ValueError(f"--serve-pid {serve_pid}: no such process") from exc
    found = {}
    for child in children:
        try:
            name = service_name(child.cmdline())
        except psutil.Error:
            continue
        if name is not None:
            found[name] = child.pid
    if not found:
        raise ValueError(f"--serve-pid {serve_pid} has no radixserve service children")
    return found


class CpuMeter:
    """Reads the CPU seconds of named processes, and of this one (the benchmark's client), at
    `start` and `stop`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.client_before = self.client_after = 0.0  # this process's CPU seconds

    def start(self) -> None:
        self.before = self._read()
        self.client_before = time.process_time()

    def stop(self) -> None:
        self.after = self._read()
        self.client_after = time.process_time()

    def client(self, output_tokens: int) -> ServiceCpu:
        """The CPU this process (sending and reading the requests) spent over the run; on a
        machine the server shares, it is CPU the server did not get."""
        used = self.client_after - self.client_before
        return ServiceCpu.over("bench client", os.getpid(), used, output_tokens)

    def report(self, output_tokens: int) -> list[ServiceCpu]:
        """Per service, in the order of `pids`; call after `start` and `stop`."""
        return [
            ServiceCpu.over(name, pid, self.after[name] - self.before[name], output_tokens)
            for name, pid in self.pids.items()
        ]

    def _read(self) -> dict[str, float]:
        return {name: process_tree_cpu_s(pid) for name, pid in self.pids.items()}


def process_tree_cpu_s(pid: int) -> float:
    """User + system seconds of `pid` and its live descendants; raises ValueError if it is gone."""
    psutil = _psutil()
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess as exc:
        raise ValueError(f"server process {pid} is gone") from exc
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def _psutil():
    try:
        import psutil
    except ImportError as exc:  # pragma: no cover - psutil is a dependency
        raise ValueError("service CPU time needs psutil (pip install psutil)") from exc
    return psutil
