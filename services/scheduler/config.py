"""Scheduler configuration: flags, their RADIXSERVE_* twins, and validation."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import option
from services.common.metrics import ServiceConfig
from services.scheduler.policy import POLICIES

# --chunked-prefill-size when it is not given: prefill tokens per step on an executor of that kind.
# On the CPU a step's time grows with its tokens from a few hundred on (the GEMMs are already at
# the cores' peak), and requests arriving meanwhile wait for the whole step, whose new requests'
# first tokens all come at its end. On the 2-core EPYC of docs/benchmarks.md ("Smaller prefill
# chunks on the CPU"), the shared-prefix workload at concurrency 16 had a TTFT p50 of 487-587 ms
# with 512 against 504-776 ms with 2048 over three alternating rounds, at the same output tok/s
# (270.9 against 269.8), and concurrency 8 and 32 the same throughput too; 256 cut the TTFT to
# 343-429 ms but the throughput to 246-253. GPUs keep SGLang's smallest default.
CPU_CHUNKED_PREFILL_SIZE = 512
CHUNKED_PREFILL_SIZE = 2048


# --num-continuous-decode-steps on a CPU executor. On the 2-vCPU AMD EPYC of docs/benchmarks.md
# ("Continuous decode steps ended by an arrival"), 4 against 1 over three alternating rounds gave
# 295.3 against 260.8 output tok/s at concurrency 8, 340.0 against 326.9 at 32, 278.3 against
# 247.0 on the shared prefixes and a TPOT p50 of 12.78 against 14.21 ms one at a time, with the
# TTFT p50 1,245 against 1,296 ms at concurrency 32, 587 against 552 on the shared prefixes and
# 907 against 807 at concurrency 8. There the gateway, tokenizer and scheduler share the
# executor's cores, and 4 halves their CPU per token. GPUs keep SGLang's 1, as does an executor
# without EndDecode (an arrival would wait out every iteration: twice the TTFT p50 at
# concurrency 32 there). On the 2-vCPU Xeon with AMX ("Eight continuous decode steps"), 8 against 4
# over three alternating rounds gave TPOT p50 15.57 against 16.83 ms one at a time, 317.4 against
# 301.2 output tok/s on the shared prefixes and 273.4 against 265.4 at concurrency 8, with 32
# level: the executor waited about 5.6 ms between one Step's forward and the next (result and Step
# over gRPC, the scheduler's turn, the executor's preparing), which 8 pays half as often. The
# price: the tokens reach the client up to 8 at a time, and a request that samples a stop token
# computes up to 7 iterations more before the scheduler sees it (the executor does not know stop
# tokens).
CPU_CONTINUOUS_DECODE_STEPS = 8
CONTINUOUS_DECODE_STEPS = 1


def default_continuous_decode_steps(device: str, end_decode: bool) -> int:
    """--num-continuous-decode-steps' default for an executor on `device` (its Info's device
    type) that implements EndDecode or not: CPU_CONTINUOUS_DECODE_STEPS on a CPU executor with
    EndDecode, else CONTINUOUS_DECODE_STEPS."""
    cpu = device == "cpu" and end_decode
    return CPU_CONTINUOUS_DECODE_STEPS if cpu else CONTINUOUS_DECODE_STEPS


def default_chunked_prefill_size(device: str) -> int:
    """--chunked-prefill-size's default for an executor on `device` (its Info's device type:
    "cpu", "cuda", ...): CPU_CHUNKED_PREFILL_SIZE on the CPU, else CHUNKED_PREFILL_SIZE."""
    return CPU_CHUNKED_PREFILL_SIZE if device == "cpu" else CHUNKED_PREFILL_SIZE


@dataclass(frozen=True)
class SchedulerConfig(ServiceConfig):
    executor: str = option("127.0.0.1:30002", "address of the executor's gRPC service")
    host: str = option("127.0.0.1", "address the gRPC server binds")
    port: int = option(30003, "gRPC port")
    max_running_requests: int | None = option(
        None, "most samples running at once (default and upper bound: the executor's table rows)"
    )
    max_queued_requests: int = option(
        4096, "most samples waiting; past it Generate fails with RESOURCE_EXHAUSTED"
    )
    chunked_prefill_size: int | None = option(
        None,
        "most prefill tokens per step; longer prompts are chunked (default: "
        f"{CPU_CHUNKED_PREFILL_SIZE} on a CPU executor, {CHUNKED_PREFILL_SIZE} on others)",
    )
    schedule_policy: str = option(
        "lpm",
        "waiting-queue order: lpm (longest cached prefix; fcfs on a long queue), fcfs, or "
        "priority (the request's priority, lowest first)",
        sorted(POLICIES),
    )
    schedule_conservativeness: float = option(
        1.0,
        "scales the reservation for running requests' future tokens (higher: fewer retractions)",
    )
    context_length: int | None = option(
        None, "longest prompt + max_tokens (default: the executor's; may only lower it)"
    )
    disable_radix_cache: bool = option(
        False, "no prefix cache: every request computes its whole prompt"
    )
    disable_overlap_schedule: bool = option(
        False, "wait for each step's result before sending the next"
    )
    num_continuous_decode_steps: int | None = option(
        None,
        "decode iterations per Step while the running requests only decode (nothing waits to be "
        "admitted, no grammar, no min_tokens ban): fewer messages per token; a request that "
        "arrives ends the step after the iteration in progress, or after its first if it has not "
        f"started (default: {CPU_CONTINUOUS_DECODE_STEPS} on a CPU executor, "
        f"{CONTINUOUS_DECODE_STEPS} on others)",
    )
    decode_log_interval: int = option(
        40,
        "decode iterations between two 'Decode batch.' lines of the log (running requests, KV "
        "usage, generation throughput), as SGLang's scheduler writes them; 0: none",
    )
    disable_jump_forward: bool = option(
        False, "with a grammar, decode every token, also those the grammar forces"
    )
    debug_checks: bool = option(
        False, "check cache and allocator integrity after every step (slow; for tests)"
    )
    executor_timeout: float = option(300.0, "seconds to wait for the executor to become ready")
    step_timeout_s: float = option(
        300.0,
        "seconds the executor may take to answer a sent step before it is treated as lost "
        "(its requests fail, the scheduler reconnects); 0 waits forever",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ValueError("--max-running-requests must be at least 1")
        if self.max_queued_requests < 0:
            raise ValueError("--max-queued-requests must be >= 0")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size < 1:
            raise ValueError("--chunked-prefill-size must be at least 1")
        if self.schedule_policy not in POLICIES:
            raise ValueError(f"--schedule-policy must be one of {sorted(POLICIES)}")
        if self.schedule_conservativeness <= 0:
            raise ValueError("--schedule-conservativeness must be > 0")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError("--context-length must be at least 2")
        if self.num_continuous_decode_steps is not None and self.num_continuous_decode_steps < 1:
            raise ValueError("--num-continuous-decode-steps must be at least 1")
        if self.decode_log_interval < 0:
            raise ValueError("--decode-log-interval must be >= 0 (0 disables it)")
        if self.step_timeout_s < 0:
            raise ValueError("--step-timeout-s must be >= 0 (0 disables it)")
