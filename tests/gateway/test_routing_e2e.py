"""Cache-aware routing over two real engines: a conversation's turns follow its cached prefix.

One tokenizer and two scheduler + executor pairs run as real processes; a gateway per routing
policy sits in front of both (and, for the baseline, one in front of engine 0 alone). Eight
conversations of four turns run at once, each turn sent when the previous one answered. The
gateway's request log (`--log-requests`, JSON) names the engine each turn went to.

The two schedulers listen on one port at two loopback addresses (127.0.0.1 and 127.0.0.2), as
two pods behind a headless Service do, so a gateway given `dns:///<name>:<port>` finds them by
DNS; in the discovery test the name's answer comes from a file the test rewrites
(tests/gateway/dns_answers.py).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import wait_ready
from tests.procs import ServiceProcess, free_port

pytestmark = pytest.mark.slow
CONVERSATIONS, TURNS = 8, 4
TOPICS = ["rivers", "volcanoes", "bees", "trains", "glaciers", "owls", "comets", "coral reefs"]


@dataclass(frozen=True)
class Engines:
    tokenizer: str
    schedulers: list[str]


@dataclass
class Outcome:
    affinity: float  # share of turns 2..4 routed where turn 1 went
    cached_tokens: int
    per_engine: dict[str, int]  # requests per engine


@pytest.fixture(scope="module")
def engines(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    logs = tmp_path_factory.mktemp("routing")
    model = str(default_model_dir)
    tok = free_port()
    with contextlib.ExitStack() as procs:
        t = procs.enter_context(
            ServiceProcess(["tokenizer", "--model-path", model, "--port", str(tok)], logs / "t.log")
        )
        schedulers: list[str] = []
        started: list[tuple[ServiceProcess, int, ServiceProcess, str]] = []
        sch = free_port()  # both schedulers' port, one on each loopback address
        for i in range(2):
            exe, host = free_port(), f"127.0.0.{i + 1}"
            executor = [
                "executor", "--model-path", model, "--port", str(exe), "--dtype", "float32",
                "--max-total-tokens", "8192", "--max-running-requests", "16",
                "--context-length", "2048", "--num-threads", "1",
            ]  # fmt: skip
            e = procs.enter_context(ServiceProcess(executor, logs / f"e{i}.log"))
            scheduler = [
                "scheduler", "--executor", f"127.0.0.1:{exe}", "--host", host, "--port", str(sch),
            ]  # fmt: skip
            s = procs.enter_context(ServiceProcess(scheduler, logs / f"s{i}.log"))
            started.append((e, exe, s, host))
        for e, exe, s, host in started:  # both engines load at once
            e.wait_grpc_serving(exe)
            s.wait_grpc_serving(sch, host=host)
            schedulers.append(f"{host}:{sch}")
        t.wait_grpc_serving(tok)
        yield Engines(f"127.0.0.1:{tok}", schedulers)


def run_traffic(engines: Engines, schedulers: list[str], policy: str, logs: Path) -> Outcome:
    """Flushes every engine's cache, then runs the conversations through a new gateway."""
    port = free_port()
    args = [
        "gateway", "--port", str(port), "--tokenizer", engines.tokenizer,
        "--scheduler", *schedulers, "--routing-policy", policy,
        "--log-requests", "--log-format", "json",
    ]  # fmt: skip
    log = logs / f"gateway-{policy}-{len(schedulers)}.log"
    with ServiceProcess(args, log) as gateway:
        url = f"http://127.0.0.1:{port}"
        wait_ready(gateway, url)
        assert httpx.post(f"{url}/flush_cache", timeout=30).status_code == 200
        with ThreadPoolExecutor(CONVERSATIONS) as pool:
            cached = sum(pool.map(lambda c: converse(url, c, policy), range(CONVERSATIONS)))
        assert gateway.stop() == 0
    routed = routes(log)
    assert len(routed) == CONVERSATIONS * TURNS
    same = sum(
        routed[f"{policy}-c{c}-t{t}"] == routed[f"{policy}-c{c}-t1"]
        for c in range(CONVERSATIONS)
        for t in range(2, TURNS + 1)
    )
    per_engine = {s: list(routed.values()).count(s) for s in schedulers}
    return Outcome(same / (CONVERSATIONS * (TURNS - 1)), cached, per_engine)


