"""The shared metrics plumbing: gRPC server metrics on a real server, the /metrics endpoint."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter

from services.cli import build_parser
from services.common.grpc_server import GrpcServer
from services.common.metrics import MetricsServer, ServiceConfig, service_registry
from services.serve import child_commands

HEALTH = "grpc.health.v1.Health"


def sample(registry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"grpc_service": HEALTH, **labels}) or 0.0


def test_grpc_calls_are_counted_by_method_type_and_code() -> None:
    registry = service_registry()

    async def main() -> None:
        server = GrpcServer("127.0.0.1", 0, ["radixserve.v1.Test"], metrics=registry)
        port = await server.start()
        await server.set_serving(True)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for _ in range(3):
                    await stub.Check(health_pb2.HealthCheckRequest(service=""))
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
                watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                watch.cancel()
                await asyncio.sleep(0.2)  # the server sees the cancellation
        finally:
            await server.server.stop(0)

    asyncio.run(main())
    unary = {"grpc_method": "Check", "grpc_type": "unary"}
    assert sample(registry, "grpc_server_started_total", **unary) == 4
    assert sample(registry, "grpc_server_handled_total", **unary, grpc_code="OK") == 3
    assert sample(registry, "grpc_server_handled_total", **unary, grpc_code="NOT_FOUND") == 1
    assert sample(registry, "grpc_server_handling_seconds_count", **unary) == 4
    stream = {"grpc_method": "Watch", "grpc_type": "server_stream"}
    assert sample(registry, "grpc_server_started_total", **stream) == 1
    assert sample(registry, "grpc_server_handled_total", **stream, grpc_code="CANCELLED") == 1


def test_metrics_server_serves_the_registry_and_process_metrics() -> None:
    registry = service_registry()
    Counter("radixserve:things", "things", ["model_name"], registry=registry).labels("m").inc(2)
    server = MetricsServer(registry, "127.0.0.1", 0)
    try:
        response = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    finally:
        server.close()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'radixserve:things_total{model_name="m"} 2.0' in response.text
    assert "process_resident_memory_bytes" in response.text
    assert "_created" not in response.text  # no creation-time twin of every counter
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)


def test_metrics_port_is_validated() -> None:
    assert ServiceConfig().metrics_port is None
    with pytest.raises(ValueError, match="--metrics-port"):
        ServiceConfig(metrics_port=70000)


def test_serve_gives_each_grpc_service_its_own_metrics_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RADIXSERVE_METRICS_PORT", raising=False)

    def ports(argv: list[str]) -> dict[str, int | None]:
        commands = dict(child_commands(build_parser().parse_args(["serve", *argv])))
        out = {}
        for name, args in commands.items():
            out[name] = (
                int(args[args.index("--metrics-port") + 1]) if "--metrics-port" in args else None
            )
        return out

    assert ports(["--metrics-port", "9400"]) == {
        "tokenizer": 9400,
        "executor": 9401,
        "scheduler": 9402,
        "gateway": None,  # the gateway serves /metrics on its own port
    }
    assert set(ports([]).values()) == {None}
    monkeypatch.setenv("RADIXSERVE_METRICS_PORT", "9500")
    assert ports([])["scheduler"] == 9502


def test_serve_dp_size_starts_that_many_engines_behind_the_gateway() -> None:
    args = build_parser().parse_args(["serve", "--dp-size", "2", "--metrics-port", "9400"])
    commands = dict(child_commands(args))
    assert sorted(commands) == [
        "executor-0", "executor-1", "gateway", "scheduler-0", "scheduler-1", "tokenizer",
    ]  # fmt: skip

    def flag(name: str, option: str) -> list[str]:
        argv = commands[name]
        i = argv.index(option)
        return argv[
            i + 1 : next(
                (j for j in range(i + 1, len(argv)) if argv[j].startswith("--")), len(argv)
            )
        ]

    schedulers = flag("gateway", "--scheduler")
    assert len(schedulers) == 2
    for i in range(2):
        assert f"127.0.0.1:{flag(f'scheduler-{i}', '--port')[0]}" == schedulers[i]
        assert flag(f"scheduler-{i}", "--executor") == [
            f"127.0.0.1:{flag(f'executor-{i}', '--port')[0]}"
        ]
        assert flag(f"executor-{i}", "--metrics-port") == [str(9401 + 2 * i)]
        assert flag(f"scheduler-{i}", "--metrics-port") == [str(9402 + 2 * i)]
        assert int(flag(f"executor-{i}", "--num-threads")[0]) >= 1  # a share of the cores


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {"executor": ("1", "0")}),
        (["--tp", "3"], {"executor": ("3", "0")}),
        (["--dp-size", "2", "--tp", "2"], {"executor-0": ("2", "0"), "executor-1": ("2", "2")}),
        (
            ["--dp-size", "2", "--base-gpu-id", "1"],
            {"executor-0": ("1", "1"), "executor-1": ("1", "2")},
        ),
    ],
)
def test_serve_gives_each_engine_its_tp_ranks_and_gpus(
    argv: list[str], expected: dict[str, tuple[str, str]]
) -> None:
    """--tp reaches every executor; with --dp-size, engine i's ranks start at GPU base + i*tp, so
    no two engines share a GPU."""
    commands = dict(child_commands(build_parser().parse_args(["serve", *argv])))
    got = {}
    for name, command in commands.items():
        if name.startswith("executor"):
            got[name] = tuple(
                command[command.index(flag) + 1] for flag in ("--tp", "--base-gpu-id")
            )
    assert got == expected
