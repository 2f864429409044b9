"""Gateway configuration: flags, their RADIXSERVE_* twins, and validation."""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.common.config import option
from services.common.log import LogConfig
from services.gateway.discovery import check_target
from services.gateway.routing import ROUTING_POLICIES, RoutingConfig


@dataclass(frozen=True)
class GatewayConfig(LogConfig):
    host: str = option("127.0.0.1", "address the HTTP server binds")
    port: int = option(8000, "HTTP port")
    # option() gives list defaults a default_factory, so no instance shares a list.
    tokenizer: list[str] = option(
        ["127.0.0.1:30001"], "tokenizer gRPC address(es); several are used round-robin"
    )
    scheduler: list[str] = option(
        ["127.0.0.1:30003"],
        "scheduler gRPC address(es) host:port, or dns:///name:port for every address name "
        "resolves to (looked up every --discovery-refresh-s)",
    )
    routing_policy: str = option(
        "cache_aware",
        "which scheduler a request goes to: cache_aware (the longest cached prefix while loads "
        "are balanced), least_load, power_of_two, round_robin",
        ROUTING_POLICIES,
    )
    cache_threshold: float = option(
        0.3, "cache_aware: smallest matched fraction of a prompt that routes by prefix"
    )
    balance_abs_threshold: int = option(
        64, "cache_aware: loads are out of balance when the busiest has this many samples more…"
    )
    balance_rel_threshold: float = option(
        1.5, "…and this many times the idlest's; then requests go to the least loaded"
    )
    max_tree_size: int = option(
        2**22, "cache_aware: prompt tokens remembered per scheduler (least recently used dropped)"
    )
    max_stored_responses: int = option(
        1024, "/v1/responses kept in memory for GET and previous_response_id (oldest dropped)"
    )
    discovery_refresh_s: float = option(
        5.0, "how often dns:/// scheduler targets are resolved again"
    )
    api_key: list[str] = option([], "accepted API key(s) (Bearer); none: no authentication")
    served_model_name: str | None = option(
        None, "model name clients use (default: what the scheduler reports)"
    )
    request_timeout_s: float = option(600.0, "longest a request may run before it is aborted")
    metrics: bool = option(True, "serve Prometheus metrics at /metrics")
    log_requests: bool = option(
        False,
        "log one line per generation request when it ends: id, route, status, token counts, "
        "time to first token, latency",
    )
    access_log: bool = option(False, "log one line per HTTP response (uvicorn's access log)")
    load_refresh_s: float = option(0.5, "how often the schedulers' load is polled for routing")
    max_request_bytes: int = option(
        4 * 2**20, "longest request body accepted; a longer one is answered 413 unread"
    )
    retry_after_s: int = option(1, "Retry-After seconds sent with a 503 when a queue is full")
    shutdown_grace_s: float = option(
        30.0, "on SIGTERM: seconds in-flight requests get to finish before they are aborted"
    )
    tool_call_parser: str | None = option(
        None,
        "format of tool calls in answers: hermes, llama3_json, mistral, pythonic "
        "(default: from the model family; hermes for SmolLM2, Qwen and Hermes)",
    )
    reasoning_parser: str | None = option(
        None, "split answers' think sections into reasoning_content: deepseek-r1, qwen3"
    )
    # Operations: the admin key, CORS and TLS (names from SGLang and vLLM).
    admin_api_key: list[str] = option(
        [], "key(s) for the admin routes /flush_cache and /get_server_info; none: --api-key's"
    )
    protect_metrics: bool = option(
        False, "/metrics and /health_generate need a key (--api-key or --admin-api-key)"
    )
    allowed_origins: list[str] = option(
        [], "CORS: origins browsers may call from ('*': any); none: no CORS headers"
    )
    allowed_methods: list[str] = option(["*"], "CORS: methods allowed cross-origin")
    allowed_headers: list[str] = option(["*"], "CORS: request headers allowed cross-origin")
    allow_credentials: bool = option(False, "CORS: allow credentials (cookies, auth) cross-origin")
    api_key_file: str | None = option(
        None,
        "JSON file of API keys with per-key limits: "
        '{"keys": [{"key": ..., "name": ..., "rpm": 60, "tpm": 100000}]} (429 past a limit)',
    )
    ssl_keyfile: str | None = option(None, "TLS private key (PEM file); with --ssl-certfile: HTTPS")
    ssl_certfile: str | None = option(None, "TLS certificate chain (PEM file)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.port < 65536:
            raise ValueError("--port must be in [0, 65535]")
        if not self.tokenizer or not self.scheduler:
            raise ValueError("--tokenizer and --scheduler need at least one address")
        if any(not key for key in self.api_key):
            raise ValueError("--api-key values must not be empty")
        for name in ("request_timeout_s", "load_refresh_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if self.max_request_bytes <= 0:
            raise ValueError("--max-request-bytes must be > 0")
        if self.retry_after_s < 0 or self.shutdown_grace_s < 0:
            raise ValueError("--retry-after-s and --shutdown-grace-s must be >= 0")
        from services.gateway.chat_tools import check_parsers

        check_parsers(self.tool_call_parser, self.reasoning_parser)
        self._check_routing()
        self._check_operations()

    def _check_routing(self) -> None:
        for target in self.scheduler:
            try:
                check_target(target)
            except ValueError as exc:
                raise ValueError(f"--scheduler: {exc} (nor dns:///host:port)") from None
        if self.routing_policy not in ROUTING_POLICIES:
            raise ValueError(f"--routing-policy must be one of {', '.join(ROUTING_POLICIES)}")
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError("--cache-threshold must be in [0, 1]")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1:
            raise ValueError("--balance-abs-threshold must be >= 0, --balance-rel-threshold >= 1")
        if self.max_stored_responses < 0:
            raise ValueError("--max-stored-responses must be >= 0")
        if self.max_tree_size < 1 or self.discovery_refresh_s <= 0:
            raise ValueError("--max-tree-size must be >= 1, --discovery-refresh-s > 0")

    def routing(self) -> RoutingConfig:
        """The routing flags, for the router."""
        return RoutingConfig(
            self.routing_policy,
            self.cache_threshold,
            self.balance_abs_threshold,
            self.balance_rel_threshold,
            self.max_tree_size,
        )

    def _check_operations(self) -> None:
        if any(not key for key in self.admin_api_key):
            raise ValueError("--admin-api-key values must not be empty")
        if self.api_key_file is not None:
            from services.gateway.rate_limits import load_keys_file

            load_keys_file(self.api_key_file)  # raises ValueError naming what is wrong
        if self.protect_metrics and not (self.api_key or self.admin_api_key or self.api_key_file):
            raise ValueError("--protect-metrics needs an --api-key or an --admin-api-key")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("--ssl-keyfile and --ssl-certfile go together")
        for path in (self.ssl_keyfile, self.ssl_certfile):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"no such TLS file: {path}")
