"""Cumulative counters and the load snapshot a router (and the gateway's /metrics) reads."""

from __future__ import annotations

from dataclasses import dataclass

from services.scheduler.cache import CacheStats


@dataclass
class Counters:
    """Monotonic since start; only the scheduler loop and its API methods (one thread) write them."""

    prompt_tokens: int = 0  # prompt tokens of samples at first admission
    cached_tokens: int = 0  # of those, taken from the prefix cache
    generation_tokens: int = 0
    retractions: int = 0
    rejections: int = 0  # Generate refused because the queue was full
    finished: int = 0
    steps: int = 0
    computed_tokens: int = 0  # tokens the executor computed, from step results
    integrity_checks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True)
class Load:
    num_running: int
    num_waiting: int
    kv: CacheStats
    new_token_ratio: float
    max_running_requests: int
    max_queued_requests: int
    counters: Counters

    @property
    def kv_usage(self) -> float:
        return self.kv.used / self.kv.total if self.kv.total else 0.0
