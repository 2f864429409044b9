"""`radixserve serve`: starts the four services from nothing, answers, stops cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from openai import OpenAI

from services.bench import cli as bench_cli
from services.cli import build_parser
from tests.procs import Serve, free_port, free_port_run, scrape

pytestmark = pytest.mark.slow

METRICS_OFFSET = 1  # the serve fixture's --metrics-port: its port + 1 (three ports from there)


@pytest.fixture
def serve(tmp_path: Path, default_model_dir: Path) -> Iterator[tuple[Serve, int]]:
    port = free_port_run(1 + 3)  # the gateway's, then the three metrics ports
    server = Serve(port, tmp_path / "serve.log", ["--metrics-port", str(port + METRICS_OFFSET)])
    try:
        yield server, port
    finally:
        server.kill_all()


def test_serve_answers_and_stops_cleanly_on_sigterm(serve: tuple[Serve, int]) -> None:
    server, port = serve
    server.wait_ready()
    assert any(f"http://127.0.0.1:{port}/v1" in line for line in server.lines)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content
    children = server.children()
    assert len(children) >= 4
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(90) == 0, server.stderr()[-3000:]
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {[p.pid for p in alive]}"


def test_a_killed_serve_takes_its_services_with_it(serve: tuple[Serve, int]) -> None:
    """SIGKILL gives the supervisor no chance to stop its children: they stop on their own."""
    server, _ = serve
    server.wait_ready()
    children = server.children()
    assert len(children) >= 4
    server.proc.kill()
    server.proc.wait(10)
    _gone, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:  # the fixture cannot find them once their parent is gone
        p.kill()
    assert not alive, f"left running: {[p.pid for p in alive]}"


def test_serve_reports_a_dead_service_and_stops_the_others(serve: tuple[Serve, int]) -> None:
    server, _ = serve
    server.wait_ready()
    children = server.children()
    executor = server.services()["executor"]
    os.kill(executor.pid, signal.SIGKILL)
    assert server.proc.wait(90) != 0
    assert "executor service exited" in server.stderr()
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def metrics_urls(port: int, metrics_base: int) -> dict[str, str]:
    """Each service's Prometheus endpoint under `serve --metrics-port metrics_base`."""
    urls = {"gateway": f"http://127.0.0.1:{port}/metrics"}
    for offset, name in enumerate(("tokenizer", "executor", "scheduler")):
        urls[name] = f"http://127.0.0.1:{metrics_base + offset}/metrics"
    return urls


def run_bench(port: int, out: Path, *flags: str) -> dict[str, Any]:
    argv = ["bench", "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", "default",
            "--output-file", str(out), "--timeout-s", "240", "--seed", "7", *flags]  # fmt: skip
    summary = bench_cli.main(build_parser().parse_args(argv))
    assert json.loads(out.read_text())["summary"]["completed"] == summary["completed"]
    return summary


