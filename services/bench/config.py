"""Benchmark configuration: flags, their RADIXSERVE_* twins, and validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.bench.datasets import DATASETS
from services.common.config import option

ENDPOINTS = ("chat", "completions")
# random prompts are raw text, so they go to /v1/completions; the others are conversations.
DEFAULT_ENDPOINT = {
    "random": "completions",
    "generated-shared-prefix": "chat",
    "multi-turn": "chat",
    "json-schema": "chat",
}


@dataclass(frozen=True)
class BenchConfig:
    base_url: str = option("http://127.0.0.1:8000", "server to load (anything OpenAI-compatible)")
    model: str | None = option(
        None, "model name to request (default: the first id of GET /v1/models)"
    )
    api_key: str | None = option(None, "sent as `Authorization: Bearer <key>`")
    tokenizer: str = option(
        "default",
        "model path whose tokenizer counts tokens locally ('default': SmolLM2-135M-Instruct)",
    )
    dataset: str = option("random", "what to send", DATASETS)
    endpoint: str | None = option(
        None, "API to call (default: completions for random, chat otherwise)", ENDPOINTS
    )
    num_prompts: int = option(1000, "requests of the random and json-schema datasets")
    random_input_len: int = option(1024, "random: most prompt tokens")
    random_output_len: int = option(1024, "random: most output tokens")
    random_range_ratio: float = option(0.0, "random: lengths drawn uniformly in [len * ratio, len]")
    gsp_num_groups: int = option(64, "generated-shared-prefix: groups, one system prompt each")
    gsp_prompts_per_group: int = option(16, "generated-shared-prefix: questions per group")
    gsp_system_prompt_len: int = option(
        2048, "generated-shared-prefix: tokens of each system prompt"
    )
    gsp_question_len: int = option(128, "generated-shared-prefix: tokens of each question")
    gsp_output_len: int = option(256, "generated-shared-prefix: output tokens per request")
    mt_num_conversations: int = option(16, "multi-turn: conversations")
    mt_turns: int = option(4, "multi-turn: user turns per conversation")
    mt_turn_input_len: int = option(128, "multi-turn: tokens of each new user message")
    mt_output_len: int = option(128, "multi-turn: output tokens per turn")
    structured_output_ratio: float = option(
        1.0,
        "json-schema: share of requests sent with their schema as response_format "
        "(the rest ask for the same JSON unconstrained; 0 gives the free baseline)",
    )
    max_concurrency: int | None = option(None, "most requests in flight (default: unbounded)")
    request_rate: float = option(
        math.inf, "arrivals per second, a Poisson process (inf: all at once)"
    )
    seed: int = option(
        1,
        "seed of prompts, lengths and arrival times (with --dataset random a seed's first "
        "prompts are the same for any --num-prompts: use a new seed for each run against a "
        "server that stays up)",
    )
    warmup_requests: int = option(1, "untimed requests sent first (a failure aborts the run)")
    timeout_s: float = option(
        3600.0, "deadline of the whole run; requests still out are cancelled as errors"
    )
    temperature: float = option(0.0, "sampling temperature")
    ignore_eos: bool = option(
        True, "ask the server to ignore EOS so outputs have the requested length"
    )
    serve_pid: int | None = option(
        None, "pid of `radixserve serve`: report the CPU time of its service processes"
    )
    server_pids: list[str] = option(
        [], "NAME=PID of service processes to report CPU time of (e.g. gateway=4242)"
    )
    output_file: str | None = option(
        None, "JSON result file (default: bench-<dataset>-<time>.json)"
    )

    def __post_init__(self) -> None:
        positive = {
            "--num-prompts": self.num_prompts,
            "--random-input-len": self.random_input_len,
            "--random-output-len": self.random_output_len,
            "--gsp-num-groups": self.gsp_num_groups,
            "--gsp-prompts-per-group": self.gsp_prompts_per_group,
            "--gsp-system-prompt-len": self.gsp_system_prompt_len,
            "--gsp-question-len": self.gsp_question_len,
            "--gsp-output-len": self.gsp_output_len,
            "--mt-num-conversations": self.mt_num_conversations,
            "--mt-turns": self.mt_turns,
            "--mt-turn-input-len": self.mt_turn_input_len,
            "--mt-output-len": self.mt_output_len,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be at least 1")
        if not 0.0 <= self.structured_output_ratio <= 1.0:
            raise ValueError("--structured-output-ratio must be in [0, 1]")
        if not 0.0 <= self.random_range_ratio <= 1.0:
            raise ValueError("--random-range-ratio must be in [0, 1]")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be positive (inf: all at once)")
        if not self.timeout_s > 0:
            raise ValueError("--timeout-s must be positive")
        if self.warmup_requests < 0:
            raise ValueError("--warmup-requests must be at least 0")

    @property
    def resolved_endpoint(self) -> str:
        return self.endpoint or DEFAULT_ENDPOINT[self.dataset]
