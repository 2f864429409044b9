"""A deploy file's command line and environment, parsed by the real `radixserve` CLI."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
from typing import Any
from urllib.parse import urlparse

import pytest

from services.cli import build_parser
from services.common import healthcheck
from services.common.config import env_name, from_args
from services.serve import SERVICES, config_class

# Read by every process rather than one service's config (model store, CPU kernels).
PROCESS_ENV = {"RADIXSERVE_CACHE_DIR", "RADIXSERVE_DISABLE_CPU_KERNELS"}
CONFIGS = {name: config_class(spec) for name, spec in SERVICES}
HEALTHCHECK_MODULE = ["python", "-m", "services.common.healthcheck"]


class CommandError(AssertionError):
    pass


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        raise CommandError(f"{where}: `{' '.join(argv)}` is refused:\n{err.getvalue()}") from None


def service_config(argv: list[str], env: dict[str, str], where: str) -> Any:
    """The service config that `radixserve <argv>` builds under `env` (validated).

    Fails on an unknown subcommand or flag, a bad value, and a RADIXSERVE_* variable that is the
    twin of no field of that service's config.
    """
    assert argv and argv[0] in CONFIGS, f"{where}: `{argv[:1]}` is not a service subcommand"
    cls = CONFIGS[argv[0]]
    known = {env_name(f.name) for f in dataclasses.fields(cls)} | PROCESS_ENV
    unknown = sorted(k for k in env if k.startswith("RADIXSERVE_") and k not in known)
    assert not unknown, f"{where}: {argv[0]} has no setting for {unknown}"
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("RADIXSERVE_")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            parser = build_parser()  # flag defaults read the environment here
        except ValueError as exc:
            raise CommandError(f"{where}: bad environment value: {exc}") from None
        _check_exact_flags(parser, argv, where)
        args = _parse(parser, argv, where)
        try:
            return from_args(cls, args)
        except ValueError as exc:
            raise CommandError(f"{where}: {exc}") from None


def _check_exact_flags(parser: argparse.ArgumentParser, argv: list[str], where: str) -> None:
    """argparse takes unambiguous prefixes (`--max-total` for `--max-total-tokens`); a deploy file
    must spell flags out, or a new flag sharing the prefix would break it. Service commands only:
    a tool's sub-parser holds its flags once it has parsed (services/cli.py's _LazyParser)."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    known = sub.choices[argv[0]]._option_string_actions
    for arg in argv[1:]:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            raise CommandError(f"{where}: {flag} is not a flag of `radixserve {argv[0]}`")


@dataclasses.dataclass(frozen=True)
class Probe:
    """A parsed `python -m services.common.healthcheck ...` command."""

    port: int
    kind: str  # "grpc", "http" or "idle"
    path: str | None = None


def healthcheck_probe(command: list[str], where: str) -> Probe:
    """Parses a healthcheck / pre-stop command as the image runs it."""
    if command[:2] == ["radixserve", "healthcheck"]:
        rest = command[2:]
    else:
        assert command[:3] == HEALTHCHECK_MODULE, (
            f"{where}: {command} is not the healthcheck command"
        )
        rest = command[3:]
    parser = argparse.ArgumentParser(allow_abbrev=False)  # flags spelt out
    healthcheck.add_arguments(parser)
    args = _parse(parser, rest, where)
    if args.http:
        url = urlparse(args.http)
        assert url.hostname in ("127.0.0.1", "localhost"), f"{where}: probes its own container"
        return Probe(url.port or 80, "http", url.path)
    host, _, port = args.grpc.rpartition(":")
    assert host in ("127.0.0.1", "localhost"), f"{where}: probes its own pod"
    return Probe(int(port), "idle" if args.wait_idle is not None else "grpc")


def gateway_routes() -> set[str]:
    from services.gateway.app import build_app
    from services.gateway.config import GatewayConfig

    return {route.path for route in build_app(GatewayConfig()).routes}
