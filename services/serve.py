"""`radixserve serve`: the four services as local child processes behind one command.

serve owns the wiring (internal ports on 127.0.0.1, who talks to whom); every other flag belongs to
a service and is handed to each service that has it. Children run in their own process group so a
terminal's Ctrl-C reaches only serve, which then stops them in order: the gateway first (in-flight
requests drain), then scheduler, executor and tokenizer. The children write to serve's stderr, and
serve logs there too, all in the one --log-format.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import importlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from services.common.config import add_arguments, from_args, to_argv
from services.common.libc import libc_function
from services.common.log import LogConfig, setup_logging
from services.common.ports import free_port, reserve
from services.common.tracing import TracingConfig

# (service, config class) in start order; the gateway is the one users talk to.
SERVICES = [
    ("tokenizer", "services.tokenizer.config:TokenizerConfig"),
    ("executor", "services.executor.config:ExecutorConfig"),
    ("scheduler", "services.scheduler.config:SchedulerConfig"),
    ("gateway", "services.gateway.config:GatewayConfig"),
]
WIRING = {"host", "port", "executor", "tokenizer", "scheduler", "metrics_port"}
# The order services stop in: requests drain from the gateway down.
STOP_ORDER = ["gateway", "scheduler", "executor", "tokenizer"]
log = logging.getLogger("radixserve.serve")
# The readiness probe of serve's own gateway over TLS: encrypted, certificate not verified.
_OWN_GATEWAY_TLS = ssl.create_default_context()
_OWN_GATEWAY_TLS.check_hostname = False
_OWN_GATEWAY_TLS.verify_mode = ssl.CERT_NONE


def config_class(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default=os.environ.get("RADIXSERVE_HOST", "127.0.0.1"),
        help="address the gateway binds [env RADIXSERVE_HOST]",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("RADIXSERVE_PORT", "8000")),
        help="the gateway's HTTP port [env RADIXSERVE_PORT]",
    )
    parser.add_argument(
        "--dp-size",
        "--dp",
        type=int,
        default=int(os.environ.get("RADIXSERVE_DP_SIZE", "1")),
        help="engines (scheduler + executor pairs) behind the gateway, which routes between them "
        "by --routing-policy; each executor gets an equal share of the cores unless "
        "--num-threads is given [env RADIXSERVE_DP_SIZE]",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=_env_int("RADIXSERVE_METRICS_PORT"),
        help="N: the tokenizer serves Prometheus metrics at /metrics on port N, engine i's "
        "executor on N+1+2i and its scheduler on N+2+2i (unset: none; the gateway serves its "
        "own on --port) [env RADIXSERVE_METRICS_PORT]",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for the model to load and warm up",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds each service gets to stop before it is killed",
    )
    taken = set(WIRING)
    for _, spec in SERVICES:
        taken |= set(add_arguments(parser, config_class(spec), skip=taken))
    add_arguments(parser, TracingConfig)  # every service gets these


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def metrics_ports(base: int | None, dp_size: int) -> dict[str, int | None]:
    """Child name -> its --metrics-port under `serve --metrics-port base`."""
    ports: dict[str, int | None] = {"tokenizer": base}
    for i in range(dp_size):
        ports[engine_name("executor", i, dp_size)] = None if base is None else base + 1 + 2 * i
        ports[engine_name("scheduler", i, dp_size)] = None if base is None else base + 2 + 2 * i
    return ports


def engine_name(service: str, index: int, dp_size: int) -> str:
    """`executor` / `scheduler` with one engine; `executor-0`, `scheduler-1`… with several."""
    return service if dp_size == 1 else f"{service}-{index}"


def wiring(args: argparse.Namespace) -> list[tuple[str, str, dict[str, object]]]:
    """(child name, service, its wiring flags) of every child, in start order."""
    dp = args.dp_size
    metrics = metrics_ports(args.metrics_port, dp)
    # The fixed ports first, so no internal port is picked among them.
    reserve([args.port, *(port for port in metrics.values() if port is not None)])
    tokenizer = f"127.0.0.1:{(tokenizer_port := free_port())}"
    children: list[tuple[str, str, dict[str, object]]] = [
        ("tokenizer", "tokenizer", {"host": "127.0.0.1", "port": tokenizer_port}),
    ]
    schedulers = []
    for i in range(dp):
        executor, scheduler = free_port(), free_port()
        schedulers.append(f"127.0.0.1:{scheduler}")
        # engine i's ranks take GPUs base + i*tp .. base + i*tp + tp - 1 (unused on the CPU)
        gpus = args.base_gpu_id + i * args.tp
        wires = {"host": "127.0.0.1", "port": executor, "base_gpu_id": gpus}
        children.append((engine_name("executor", i, dp), "executor", wires))
        wires = {"host": "127.0.0.1", "port": scheduler, "executor": f"127.0.0.1:{executor}"}
        children.append((engine_name("scheduler", i, dp), "scheduler", wires))
    gateway = {
        "host": args.host,
        "port": args.port,
        "tokenizer": [tokenizer],
        "scheduler": schedulers,
    }
    children.append(("gateway", "gateway", gateway))
    for name, _, wires in children:
        if name in metrics:
            wires["metrics_port"] = metrics[name]
    return children


def child_commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """Each child's command line: its service's flags from `args`, the tracing flags, the wiring
    (and with --dp-size > 1, each executor's share of the cores and its own GPUs)."""
    if args.dp_size < 1:
        raise SystemExit("--dp-size must be at least 1")
    tracing = to_argv(from_args(TracingConfig, args))
    specs = dict(SERVICES)
    commands = []
    for name, service, wires in wiring(args):
        cls = config_class(specs[service])
        values = {}
        for field in dataclasses.fields(cls):
            if field.name in wires:
                values[field.name] = _fit(wires[field.name], field.type)
            elif field.name not in WIRING and hasattr(args, field.name):
                values[field.name] = getattr(args, field.name)
        if service == "executor" and args.dp_size > 1 and values.get("num_threads") is None:
            values["num_threads"] = max(1, len(os.sched_getaffinity(0)) // args.dp_size)
        commands.append((name, [service, *to_argv(cls(**values)), *tracing]))
    return commands


def _fit(value: object, annotation: object) -> object:
    """A wiring address given as a list where the field takes a single string, or vice versa."""
    wants_list = "list" in str(annotation)
    if isinstance(value, list) and not wants_list:
        return value[0]
    if not isinstance(value, list) and wants_list:
        return [value]
    return value


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None


class Supervisor:
    def __init__(self, commands: list[tuple[str, list[str]]], stop_timeout: float) -> None:
        self.children = [Child(name, argv) for name, argv in commands]
        self.stop_timeout = stop_timeout
        self.stopping = False

    def start(self) -> None:
        """Starts every child, each in its own session; on Linux each gets SIGTERM when this
        process ends, even by SIGKILL (`_with_parent`), so no service outlives `serve`. Call
        it from the main thread: the signal follows the thread that forked."""
        with_parent = _with_parent(os.getpid())
        for child in self.children:
            cmd = [sys.executable, "-m", "services.cli", *child.argv]
            child.proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=with_parent)

    def dead_child(self) -> Child | None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                return child
        return None

    def stop(self) -> None:
        """Stops the children service by service in STOP_ORDER (the engines' schedulers all
        before their executors), each given --stop-timeout before it is killed."""
        for service in STOP_ORDER:
            for child in self.children:
                if child.argv[0] != service or child.proc is None or child.proc.poll() is not None:
                    continue
                child.proc.send_signal(signal.SIGTERM)
            for child in self.children:
                if child.argv[0] != service or child.proc is None:
                    continue
                try:
                    child.proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "%s did not stop in %.0fs; killing it", child.name, self.stop_timeout
                    )
                    child.proc.kill()
                    child.proc.wait()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _with_parent(parent: int) -> Callable[[], None] | None:
    """A `preexec_fn` that has the child receive SIGTERM when `parent` ends (Linux's
    prctl(PR_SET_PDEATHSIG), kept across exec), or None off Linux. A parent that already ended
    before the call gets the same signal at once."""
    # Looked up before the fork: the child only calls it.
    prctl = libc_function("prctl", (ctypes.c_int, ctypes.c_ulong), ctypes.c_int)
    if prctl is None:
        return None

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


