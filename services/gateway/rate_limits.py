"""Per-key limits: requests per minute and tokens per minute (--api-key-file).

The keys file is JSON: `{"keys": [{"key": "sk-…", "name": "team-a", "rpm": 60, "tpm": 100000}]}`.
Each key is an accepted API key of the user routes, like an --api-key; `name` (optional) labels
it in logs; `rpm` and `tpm` (optional, positive integers) bound what it may use in any 60 seconds:
requests to the user routes, and prompt plus completion tokens of the requests that ended. Past a
limit the request is refused with 429 `rate_limit_exceeded` (OpenAI's code; `type` says whether
requests or tokens ran out) and `Retry-After`, the seconds until the window has room again.

Windows are sliding (timestamps of the last minute) and kept by each gateway process: behind N
gateways a key may use up to N times its limits.
"""

from __future__ import annotations

import collections
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.gateway.errors import RateLimited

WINDOW_S = 60.0


@dataclass(frozen=True)
class KeyLimit:
    """One key of the keys file; None: no limit of that kind."""

    key: str
    name: str
    rpm: int | None = None
    tpm: int | None = None


def load_keys_file(path: str | Path) -> list[KeyLimit]:
    """Parses the keys file (see the module doc). Raises ValueError naming what is wrong."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--api-key-file {path}: {exc}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'--api-key-file {path}: expected {{"keys": [...]}}')
    out, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"--api-key-file {path}: keys[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not entry["key"]:
            raise ValueError(f"{where}: needs a non-empty string 'key'")
        unknown = set(entry) - {"key", "name", "rpm", "tpm"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        for kind in ("rpm", "tpm"):
            value = entry.get(kind)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{where}: '{kind}' must be a positive integer")
        if entry["key"] in seen:
            raise ValueError(f"{where}: the key appears twice")
        seen.add(entry["key"])
        name = entry.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"{where}: 'name' must be a string")
        out.append(KeyLimit(entry["key"], name or f"key-{i}", entry.get("rpm"), entry.get("tpm")))
    return out


@dataclass
class _Usage:
    requests: collections.deque[float] = field(default_factory=collections.deque)
    tokens: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    token_sum: int = 0


class RateLimiter:
    """The sliding one-minute windows of every limited key. Not thread-safe: the gateway's event
    loop is its only user. `clock` (seconds, monotonic) is replaceable for tests."""

    def __init__(self, limits: list[KeyLimit], clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = {k.key: k for k in limits if k.rpm is not None or k.tpm is not None}
        self._usage = {key: _Usage() for key in self.limits}
        self._clock = clock

    def admit(self, key: str) -> None:
        """Counts one request of `key`; raises RateLimited (counting nothing) when its requests or
        its tokens of the last minute are at the limit. Keys without limits pass."""
        limit = self.limits.get(key)
        if limit is None:
            return
        now = self._clock()
        usage = self._expire(self._usage[key], now)
        if limit.rpm is not None and len(usage.requests) >= limit.rpm:
            wait = usage.requests[0] + WINDOW_S - now
            raise RateLimited(
                f"Rate limit reached for {limit.name} on requests per min (RPM): "
                f"limit {limit.rpm}, used {len(usage.requests)}.",
                "requests",
                _seconds(wait),
            )
        if limit.tpm is not None and usage.token_sum >= limit.tpm:
            wait = _until_below(usage.tokens, usage.token_sum, limit.tpm) + WINDOW_S - now
            raise RateLimited(
                f"Rate limit reached for {limit.name} on tokens per min (TPM): "
                f"limit {limit.tpm}, used {usage.token_sum}.",
                "tokens",
                _seconds(wait),
            )
        usage.requests.append(now)

    def add_tokens(self, key: str, tokens: int) -> None:
        """Charges `tokens` (prompt + completion of a request that ended) to `key`."""
        if key not in self.limits or tokens <= 0:
            return
        usage = self._usage[key]
        usage.tokens.append((self._clock(), tokens))
        usage.token_sum += tokens

    @staticmethod
    def _expire(usage: _Usage, now: float) -> _Usage:
        while usage.requests and usage.requests[0] <= now - WINDOW_S:
            usage.requests.popleft()
        while usage.tokens and usage.tokens[0][0] <= now - WINDOW_S:
            usage.token_sum -= usage.tokens.popleft()[1]
        return usage


def _until_below(tokens: collections.deque[tuple[float, int]], total: int, limit: int) -> float:
    """When enough of the oldest charges have left the window for the sum to be under `limit`."""
    for at, n in tokens:
        total -= n
        if total < limit:
            return at
    return tokens[-1][0]


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))
