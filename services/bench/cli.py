"""`radixserve bench`: build the workload, warm up, run it, print the table, write the JSON."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import aiohttp

from services.bench.client import BenchClient, ClientConfig, first_model, make_http
from services.bench.config import BenchConfig
from services.bench.datasets import Conversation, Request, Workload, build_workload, num_requests
from services.bench.metrics import summarize
from services.bench.report import format_table, result_json, write_json
from services.bench.runner import Runner, RunResult, Schedule
from services.bench.service_cpu import CpuMeter, meter_for
from services.bench.tokens import TokenCounter
from services.common.config import add_arguments as add_config_arguments
from services.common.config import flag_name, from_args

WARMUP_MAX_TOKENS = 16
# RADIXSERVE_TOKENIZER and RADIXSERVE_API_KEY belong to the gateway (its tokenizer addresses and
# accepted keys): these two flags have no environment twin.
NO_ENV_TWIN = ("tokenizer", "api_key")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, BenchConfig, skip=NO_ENV_TWIN)
    for field in fields(BenchConfig):
        if field.name in NO_ENV_TWIN:
            help_text = field.metadata["help"]
            parser.add_argument(
                flag_name(field.name), dest=field.name, default=field.default, help=help_text
            )


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark of `args` (flags of `add_arguments`); returns the summary as a dict."""
    config = from_args(BenchConfig, args)
    counter = TokenCounter.load(config.tokenizer)
    workload = build_workload(config, counter)
    meter = meter_for(config.serve_pid, config.server_pids)
    model, result = asyncio.run(_run(config, counter, workload, meter))
    summary = summarize(result.records, result.duration_s)
    cpu = meter.report(summary.total_output_tokens) if meter else []
    client = meter.client(summary.total_output_tokens) if meter else None
    print(format_table(config, model, summary, cpu, client))
    path = output_path(config)
    write_json(path, result_json(config, model, summary, result, cpu, client))
    print(f"results written to {path}")
    return asdict(summary)


def output_path(config: BenchConfig) -> Path:
    if config.output_file:
        return Path(config.output_file)
    return Path(f"bench-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}.json")


async def _run(
    config: BenchConfig, counter: TokenCounter, workload: Workload, meter: CpuMeter | None = None
) -> tuple[str, RunResult]:
    """Warms up, then runs the workload; `meter` reads the services' CPU around the timed run."""
    async with make_http(config.max_concurrency) as http:
        model = await _model(config, http)
        client_config = ClientConfig(
            config.base_url,
            model,
            config.resolved_endpoint,
            config.api_key,
            config.temperature,
            config.ignore_eos,
        )
        client = BenchClient(client_config, counter, http)
        print(
            f"[bench] {num_requests(workload)} requests ({config.dataset}) to {config.base_url} "
            f"{config.resolved_endpoint}, model {model}",
            file=sys.stderr,
        )
        await asyncio.wait_for(warmup(client, workload, config.warmup_requests), config.timeout_s)
        schedule = Schedule(
            config.max_concurrency, config.request_rate, config.timeout_s, config.seed
        )
        if meter is not None:
            meter.start()
        result = await Runner(client.send, schedule).run(workload)
        if meter is not None:
            meter.stop()
        return model, result


async def _model(config: BenchConfig, http: aiohttp.ClientSession) -> str:
    if config.model:
        return config.model
    try:
        return await first_model(http, config.base_url, config.api_key)
    except aiohttp.ClientError as exc:
        raise ValueError(f"cannot list the models of {config.base_url}: {exc!r}") from exc


async def warmup(client: BenchClient, workload: Workload, count: int) -> None:
    """Sends the first request of the workload `count` times, short; any failure aborts the run."""
    if not workload:
        return
    unit = workload[0]
    first = unit.request(0, []) if isinstance(unit, Conversation) else unit
    assert isinstance(first, Request)
    request = replace(first, output_len=min(first.output_len, WARMUP_MAX_TOKENS))
    for _ in range(count):
        record = await client.send(request)
        if record.error is not None:
            e = record.error
            raise ValueError(f"warmup request failed ({e.kind} {e.status or ''}): {e.message}")
