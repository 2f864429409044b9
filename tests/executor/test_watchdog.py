"""The executor's watchdog: a step that executes too long ends the process; idle time never does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.executor.config import ExecutorConfig
from services.executor.servicer import WATCHDOG_EXIT_CODE, ExecutorServicer, Watchdog

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fires_only_while_a_step_runs_past_the_timeout() -> None:
    clock, exits = FakeClock(), []
    dog = Watchdog(10.0, clock=clock, exit=exits.append)
    clock.now += 1000  # idle (or loading, warming up): nothing is watched
    dog.check()
    dog.begin(7)
    clock.now += 9
    dog.check()
    assert exits == []
    dog.end()
    clock.now += 100  # a step that ended is not counted
    dog.check()
    dog.begin(8)
    clock.now += 10.5
    dog.check()
    assert exits == [WATCHDOG_EXIT_CODE]


def test_zero_disables_it() -> None:
    clock, exits = FakeClock(), []
    dog = Watchdog(0.0, clock=clock, exit=exits.append)
    dog.begin(1)
    clock.now += 1e9
    dog.check()
    dog.start()  # no thread
    assert exits == []


def test_the_servicer_watches_execute_only() -> None:
    servicer = ExecutorServicer(Watchdog(60.0))
    seen = []
    engine = SimpleNamespace(execute=lambda item: seen.append(servicer.watchdog._running) or "out")
    loaded = SimpleNamespace(engine=engine)
    item = SimpleNamespace(step=SimpleNamespace(step_id=42))
    assert servicer._watched_execute(loaded, item) == "out"  # type: ignore[arg-type]
    assert seen[0] is not None and seen[0][0] == 42
    assert servicer.watchdog._running is None
    servicer.worker.shutdown()
    servicer.compiler.shutdown()


def test_a_wedged_step_exits_the_process_with_the_reason() -> None:
    script = textwrap.dedent(
        """
        import logging, time
        from services.executor.servicer import Watchdog
        logging.basicConfig(level=logging.INFO)
        dog = Watchdog(0.3)
        dog.start()
        time.sleep(1.0)  # idle: must not fire
        print("idle ok", flush=True)
        dog.begin(7)
        time.sleep(30)  # the wedged forward
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == WATCHDOG_EXIT_CODE, proc.stderr[-2000:]
    assert "idle ok" in proc.stdout
    assert "watchdog: step 7 has executed for" in proc.stderr
    assert time.monotonic() - started < 60


def test_timeout_must_not_be_negative() -> None:
    assert ExecutorConfig(watchdog_timeout_s=0).watchdog_timeout_s == 0
    with pytest.raises(ValueError, match="watchdog-timeout-s"):
        ExecutorConfig(watchdog_timeout_s=-1)
