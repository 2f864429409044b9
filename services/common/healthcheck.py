"""`radixserve healthcheck`: the probe a container runtime runs inside a service's container.

It exits 0 when the service is healthy and 1 otherwise, printing why:
- `--grpc HOST:PORT`: the grpc.health.v1 service reports SERVING (every gRPC service);
- `--http URL`: the URL answers 200 (the gateway's /ready);
- `--grpc HOST:PORT --wait-idle`: waits until a scheduler has no running or waiting samples, for a
  pre-stop hook that lets in-flight requests drain before the service is stopped.

It imports grpc and nothing heavy, so `python -m services.common.healthcheck` costs a fraction of a
second; compose runs it that way every few seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

IDLE_POLL_S = 1.0
IDLE_POLLS = 3  # consecutive idle polls before the scheduler counts as drained


def check_grpc(address: str, service: str, timeout: float) -> tuple[bool, str]:
    """(serving, status name) of the health service at `address`."""
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
        except grpc.RpcError as err:
            return False, f"{err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def check_http(url: str, timeout: float) -> tuple[bool, str]:
    """(status is 200, status or error) of a GET of `url`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, str(response.status)
    except urllib.error.HTTPError as exc:
        return False, f"{exc.code} {exc.read().decode(errors='replace')[:200]}"
    except OSError as exc:
        return False, str(exc)


def scheduler_busy(address: str, timeout: float) -> int | None:
    """Running + waiting samples of the scheduler at `address` (None: unreachable)."""
    from radixserve.v1 import scheduler_pb2, scheduler_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            load = stub.GetLoad(scheduler_pb2.GetLoadRequest(), timeout=timeout)
        except grpc.RpcError:
            return None
    return load.num_running + load.num_waiting


def wait_idle(address: str, deadline_s: float, timeout: float) -> tuple[bool, str]:
    """Waits until the scheduler reports no samples IDLE_POLLS times in a row (or is gone)."""
    deadline, idle = time.monotonic() + deadline_s, 0
    while time.monotonic() < deadline:
        busy = scheduler_busy(address, timeout)
        if busy is None:
            return True, "unreachable: nothing left to drain"
        idle = idle + 1 if busy == 0 else 0
        if idle >= IDLE_POLLS:
            return True, "idle"
        time.sleep(IDLE_POLL_S)
    return False, f"still busy after {deadline_s:.0f}s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--grpc", metavar="HOST:PORT", help="check the grpc.health.v1 service here")
    target.add_argument("--http", metavar="URL", help="check that this URL answers 200")
    parser.add_argument("--service", default="", help="gRPC service name to check ('': the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per check")
    parser.add_argument(
        "--wait-idle",
        type=float,
        metavar="SECONDS",
        default=None,
        help="with --grpc on a scheduler: wait up to SECONDS until it has no running or waiting samples",
    )


def run(args: argparse.Namespace) -> int:
    if args.wait_idle is not None:
        if not args.grpc:
            print("healthcheck: --wait-idle needs --grpc", file=sys.stderr)
            return 2
        ok, detail = wait_idle(args.grpc, args.wait_idle, args.timeout)
    elif args.grpc:
        ok, detail = check_grpc(args.grpc, args.service, args.timeout)
    else:
        ok, detail = check_http(args.http, args.timeout)
    print(f"{args.grpc or args.http}: {detail}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="radixserve healthcheck", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