def ready(url: str) -> tuple[bool, str]:
    """(the URL answers 200, why not). An https URL is the gateway serve started on this machine,
    so its certificate (often self-signed, for another host name) is not checked."""
    try:
        with urllib.request.urlopen(url, timeout=2, context=_OWN_GATEWAY_TLS) as response:
            return response.status == 200, ""
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            return False, str(json.loads(body)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return False, body[:200]
    except OSError as exc:
        return False, str(exc)


def main(args: argparse.Namespace) -> None:
    setup_logging("serve", from_args(LogConfig, args))
    commands = child_commands(args)
    supervisor = Supervisor(commands, args.stop_timeout)
    stop_signal: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop_signal.append(signum))
    supervisor.start()
    code = _supervise(supervisor, args, stop_signal)
    supervisor.stop()
    log.info("stopped")
    sys.exit(code)


def _supervise(supervisor: Supervisor, args: argparse.Namespace, stop_signal: list[int]) -> int:
    scheme = "https" if args.ssl_certfile else "http"
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"{scheme}://{host}:{args.port}"
    started, announced, last_note = time.monotonic(), False, 0.0
    while not stop_signal:
        dead = supervisor.dead_child()
        if dead is not None:
            code = dead.proc.returncode if dead.proc else -1
            log.error("the %s service exited with code %d; stopping the others", dead.name, code)
            return 1
        if not announced:
            ok, reason = ready(f"{base}/ready")
            elapsed = time.monotonic() - started
            if ok:
                print(
                    f"radixserve is ready on {base}/v1 (OpenAI-compatible; took {elapsed:.0f}s)",
                    flush=True,
                )
                announced = True
            elif elapsed - last_note >= 10:
                log.info("waiting for the services (%.0fs): %s", elapsed, reason)
                last_note = elapsed
            if not ok and elapsed > args.ready_timeout:
                log.error("not ready after %.0fs", args.ready_timeout)
                return 1
        time.sleep(0.5)
    return 0
