"""The human-readable result table and the JSON result file."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from services.bench.config import BenchConfig
from services.bench.metrics import Stats, Summary
from services.bench.runner import RunResult
from services.bench.service_cpu import ServiceCpu

WIDTH = 50


def _title(text: str, fill: str) -> str:
    return f" {text} ".center(WIDTH, fill) if text else fill * WIDTH


def _row(label: str, value: object) -> str:
    if value is None:
        value = "n/a"
    elif isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label + ':':<40}{value}"


def _stats_rows(title: str, short: str, stats: Stats) -> list[str]:
    return [
        _title(title, "-"),
        _row(f"Mean {short} (ms)", stats.mean),
        _row(f"Median {short} (ms)", stats.median),
        _row(f"P99 {short} (ms)", stats.p99),
    ]


def _cpu_rows(cpu: list[ServiceCpu], client: ServiceCpu | None) -> list[str]:
    if not cpu:
        return []
    rows = [_title("Service CPU (s per 1k output tokens)", "-")]
    rows += [_row(f"{c.name} (pid {c.pid})", c.per_1k_output_tokens) for c in cpu]
    total = sum(c.per_1k_output_tokens for c in cpu)
    rows.append(_row("All listed services", total))
    if client is not None:
        rows.append(_row("bench client (this process)", client.per_1k_output_tokens))
    return rows


def format_table(
    config: BenchConfig,
    model: str,
    summary: Summary,
    cpu: list[ServiceCpu] | None = None,
    client: ServiceCpu | None = None,
) -> str:
    cap = config.max_concurrency if config.max_concurrency is not None else "not set"
    lines = [
        _title("Serving Benchmark Result", "="),
        _row("Dataset", config.dataset),
        _row("Endpoint", config.resolved_endpoint),
        _row("Model", model),
        _row("Max concurrency", cap),
        _row("Request rate (req/s)", config.request_rate),
        _row("Successful requests", summary.completed),
        _row("Failed requests", summary.errors),
    ]
    if summary.errors_by_kind:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(summary.errors_by_kind.items()))
        lines.append(_row("Failures by kind", kinds))
    lines += [
        _row("Benchmark duration (s)", summary.duration_s),
        _row("Total input tokens", summary.total_input_tokens),
        _row("Total generated tokens", summary.total_output_tokens),
        _row("Cached prompt tokens (server)", summary.total_cached_tokens),
        _row("Cached share of prompt tokens", summary.cached_token_ratio),
        _row("Request throughput (req/s)", summary.request_throughput),
        _row("Input token throughput (tok/s)", summary.input_token_throughput),
        _row("Output token throughput (tok/s)", summary.output_token_throughput),
        _row("Total token throughput (tok/s)", summary.total_token_throughput),
        _row("Mean concurrency", summary.mean_concurrency),
        _row("Peak concurrency", summary.peak_concurrency),
        *_stats_rows("End-to-End Latency", "E2E", summary.e2e_latency_ms),
        *_stats_rows("Time to First Token", "TTFT", summary.ttft_ms),
        *_stats_rows("Time per Output Token (excl. 1st token)", "TPOT", summary.tpot_ms),
        *_stats_rows("Inter-Chunk Latency", "ITL", summary.itl_ms),
        *_cpu_rows(cpu or [], client),
        _title("", "="),
    ]
    return "\n".join(lines)


def result_json(
    config: BenchConfig,
    model: str,
    summary: Summary,
    run: RunResult,
    cpu: list[ServiceCpu] | None = None,
    client: ServiceCpu | None = None,
) -> dict[str, Any]:
    settings = asdict(config)
    settings["api_key"] = "***" if config.api_key else None
    settings["endpoint"] = config.resolved_endpoint
    return {
        "config": settings,
        "model": model,
        "summary": asdict(summary),
        "service_cpu": [asdict(c) for c in cpu or []],
        "client_cpu": asdict(client) if client is not None else None,
        "requests": [r.to_json(run.start_s) for r in run.records],
    }


def write_json(path: Path, result: dict[str, Any]) -> None:
    # inf (an unbounded --request-rate) is not JSON: written as the string "inf"
    text = json.dumps(_finite(result), indent=2, allow_nan=False)
    path.write_text(text + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