def test_bench_runs_every_dataset_against_serve(serve: tuple[Serve, int], tmp_path: Path) -> None:
    server, port = serve
    server.wait_ready()

    random = run_bench(port, tmp_path / "random.json", "--dataset", "random", "--num-prompts", "8",
                       "--random-input-len", "64", "--random-output-len", "16",
                       "--random-range-ratio", "1", "--max-concurrency", "4")  # fmt: skip
    assert (random["completed"], random["errors"]) == (8, 0), random["errors_by_kind"]
    # Counted by re-tokenizing the streamed text, so a merge at a chunk edge may shift a token.
    assert 8 * 14 <= random["total_output_tokens"] <= 8 * 18
    assert random["ttft_ms"]["count"] == 8 and random["peak_concurrency"] <= 4
    assert random["output_token_throughput"] > 0

    urls = metrics_urls(port, port + METRICS_OFFSET)
    scraped = {name: scrape(url) for name, url in urls.items()}  # every service serves its own
    assert (
        scraped["tokenizer"][
            "grpc_server_handled_total{grpc_code=OK,grpc_method=Encode,grpc_service=radixserve.v1.Tokenizer,grpc_type=unary}"
        ]
        >= 8
    )
    assert scraped["executor"]["radixserve:forward_time_seconds_count"] > 0
    assert scraped["scheduler"]["radixserve:request_generation_tokens_count"] >= 8
    assert scraped["gateway"]["radixserve:request_success_total{finished_reason=length}"] >= 8
    cached_before = scrape(urls["scheduler"])["radixserve:prefix_cache_hits_total"]
    shared = run_bench(port, tmp_path / "gsp.json", "--dataset", "generated-shared-prefix",
                       "--gsp-num-groups", "2", "--gsp-prompts-per-group", "4",
                       "--gsp-system-prompt-len", "200", "--gsp-question-len", "16",
                       "--gsp-output-len", "8", "--max-concurrency", "4")  # fmt: skip
    assert (shared["completed"], shared["errors"]) == (8, 0), shared["errors_by_kind"]
    # Each group's system prompt is computed once and reused by the group's other prompts.
    cached = scrape(urls["scheduler"])["radixserve:prefix_cache_hits_total"] - cached_before
    assert cached >= 2 * 3 * 150

    turns = run_bench(port, tmp_path / "mt.json", "--dataset", "multi-turn",
                      "--mt-num-conversations", "2", "--mt-turns", "3",
                      "--mt-turn-input-len", "24", "--mt-output-len", "8")  # fmt: skip
    assert (turns["completed"], turns["errors"]) == (6, 0), turns["errors_by_kind"]
    assert turns["total_input_tokens"] > 6 * 24  # later turns carry the conversation so far

    # Having served all that, the gateway and the scheduler still hold no torch.
    processes = server.services()
    assert set(processes) == {"executor", "tokenizer", "scheduler", "gateway"}
    assert maps_torch(processes["executor"])  # the check sees torch where it is
    assert not maps_torch(processes["gateway"]) and not maps_torch(processes["scheduler"])
    assert not maps_torch(psutil.Process(server.proc.pid))  # `radixserve serve` itself


def maps_torch(process: psutil.Process) -> bool:
    """Whether the process has torch's shared library mapped (Linux)."""
    return "libtorch" in Path(f"/proc/{process.pid}/maps").read_text()


def test_serve_logs_a_request_as_json_under_its_id_in_every_service(
    tmp_path: Path, default_model_dir: Path
) -> None:
    port = free_port()
    flags = ["--log-format", "json", "--log-level", "debug", "--log-requests", "--access-log"]
    server = Serve(port, tmp_path / "serve.log", flags)
    try:
        server.wait_ready()
        body = {
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        headers = {"X-Request-Id": "my-req-1"}
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
            assert response.status_code == 200
            assert response.headers["x-request-id"] == "my-req-1"
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
        usage = json.loads(events[-1])["usage"]
        entries = _json_lines(server, until=lambda e: e["logger"] == "radixserve.gateway.requests")
        mine = [e for e in entries if e.get("request_id") == "my-req-1"]
        assert {"gateway", "tokenizer", "scheduler", "executor"} <= {e["service"] for e in mine}
        (request,) = [e for e in mine if e["logger"] == "radixserve.gateway.requests"]
        assert (request["method"], request["route"], request["status"]) == (
            "POST",
            "/v1/chat/completions",
            200,
        )
        for key in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            got = (
                usage["prompt_tokens_details"]["cached_tokens"]
                if key == "cached_tokens"
                else usage[key]
            )
            assert request[key] == got, (key, request, usage)
        assert 0 < request["ttft_ms"] <= request["latency_ms"]
        access = [e for e in mine if e["logger"] == "uvicorn.access"]
        assert access and "POST /v1/chat/completions" in access[0]["message"]
        # Every service started and logged its lines as JSON.
        assert {"tokenizer", "executor", "scheduler", "gateway"} <= {e["service"] for e in entries}
    finally:
        server.kill_all()


def _json_lines(server: Serve, until: Callable[[dict], bool], timeout: float = 10) -> list[dict]:
    """The JSON log lines serve's services wrote so far, once one of them satisfies `until`
    (the request log line is written when the response ends, just after the client has it)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = []
        for line in server.stderr().splitlines():
            with contextlib.suppress(ValueError):
                if line.startswith("{"):
                    entries.append(json.loads(line))
        if any(until(e) for e in entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.2)
