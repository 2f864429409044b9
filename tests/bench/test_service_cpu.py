"""CPU seconds of the server's service processes around a benchmark run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from services.bench.service_cpu import (
    CpuMeter,
    discover,
    meter_for,
    parse_server_pids,
    service_name,
)
from tests.bench.fake_server import FakeServer
from tests.bench.test_cli import bench

# A child that looks like `python -m services.cli NAME`: it burns CPU while a file exists.
CHILD = "import os, sys, time\nwhile True:\n    if os.path.exists(sys.argv[-1]):\n        sum(range(10000))\n    else:\n        time.sleep(0.01)\n"
PARENT = (
    "import subprocess, sys, time\n"
    "kids = [subprocess.Popen([sys.executable, '-c', sys.argv[1], 'services.cli', n, sys.argv[2]])"
    " for n in ('executor', 'gateway')]\n"
    "time.sleep(120)\n"
)


def test_server_pids_and_service_names_are_parsed() -> None:
    assert parse_server_pids(["gateway=12", "executor=7"]) == {"gateway": 12, "executor": 7}
    for bad in ("gateway", "=3", "gateway=x"):
        with pytest.raises(ValueError, match="NAME=PID"):
            parse_server_pids([bad])
    assert service_name(["/usr/bin/python", "-m", "services.cli", "scheduler", "--port", "1"]) == (
        "scheduler"
    )
    assert service_name(["/venv/bin/radixserve", "tokenizer"]) == "tokenizer"
    assert service_name(["/venv/bin/radixserve", "serve"]) is None
    assert meter_for(None, []) is None


@pytest.fixture
def fake_serve(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    busy = tmp_path / "busy"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(busy)])
    try:
        deadline = time.monotonic() + 30
        while len(psutil.Process(parent.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield parent.pid, busy
    finally:
        for child in psutil.Process(parent.pid).children():
            child.kill()
        parent.kill()
        parent.wait()


def test_children_of_serve_are_found_and_their_cpu_time_measured(
    fake_serve: tuple[int, Path],
) -> None:
    serve_pid, busy = fake_serve
    pids = discover(serve_pid)
    assert sorted(pids) == ["executor", "gateway"]
    meter = CpuMeter(pids)
    meter.start()
    busy.touch()
    time.sleep(1.0)
    busy.unlink()
    meter.stop()
    rows = meter.report(output_tokens=500)
    assert [r.name for r in rows] == ["executor", "gateway"]
    assert all(r.cpu_s > 0.05 for r in rows)
    assert all(r.per_1k_output_tokens == pytest.approx(r.cpu_s * 2) for r in rows)
    with pytest.raises(ValueError, match="no such process"):
        discover(2**22 + 12345)


def test_bench_reports_cpu_per_1k_output_tokens(
    fake_server: FakeServer,
    default_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "cpu.json"
    flags = ["--num-prompts", "4", "--random-input-len", "16", "--random-output-len", "4"]
    flags += ["--server-pids", f"gateway={os.getpid()}"]
    summary = bench(fake_server, default_model_dir, out, *flags)
    printed = capsys.readouterr().out
    assert "Service CPU (s per 1k output tokens)" in printed
    assert f"gateway (pid {os.getpid()})" in printed
    (row,) = json.loads(out.read_text())["service_cpu"]
    assert row["name"] == "gateway" and row["pid"] == os.getpid() and row["cpu_s"] >= 0
    expected = row["cpu_s"] / summary["total_output_tokens"] * 1000
    assert row["per_1k_output_tokens"] == pytest.approx(expected)
    # The client's own CPU is reported beside the services, not summed with them.
    assert "bench client (this process)" in printed
    client = json.loads(out.read_text())["client_cpu"]
    assert client["name"] == "bench client" and client["pid"] == os.getpid()
    assert client["cpu_s"] > 0
    expected = client["cpu_s"] / summary["total_output_tokens"] * 1000
    assert client["per_1k_output_tokens"] == pytest.approx(expected)
