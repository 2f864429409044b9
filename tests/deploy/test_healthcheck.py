"""`radixserve healthcheck` (services/common/healthcheck.py) against nothing: it must say no."""

from __future__ import annotations

import subprocess
import sys

from services.cli import build_parser
from tests.procs import free_port

MODULE = [sys.executable, "-m", "services.common.healthcheck"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MODULE, *args], capture_output=True, text=True, timeout=30)


def test_nothing_listening_is_unhealthy() -> None:
    port = free_port()
    grpc_check = run("--grpc", f"127.0.0.1:{port}", "--timeout", "1")
    assert grpc_check.returncode == 1 and "UNAVAILABLE" in grpc_check.stderr
    http_check = run("--http", f"http://127.0.0.1:{port}/ready", "--timeout", "1")
    assert http_check.returncode == 1


def test_draining_a_scheduler_that_is_gone_has_nothing_to_wait_for() -> None:
    done = run("--grpc", f"127.0.0.1:{free_port()}", "--wait-idle", "5", "--timeout", "1")
    assert done.returncode == 0 and "nothing left to drain" in done.stdout


def test_wait_idle_needs_a_grpc_address() -> None:
    assert run("--http", "http://127.0.0.1:1/", "--wait-idle", "5").returncode == 2


def test_the_cli_has_the_subcommand() -> None:
    args = build_parser().parse_args(["healthcheck", "--grpc", "127.0.0.1:30001"])
    assert args.grpc == "127.0.0.1:30001" and args.wait_idle is None
