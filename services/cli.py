"""The `radixserve` command: one subcommand per service, plus tools."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from services.common.config import add_arguments, from_args
from services.common.model_store import ModelNotFoundError
from services.common.tracing import TracingConfig, session


def _executor(args: argparse.Namespace) -> None:
    from services.executor.config import ExecutorConfig
    from services.executor.server import main

    with session(from_args(TracingConfig, args), "executor"):
        main(from_args(ExecutorConfig, args))


def _tokenizer(args: argparse.Namespace) -> None:
    from services.tokenizer.config import TokenizerConfig
    from services.tokenizer.server import main

    with session(from_args(TracingConfig, args), "tokenizer"):
        main(from_args(TokenizerConfig, args))


def _scheduler(args: argparse.Namespace) -> None:
    from services.scheduler.config import SchedulerConfig
    from services.scheduler.server import main

    with session(from_args(TracingConfig, args), "scheduler"):
        main(from_args(SchedulerConfig, args))


def _gateway(args: argparse.Namespace) -> None:
    from services.gateway.config import GatewayConfig
    from services.gateway.server import main

    with session(from_args(TracingConfig, args), "gateway"):
        main(from_args(GatewayConfig, args))


def _models(args: argparse.Namespace) -> None:
    from services.common.log import LogConfig, setup_logging
    from services.common.model_store import list_cached, resolve_model_path

    setup_logging("models", from_args(LogConfig, args))
    path = resolve_model_path(args.prepare)
    print(f"ready: {path}")
    for model in list_cached():
        print(f"{model.name:40s} {model.size_bytes / 2**20:9.1f} MiB  {model.path}")


def _add_models(sub: argparse._SubParsersAction) -> None:
    from services.common.log import LogConfig

    p = sub.add_parser("models", help="prepare the default (or a given) model and list cached ones")
    p.add_argument(
        "--prepare", default="default", help="model path to prepare (default: the bundled model)"
    )
    add_arguments(p, LogConfig)
    p.set_defaults(func=_models)


def _add_executor(sub: argparse._SubParsersAction) -> None:
    from services.executor.config import ExecutorConfig

    p = sub.add_parser("executor", help="serve the model executor (gRPC)")
    add_arguments(p, ExecutorConfig)
    add_arguments(p, TracingConfig)
    p.set_defaults(func=_executor)


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    from services.tokenizer.config import TokenizerConfig

    p = sub.add_parser(
        "tokenizer", help="serve the tokenizer: encode, chat templates, detokenize (gRPC)"
    )
    add_arguments(p, TokenizerConfig)
    add_arguments(p, TracingConfig)
    p.set_defaults(func=_tokenizer)


def _add_scheduler(sub: argparse._SubParsersAction) -> None:
    from services.scheduler.config import SchedulerConfig

    p = sub.add_parser(
        "scheduler", help="serve the scheduler: queue, prefix cache, batching (gRPC)"
    )
    add_arguments(p, SchedulerConfig)
    add_arguments(p, TracingConfig)
    p.set_defaults(func=_scheduler)


def _add_gateway(sub: argparse._SubParsersAction) -> None:
    from services.gateway.config import GatewayConfig

    p = sub.add_parser("gateway", help="serve the OpenAI-compatible HTTP API (Starlette + uvicorn)")
    add_arguments(p, GatewayConfig)
    add_arguments(p, TracingConfig)
    p.set_defaults(func=_gateway)


class _LazyParser(argparse.ArgumentParser):
    """An argument parser that adds its arguments on first use, by calling `fill(parser)` before
    it parses or prints its help. The tools' parsers are these, so that building the whole
    command line imports no tool module: `bench-executor` and `perplexity` import torch (and the
    others HTTP clients), which the gateway, tokenizer and scheduler processes (and `radixserve
    serve` itself) would otherwise load at start-up, about 2 s of CPU and 200 MB of memory
    each."""

    def __init__(
        self, *args: object, fill: Callable[[argparse.ArgumentParser], None] | None = None, **kw
    ) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self._fill = fill

    def _filled(self) -> None:
        fill, self._fill = self._fill, None
        if fill is not None:
            fill(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        self._filled()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._filled()
        return super().format_usage()

    def format_help(self) -> str:
        self._filled()
        return super().format_help()


def _tool(name: str, module: str, help: str) -> Callable[[argparse._SubParsersAction], None]:
    """The adder of a tool subcommand whose `module` has `add_arguments(parser)` and
    `main(args)`; the module is imported when that subcommand is parsed (or its help printed)."""

    def fill(p: argparse.ArgumentParser) -> None:
        tool = importlib.import_module(module)
        tool.add_arguments(p)
        p.set_defaults(func=tool.main)

    def add(sub: argparse._SubParsersAction) -> None:
        sub.add_parser(name, help=help, fill=fill)

    return add


def _serve(args: argparse.Namespace) -> None:
    from services.serve import main

    main(args)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from services.serve import add_serve_arguments

    p = sub.add_parser(
        "serve", help="run all four services locally and serve the OpenAI API (default model)"
    )
    add_serve_arguments(p)
    p.set_defaults(func=_serve)


def _healthcheck(args: argparse.Namespace) -> None:
    from services.common.healthcheck import run

    sys.exit(run(args))


def _add_healthcheck(sub: argparse._SubParsersAction) -> None:
    from services.common.healthcheck import add_arguments as add_healthcheck_arguments

    p = sub.add_parser(
        "healthcheck", help="probe a service: gRPC health, an HTTP URL, or a scheduler draining"
    )
    add_healthcheck_arguments(p)
    p.set_defaults(func=_healthcheck)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_serve,
    _add_executor,
    _add_tokenizer,
    _add_scheduler,
    _add_gateway,
    _add_models,
    _tool(
        "bench-executor",
        "services.executor.bench",
        "time decode and prefill steps of the executor in process",
    ),
    _tool(
        "perplexity",
        "services.executor.perplexity",
        "perplexity of the model on a shipped text, per --quantization mode",
    ),
    _tool(
        "bench",
        "services.bench.cli",
        "load any OpenAI-compatible server: throughput, TTFT, ITL, latency",
    ),
    _tool(
        "bench-lang",
        "radixserve.lang.bench",
        "time N frontend-language programs run one by one and with run_batch",
    ),
    _add_healthcheck,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_LazyParser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ModelNotFoundError, ValueError) as exc:
        print(f"radixserve {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