def converse(url: str, c: int, policy: str) -> int:
    """One conversation's turns, in order; the cached prompt tokens of all of them."""
    messages = [
        {"role": "system", "content": f"You are guide number {c}, an expert on {TOPICS[c]}."},
    ]
    cached = 0
    with httpx.Client(timeout=120) as client:
        for t in range(1, TURNS + 1):
            question = f"Question {t}: tell me one more short fact about {TOPICS[c]}, please."
            messages.append({"role": "user", "content": question})
            body = {"messages": messages, "max_tokens": 8, "temperature": 0}
            headers = {"X-Request-Id": f"{policy}-c{c}-t{t}"}
            reply = client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            assert reply.status_code == 200, reply.text
            answer = reply.json()
            cached += answer["usage"]["prompt_tokens_details"]["cached_tokens"]
            messages.append(answer["choices"][0]["message"])
    return cached


def test_cache_aware_routing_keeps_conversations_on_their_engine(
    engines: Engines, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aware = run_traffic(engines, engines.schedulers, "cache_aware", tmp_path)
    least = run_traffic(engines, engines.schedulers, "least_load", tmp_path)
    single = run_traffic(engines, engines.schedulers[:1], "cache_aware", tmp_path)
    with capsys.disabled():
        for name, o in (("cache_aware", aware), ("least_load", least), ("one engine", single)):
            print(
                f"\n{name}: turns 2-4 on turn 1's engine {o.affinity:.0%}, cached prompt tokens "
                f"{o.cached_tokens}, requests per engine {sorted(o.per_engine.values())}"
            )
    assert aware.affinity >= 0.95
    assert aware.cached_tokens >= 0.9 * single.cached_tokens
    assert min(aware.per_engine.values()) >= CONVERSATIONS * TURNS // 4  # both engines serve
    assert single.affinity == 1.0  # (one engine: every turn on it)


def test_dns_discovery_follows_the_answer_over_real_engines(
    engines: Engines, tmp_path: Path
) -> None:
    """A gateway given `dns:///engines.radixserve.test:<port>` routes to what the name resolves
    to: one engine, then both within the refresh interval of the answer growing, then only the
    second once the first left the answer (no request reaches it afterwards)."""
    first, second = engines.schedulers
    port = first.rsplit(":", 1)[1]
    answer = tmp_path / "answer"
    answer.write_text("127.0.0.1\n")
    gateway_port, refresh_s = free_port(), 1.0
    args = [
        "gateway", "--port", str(gateway_port), "--tokenizer", engines.tokenizer,
        "--scheduler", f"dns:///engines.radixserve.test:{port}", "--routing-policy",
        "round_robin", "--discovery-refresh-s", str(refresh_s), "--log-requests",
        "--log-format", "json",
    ]  # fmt: skip
    env = {"RADIXSERVE_TEST_DNS_ANSWERS": str(answer)}
    log = tmp_path / "gateway.log"
    with ServiceProcess(args, log, env, module="tests.gateway.dns_answers") as gateway:
        url = f"http://127.0.0.1:{gateway_port}"
        wait_ready(gateway, url)
        sent = 0

        def send() -> str:
            """One short request; the engine the gateway's request log says it went to."""
            nonlocal sent
            sent += 1
            rid = f"dns-{sent}"
            body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60,
                               headers={"X-Request-Id": rid})  # fmt: skip
            assert reply.status_code == 200, reply.text
            return routed_to(log, rid)

        assert {send() for _ in range(4)} == {first}
        answer.write_text("127.0.0.1\n127.0.0.2\n")
        grown = time.monotonic()
        while send() != second:
            # the next lookup, then one load poll that finds the new engine reachable
            assert time.monotonic() - grown < refresh_s + 2.0, "the second engine was not used"
            time.sleep(0.1)
        assert {send() for _ in range(4)} == {first, second}  # round robin over both
        answer.write_text("127.0.0.2\n")
        time.sleep(refresh_s + 0.5)
        assert {send() for _ in range(6)} == {second}
        assert gateway.stop() == 0


def routes(log: Path) -> dict[str, str]:
    """request id -> the engine it went to, from a gateway's JSON request log."""
    routed = {}
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("message") == "request finished":
                routed[entry["request_id"]] = entry["scheduler"]
    return routed


def routed_to(log: Path, request_id: str, timeout_s: float = 5.0) -> str:
    """The engine a request went to, once the request log has its line (written as it ends)."""
    deadline = time.monotonic() + timeout_s
    while (engine := routes(log).get(request_id)) is None:
        assert time.monotonic() < deadline, f"{request_id} is not in the request log"
        time.sleep(0.05)
    return engine
