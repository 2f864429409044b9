"""A wedged executor under `radixserve serve`: streams fail within the step deadline, /ready
turns non-200, and once the executor answers again the scheduler reconnects and serves."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.procs import Serve, free_port

pytestmark = pytest.mark.slow

STEP_TIMEOUT_S = 3.0
SLACK_S = 20.0  # two shared cores: the loop, the gateway and the client all have to get a turn
STREAMS = 8
# The watchdog stays out of this test: a stopped process runs no watchdog thread, and on
# SIGCONT whether the watchdog or the resumed forward wakes first is a race.
FLAGS = ["--step-timeout-s", str(STEP_TIMEOUT_S), "--watchdog-timeout-s", "300"]


class StreamWatch(threading.Thread):
    """One streaming completion: records its first chunk, how it ended, and when."""

    def __init__(self, base: str, model: str, index: int) -> None:
        super().__init__(daemon=True)
        self.base, self.model, self.index = base, model, index
        self.started = threading.Event()
        self.ended_at: float | None = None
        self.error: str | None = None
        self.finished = False  # a normal finish_reason arrived

    def run(self) -> None:
        body = {
            "model": self.model,
            "prompt": f"Count from {self.index} to one thousand:",
            "max_tokens": 1500,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            with httpx.stream(
                "POST", f"{self.base}/v1/completions", json=body, timeout=120
            ) as reply:
                if reply.status_code != 200:
                    self.error = f"HTTP {reply.status_code}"
                    return
                for line in reply.iter_lines():
                    self._on_line(line)
        except httpx.HTTPError as exc:
            self.error = self.error or f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    def _on_line(self, line: str) -> None:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return
        payload = json.loads(line.removeprefix("data: "))
        if "error" in payload:
            self.error = payload["error"]["message"]
            return
        self.started.set()
        if any(c.get("finish_reason") for c in payload.get("choices", [])):
            self.finished = True


def ready_status(base: str) -> int:
    try:
        return httpx.get(f"{base}/ready", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not within {timeout:.0f}s"
        time.sleep(0.2)


def test_a_stopped_executor_fails_the_streams_and_serve_recovers(
    tmp_path: Path, default_model_dir: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = Serve(port, tmp_path / "serve.log", FLAGS)
    executor: psutil.Process | None = None
    try:
        server.wait_ready()
        executor = server.services()["executor"]
        model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        watches = [StreamWatch(base, model, i) for i in range(STREAMS)]
        for w in watches:
            w.start()
        for w in watches:
            assert w.started.wait(180), "a stream never started"
        assert all(w.error is None and not w.finished for w in watches), [w.error for w in watches]

        stopped_at = time.monotonic()
        os.kill(executor.pid, signal.SIGSTOP)
        for w in watches:
            w.join(STEP_TIMEOUT_S + SLACK_S + 5)
        assert not any(w.is_alive() for w in watches), "a stream still hangs"
        log = server.stderr()
        assert all(w.error for w in watches), ([w.error for w in watches], log[-3000:])
        assert any("did not answer step" in (w.error or "") for w in watches), [
            w.error for w in watches
        ]
        last_end = max(w.ended_at or 0.0 for w in watches) - stopped_at
        assert last_end < STEP_TIMEOUT_S + SLACK_S, f"streams ended {last_end:.1f}s after the stop"
        wait_for(lambda: ready_status(base) not in (0, 200), 30, "/ready not 200")
        assert server.proc.poll() is None  # nothing died: the executor is only stopped

        os.kill(executor.pid, signal.SIGCONT)
        wait_for(lambda: ready_status(base) == 200, 120, "/ready 200 again")
        reply = httpx.post(
            f"{base}/v1/completions",
            json={
                "model": model,
                "prompt": "Hello",
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 8

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(90) == 0, server.stderr()[-3000:]
    finally:
        if executor is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(executor.pid, signal.SIGCONT)
        server.kill_all()
