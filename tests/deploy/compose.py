"""compose.yaml read the way `docker compose` reads it, and its services turned into local processes.

A container's world is rebuilt on this machine: service hostnames become 127.0.0.1, each declared
(service, container port) gets a free local port, named volumes become local directories, and the
image's ENTRYPOINT (`radixserve`) becomes `python -m services.cli`. Everything is derived from the
file: an address naming a port its service does not declare is an error here, as a wrong port
would be a dead connection in a container.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_NAME = "radixserve"
LOOPBACK = {"127.0.0.1", "localhost", "0.0.0.0"}
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
# Flags and variables that name a port the service itself listens on (its gRPC or HTTP port, its
# metrics endpoint): each must be one the service declares, and gets that port's local twin.
OWN_PORT_FLAGS = ("--port", "--metrics-port")
OWN_PORT_VARIABLES = ("RADIXSERVE_PORT", "RADIXSERVE_METRICS_PORT")
_ADDRESS = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*):(\d{2,5})(?!\d)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$$`, over a loaded document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        current = env.get(name)
        if op == ":-":
            return current if current else default
        if op == "-":
            return current if current is not None else default
        if op in (":?", "?") and not current:
            raise ValueError(f"${{{name}}} is required: {default}")
        return current or ""

    return _VAR.sub(substitute, value)


def load_compose(path: Path = COMPOSE_FILE, env: dict[str, str] | None = None) -> dict:
    """The file as compose sees it with no variables set (so every default applies)."""
    return interpolate(yaml.safe_load(path.read_text()), env or {})


def image_env(dockerfile: Path = DOCKERFILE) -> dict[str, str]:
    """The ENV of the Dockerfile's last stage (the image the services run)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    stages = re.split(r"^FROM\s", text, flags=re.MULTILINE)
    env: dict[str, str] = {}
    for line in stages[-1].splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                name, _, value = pair.partition("=")
                env[name] = re.sub(r"\$\{?PATH\}?", "", value)
    return env


def entrypoint(dockerfile: Path = DOCKERFILE) -> list[str]:
    lines = [ln for ln in dockerfile.read_text().splitlines() if ln.startswith("ENTRYPOINT ")]
    return yaml.safe_load(lines[-1].removeprefix("ENTRYPOINT "))


def container_ports(service: dict) -> set[int]:
    """Ports the service declares: `expose` and the container side of `ports`."""
    ports = {int(p) for p in service.get("expose", [])}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def is_own_image(service: dict) -> bool:
    return str(service.get("image", "")).split(":")[0] == IMAGE_NAME


def named_volume_mounts(service: dict, volumes: dict) -> dict[str, str]:
    """Container path → named volume, for the short `name:/path[:mode]` syntax."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        if source in volumes:
            mounts[target] = source
    return mounts


@dataclass
class LocalService:
    """One compose service as a local process."""

    name: str
    argv: list[str]  # the arguments after `radixserve`
    env: dict[str, str]
    ports: dict[int, int]  # container port -> local port
    healthcheck: list[str] | None  # the local command line of its healthcheck test
    health_timeout: float
    depends_on: dict[str, str] = field(default_factory=dict)  # service -> condition

    def local_port(self, container_port: int) -> int:
        return self.ports[container_port]


class LocalCompose:
    """Maps the file's addresses, ports and volumes onto this machine."""

    def __init__(self, compose: dict, volume_dirs: dict[str, Path]) -> None:
        self.compose = compose
        self.services = {
            name: svc
            for name, svc in compose["services"].items()
            if is_own_image(svc) and not svc.get("profiles")
        }
        self.volume_dirs = volume_dirs
        self.ports = {
            (name, port): free_port()
            for name, svc in self.services.items()
            for port in container_ports(svc)
        }

    def address(self, owner: str, host: str, port: int) -> str:
        target = owner if host in LOOPBACK else host
        if target not in self.services:
            raise ValueError(f"{owner}: {host}:{port} names no service of the file")
        if (target, port) not in self.ports:
            raise ValueError(
                f"{owner}: {host}:{port}, but {target} declares only ports "
                f"{sorted(p for s, p in self.ports if s == target)}"
            )
        return f"127.0.0.1:{self.ports[(target, port)]}"

    def rewrite(self, owner: str, text: str, wiring: bool = False) -> str:
        """Addresses of services (and of the container itself) → local addresses. In `wiring`
        (a command line), any other host is an error: it would be unreachable in the network."""

        def one(m: re.Match) -> str:
            host, port = m.group(1), int(m.group(2))
            if host in LOOPBACK or host in self.compose["services"] or wiring:
                return self.address(owner, host, port)
            return m.group(0)

        return _ADDRESS.sub(one, text)

    def own_port(self, owner: str, value: str) -> str:
        port = int(value)
        if (owner, port) not in self.ports:
            raise ValueError(f"{owner} listens on {port}, a port it does not declare")
        return str(self.ports[(owner, port)])

    def command(self, name: str) -> list[str]:
        raw = self.services[name]["command"]
        argv = shlex.split(raw) if isinstance(raw, str) else [str(a) for a in raw]
        if "--port" not in argv:
            raise ValueError(f"{name}: its command must give --port (the port it declares)")
        out = []
        for i, arg in enumerate(argv):
            if i > 0 and argv[i - 1] in OWN_PORT_FLAGS:
                out.append(self.own_port(name, arg))
            elif i > 0 and argv[i - 1] == "--host":
                out.append("127.0.0.1" if arg == "0.0.0.0" else arg)
            else:
                out.append(self.rewrite(name, arg, wiring=True))
        return out

    def environment(self, name: str, base: dict[str, str]) -> dict[str, str]:
        declared = self.services[name].get("environment", {})
        if isinstance(declared, list):
            declared = dict(item.split("=", 1) for item in declared)
        env = {**base, **{k: "" if v is None else str(v) for k, v in declared.items()}}
        mounts = named_volume_mounts(self.services[name], self.compose.get("volumes", {}))
        out = {}
        for key, value in env.items():
            if key in OWN_PORT_VARIABLES:
                value = self.own_port(name, value)
            elif key == "RADIXSERVE_HOST" and value == "0.0.0.0":
                value = "127.0.0.1"
            else:
                value = self.rewrite(name, value)
            for target, volume in mounts.items():
                if value == target or value.startswith(target + "/"):
                    value = str(self.volume_dirs[volume]) + value[len(target) :]
            out[key] = value
        return out

    def healthcheck(self, name: str) -> tuple[list[str] | None, float]:
        check = self.services[name].get("healthcheck")
        if not check or check.get("disable"):
            return None, 0.0
        test = check["test"]
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        kind, args = test[0], test[1:]
        if kind == "CMD-SHELL":
            args = shlex.split(args[0])
        assert kind in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test {test}"
        args = [self.rewrite(name, a) for a in args]
        if args[0] in ("python", "python3"):
            args = [sys.executable, *args[1:]]
        elif args[0] == IMAGE_NAME:
            args = [sys.executable, "-m", "services.cli", *args[1:]]
        return args, parse_duration(check.get("timeout", "30s"))

    def local_services(self, base_env: dict[str, str]) -> list[LocalService]:
        out = []
        for name, svc in self.services.items():
            check, timeout = self.healthcheck(name)
            deps = svc.get("depends_on", {})
            if isinstance(deps, list):
                deps = {d: {"condition": "service_started"} for d in deps}
            out.append(
                LocalService(
                    name=name,
                    argv=self.command(name),
                    env=self.environment(name, base_env),
                    ports={p: self.ports[(name, p)] for s, p in self.ports if s == name},
                    healthcheck=check,
                    health_timeout=timeout,
                    depends_on={
                        d: spec.get("condition", "service_started") for d, spec in deps.items()
                    },
                )
            )
        return out


def parse_duration(text: str) -> float:
    """Compose durations: `1m30s`, `5s`, `250ms`."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    total, matched = 0.0, False
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text):
        total += float(number) * units[unit]
        matched = True
    if not matched:
        raise ValueError(f"not a duration: {text!r}")
    return total
