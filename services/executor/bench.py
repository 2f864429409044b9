"""`radixserve bench-executor`: decode and prefill step times of the engine, in process.

Decode steps run at fixed contexts per request (the KV of that context is sized but its values are
irrelevant to speed), in up to three cases per batch size: `greedy`; `sampled` (temperature 1,
top_p 0.9 and presence / frequency / repetition penalties, with --sampling); and
`shared-prefix GxP` (with --shared-prefix-groups G: the rows fall into G groups whose rows' table
entries point at the same KV slots for the first P positions, each row with its own tail).
Each row is printed next to two floors: the model's weight matmuls alone at the same batch size,
and the bytes a step must read (weights once, plus the KV it attends over, a shared prefix once)
over the memory bandwidth measured at start. With --enable-torch-compile decode runs on the
static-shape runner, its bucketed step compiled; untimed warm-up steps come first, so compilation
is not timed. With --quantization, each dtype is timed once per mode (int8, int4, gguf as the
executor's flag), the bandwidth floor counting the quantized weights' bytes as stored.
With --cpu-load BUSY_MS PERIOD_MS, another process spends BUSY_MS of CPU every PERIOD_MS on one
thread while the steps are timed: a stand-in for the gateway, tokenizer and scheduler that
`radixserve serve` runs on the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from kernels.cpu import linear as cpu_linear
from services.common.model_store import gguf_file, resolve_model_path
from services.executor.bench_floors import (
    bandwidth_floor_ms,
    head_floor_ms,
    linear_floor_ms,
    matmul_gflop,
    memory_bandwidth,
    weight_bytes,
)
from services.executor.config import DTYPES, KV_CACHE_DTYPES
from services.executor.decode_runner import StaticDecodeConfig
from services.executor.engine import Engine, EngineLimits
from services.executor.factory import kv_dtypes, pick_dtype, setup_cpu_process
from services.executor.kv_pool import KVPool
from services.executor.model_config import ModelConfig
from services.executor.quantization import INT4_GROUP_SIZES, QUANTIZATION_METHODS, Quantization
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, SharedPrefix, Slice, SlotWrite, StepInput
from services.executor.weights import load_model

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(
    temperature=1.0,
    top_p=0.9,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    repetition_penalty=1.1,
    seed=1,
)


@dataclass(frozen=True)
class DecodeCase:
    """What the decode rows of one measurement sample with, and how their KV is laid out:
    with `groups` > 0, rows in one group share the KV slots of their first `prefix_len` positions."""

    name: str
    params: SamplingParams
    groups: int = 0
    prefix_len: int = 0
    cascade: bool = True  # send the groups as Step.shared_prefixes (read each span once)

    @property
    def label(self) -> str:
        return f"{self.name} {self.groups}x{self.prefix_len}" if self.groups else self.name


@dataclass
class DecodeRow:
    case: str
    dtype: str
    quantization: str
    kv_cache_dtype: str
    batch: int
    context: int
    step_ms: float
    tokens_per_s: float
    matmul_floor_ms: float
    ratio_to_floor: float
    bandwidth_floor_ms: float
    ratio_to_bandwidth_floor: float
    matmul_floor_gflops: float  # the floor's operations (matmul_gflop) per second


@dataclass
class PrefillRow:
    dtype: str
    quantization: str
    kv_cache_dtype: str
    prompts: int
    prompt_len: int
    step_ms: float
    tokens_per_s: float
    matmul_floor_ms: float
    matmul_floor_gflops: float  # the floor's operations (matmul_gflop) per second
    cached_len: int = 0


def dtype_names(names: list[str], panels: bool = True) -> list[str]:
    """`--dtypes` values as torch dtype names, "auto" as the dtype `--dtype auto` serves on this
    CPU (`pick_dtype`; `panels`: no quantization and no torch.compile in any timed mode), each
    once in the order given: ["auto", "float32"] → ["float32"] on a CPU where auto is float32."""
    cpu = torch.device("cpu")
    picked = [str(pick_dtype(n, cpu, panels)).removeprefix("torch.") for n in names]
    return list(dict.fromkeys(picked))


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0; raises argparse.ArgumentTypeError otherwise."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default="default")
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=DTYPES,
        help="dtypes to time; auto is what `--dtype auto` serves on this CPU",
    )
    p.add_argument(
        "--quantization",
        nargs="+",
        default=["none"],
        choices=QUANTIZATION_METHODS,
        help="weight quantization modes to time, each with every --dtypes (see the executor's "
        "flag; gguf needs --model-path default or a .gguf file)",
    )
    p.add_argument("--quantization-group-size", type=int, default=32, choices=INT4_GROUP_SIZES)
    p.add_argument(
        "--kv-cache-dtypes",
        nargs="+",
        default=["auto"],
        choices=KV_CACHE_DTYPES,
        help="KV cache dtypes to time, each with every --dtypes (see the executor's "
        "--kv-cache-dtype; auto: the model's dtype)",
    )
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    p.add_argument(
        "--contexts",
        nargs="+",
        type=int,
        default=[256],
        help="tokens already in each request's KV; one sweep of the decode cases per value",
    )
    p.add_argument("--context", dest="contexts", type=int, nargs=1, help="one context (alias)")
    p.add_argument("--steps", type=int, default=10, help="timed decode steps per batch size")
    p.add_argument(
        "--sampling",
        action="store_true",
        help="also time a 'sampled' row per batch size: temperature 1, top_p 0.9, "
        "presence/frequency/repetition penalties",
    )
    p.add_argument(
        "--shared-prefix-groups",
        type=int,
        default=0,
        help="also time a 'shared-prefix' row: the rows in this many groups, each sharing the KV "
        "slots of its first --shared-prefix-len positions (0: off)",
    )
    p.add_argument(
        "--shared-prefix-len",
        type=int,
        default=None,
        help="positions shared within a group (default: 3/4 of the context)",
    )
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument(
        "--prefill-cached-len",
        type=non_negative_int,
        default=0,
        help="tokens of a prefix that every prefill prompt shares and whose KV is already "
        "computed, as after a radix-cache hit: the timed step computes only the --prefill-len "
        "tokens after it (0: none)",
    )
    p.add_argument("--prefill-prompts", nargs="+", type=int, default=[1, 4])
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument(
        "--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth read test"
    )
    p.add_argument(
        "--enable-torch-compile",
        action="store_true",
        help="decode on the static-shape runner with its bucketed step torch.compile'd",
    )
    p.add_argument("--cuda-graph-max-bs", type=int, default=32, help="largest static decode bucket")
    p.add_argument(
        "--enable-deterministic-inference",
        action="store_true",
        help="time the batch-invariant engine (tiled matmuls, per-token attention, row-by-row "
        "sampling) that the executor's flag of the same name runs",
    )
    p.add_argument(
        "--cpu-load",
        type=float,
        nargs=2,
        metavar=("BUSY_MS", "PERIOD_MS"),
        default=None,
        help="while the model loads and its steps are timed, another process spends BUSY_MS of CPU "
        "every PERIOD_MS on one thread (what the other services of `radixserve serve` take from "
        "the cores)",
    )
    p.add_argument("--json", default=None, help="also write the results to this file")


WARMUP_STEPS = 2


def _engine(
    model: nn.Module,
    cfg: ModelConfig,
    slots: int,
    rows: int,
    ctx: int,
    static: StaticDecodeConfig | None = None,
    deterministic: bool = False,
    kv_dtype: torch.dtype | None = None,
) -> Engine:
    limits = EngineLimits(slots, rows, ctx, kv_dtype=kv_dtype)
    return Engine(
        model, cfg, limits, torch.device("cpu"), static_decode=static, deterministic=deterministic
    )


def slot_writes(case: DecodeCase, batch: int, span: int) -> tuple[list[SlotWrite], int]:
    """Each row's table entries for positions 0..span-1, and the number of slots they use.
    Rows r of a shared-prefix case fall into contiguous groups (r * groups // batch); a group's
    rows point at the same slots for their first `prefix_len` positions."""
    groups, prefix = min(case.groups, batch), case.prefix_len if case.groups else 0
    shared, own = groups * prefix, span - prefix
    writes = []
    for r in range(batch):
        g = r * groups // batch if groups else 0
        head = list(range(1 + g * prefix, 1 + (g + 1) * prefix))
        tail = list(range(1 + shared + r * own, 1 + shared + (r + 1) * own))
        writes.append(SlotWrite(r, 0, head + tail))
    return writes, shared + batch * own


def shared_spans(case: DecodeCase, batch: int) -> list[SharedPrefix]:
    """The groups of `slot_writes` as Step.shared_prefixes (none for a plain case)."""
    groups = min(case.groups, batch)
    if not (case.cascade and groups and case.prefix_len):
        return []
    members: list[list[int]] = [[] for _ in range(groups)]
    for r in range(batch):
        members[r * groups // batch].append(r)
    return [SharedPrefix(case.prefix_len, rows) for rows in members if len(rows) > 1]


def kv_positions(batch: int, context: int, spans: list[SharedPrefix]) -> int:
    """KV positions a decode step over `batch` rows at `context` reads: each of `spans` (those
    the attention backend attends once per group) once, every other position once per row."""
    return batch * context - sum((len(s.rows) - 1) * s.length for s in spans)


@dataclass(frozen=True)
class DecodeTiming:
    ms: float  # median decode step time
    kv_positions: int  # KV positions each step read (see kv_positions)


def bench_decode(
    model: nn.Module,
    cfg: ModelConfig,
    batch: int,
    context: int,
    steps: int,
    static: StaticDecodeConfig | None = None,
    case: DecodeCase = DecodeCase("greedy", GREEDY),
    deterministic: bool = False,
    kv_dtype: torch.dtype | None = None,
) -> DecodeTiming:
    """Median decode step time (ms) with `batch` requests at `context` tokens each, after
    WARMUP_STEPS untimed steps (which compile the static step when there is one); the KV pool in
    `kv_dtype` (None: the model's). The KV positions count the case's spans once only where the
    attention backend keeps them (`Engine._spans`)."""
    span = context + WARMUP_STEPS + steps + 2
    writes, num_slots = slot_writes(case, batch, span)
    engine = _engine(model, cfg, num_slots, batch, span, static, deterministic, kv_dtype)
    spans = shared_spans(case, batch)
    first = StepInput(
        1,
        add=[NewRequest(r, f"b{r}", case.params, [r % cfg.vocab_size]) for r in range(batch)],
        writes=writes,
        slices=[Slice(r, context, [r % cfg.vocab_size]) for r in range(batch)],
        shared_prefixes=spans,
    )
    engine.run_step(first)
    times = []
    for i in range(WARMUP_STEPS + steps):
        step = StepInput(
            2 + i,
            slices=[Slice(r, context + 1 + i, [], True) for r in range(batch)],
            shared_prefixes=spans,
        )
        start = time.perf_counter()
        engine.run_step(step)
        times.append(time.perf_counter() - start)
    kept = engine._spans(step)
    return DecodeTiming(
        statistics.median(times[WARMUP_STEPS:]) * 1e3, kv_positions(batch, context, kept)
    )


def bench_prefill(
    model: nn.Module,
    cfg: ModelConfig,
    prompts: int,
    length: int,
    deterministic: bool = False,
    kv_dtype: torch.dtype | None = None,
    cached: int = 0,
) -> float:
    """Time (ms) of the faster of two prefills of `prompts` random prompts of `length` tokens.

    With `cached` > 0 the prompts share a prefix of that many tokens, pointed at by every row's
    table as the scheduler does after a radix-cache hit and computed (row 0's) by an untimed step
    before each timed one, which computes each prompt's `length` tokens after it."""
    slots = cached + prompts * length + 1
    engine = _engine(model, cfg, slots, prompts, cached + length + 1, None, deterministic, kv_dtype)
    greedy = SamplingParams(temperature=0.0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (prompts, length), generator=gen).tolist()
    prefix = torch.randint(0, cfg.vocab_size, (cached,), generator=gen).tolist()
    shared, first = list(range(1, 1 + cached)), 1 + cached
    writes = [
        SlotWrite(r, 0, shared + list(range(first + r * length, first + (r + 1) * length)))
        for r in range(prompts)
    ]
    times = []
    step_id = 0
    for rep in range(2):
        membership = {
            "release_rows": list(range(prompts)) if rep else [],
            "add": [NewRequest(r, f"p{r}", greedy) for r in range(prompts)],
            "writes": writes,
        }
        if cached:
            step_id += 1
            engine.run_step(StepInput(step_id, **membership, slices=[Slice(0, 0, prefix)]))
            membership = {}
        step_id += 1
        step = StepInput(
            step_id, **membership, slices=[Slice(r, cached, ids[r]) for r in range(prompts)]
        )
        start = time.perf_counter()
        engine.run_step(step)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


@dataclass(frozen=True)
class Floors:
    """What the floors of one model need: its weight bytes, KV bytes per token and the machine's
    memory bandwidth (bytes/s)."""

    weight_bytes: int
    kv_bytes_per_token: int
    bandwidth: float

    def bandwidth_ms(self, kv_tokens: int) -> float:
        return bandwidth_floor_ms(
            self.weight_bytes + kv_tokens * self.kv_bytes_per_token, self.bandwidth
        )


def decode_cases(args: argparse.Namespace, context: int) -> list[DecodeCase]:
    cases = [DecodeCase("greedy", GREEDY)]
    if args.sampling:
        cases.append(DecodeCase("sampled", SAMPLED))
    if args.shared_prefix_groups > 0:
        prefix = args.shared_prefix_len if args.shared_prefix_len is not None else context * 3 // 4
        prefix = max(0, min(prefix, context))
        groups = args.shared_prefix_groups
        cases.append(DecodeCase("shared-prefix", GREEDY, groups, prefix))
        cases.append(DecodeCase("shared-prefix-plain", GREEDY, groups, prefix, cascade=False))
    return cases


def max_positions(args: argparse.Namespace) -> int:
    """Positions the model (RoPE tables) must cover: the longest decode span and the prefill."""
    prefill = args.prefill_cached_len + args.prefill_len + 1
    return max(max(args.contexts) + WARMUP_STEPS + args.steps + 2, prefill)


# The --cpu-load process: spends `busy` seconds of its thread's CPU time, sleeps out the rest of
# each `period`, until it is stopped or its parent is gone.
_LOAD_LOOP = """
import os, sys, time
busy, period = float(sys.argv[1]), float(sys.argv[2])
parent = os.getppid()
while os.getppid() == parent:
    start, cpu = time.monotonic(), time.thread_time()
    while time.thread_time() - cpu < busy:
        pass
    time.sleep(max(0.0, period - (time.monotonic() - start)))
"""


@dataclass
class CpuLoad:
    """A process started by `cpu_load` (`pid`); `cpu_s` is the CPU time it used (seconds), once
    stopped and reaped."""

    busy_ms: float
    period_ms: float
    pid: int
    cpu_s: float = 0.0


def check_cpu_load(busy_ms: float, period_ms: float) -> None:
    """Raises ValueError unless 0 < busy_ms < period_ms (milliseconds), both finite."""
    if not (0 < busy_ms < period_ms and math.isfinite(period_ms)):
        raise ValueError(f"--cpu-load needs 0 < BUSY_MS < PERIOD_MS, got {busy_ms:g} {period_ms:g}")


@contextlib.contextmanager
def cpu_load(busy_ms: float, period_ms: float) -> Iterator[CpuLoad]:
    """Runs a process that spends `busy_ms` of CPU every `period_ms` (one thread) while the block
    runs, then stops and reaps it, recording its CPU time (user + system, from wait4) in the
    yielded CpuLoad. The process runs in a session of its own, so a Ctrl-C reaches only this
    one. Raises ValueError unless 0 < busy_ms < period_ms (finite), OSError if the process
    cannot start."""
    check_cpu_load(busy_ms, period_ms)
    argv = [sys.executable, "-c", _LOAD_LOOP, str(busy_ms / 1e3), str(period_ms / 1e3)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    load = CpuLoad(busy_ms, period_ms, proc.pid)
    try:
        yield load
    finally:
        # Unreaped until wait4 below, so the pid is still this child's even if it has exited.
        os.kill(proc.pid, signal.SIGKILL)
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = -signal.SIGKILL  # reaped here: Popen must not wait for it again
        load.cpu_s = usage.ru_utime + usage.ru_stime


def run(args: argparse.Namespace) -> dict[str, object]:
    """Runs the bench of `args` (add_arguments' flags), printing each row as it is timed; the
    results as the JSON of --json. Raises SystemExit on flags that do not go together or a
    --cpu-load out of range."""
    threads = setup_cpu_process(args.num_threads)
    path = resolve_model_path(args.model_path)
    cfg = ModelConfig.from_dir(path)
    static = None
    if args.enable_torch_compile and args.enable_deterministic_inference:
        raise SystemExit(
            "--enable-deterministic-inference runs decode eagerly: drop --enable-torch-compile"
        )
    if args.cpu_load is not None:
        try:
            check_cpu_load(*args.cpu_load)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    if args.enable_torch_compile:
        static = StaticDecodeConfig(args.cuda_graph_max_bs, cuda_graph=False, torch_compile=True)
    contexts = ", ".join(str(c) for c in args.contexts)
    print(f"model {path.name}, {threads} threads, decode contexts {contexts}", flush=True)
    print(f"decode mode: {_mode(static, args.batch_sizes)}", flush=True)
    if args.enable_deterministic_inference:
        print(
            "deterministic inference: batch-invariant matmuls, attention and sampling", flush=True
        )
    bandwidth = memory_bandwidth(args.bandwidth_gib)
    print(
        f"memory bandwidth {bandwidth / 1e9:.1f} GB/s (sum over {args.bandwidth_gib:g} GiB, median of 5)",
        flush=True,
    )
    peak = cpu_linear.bf16_dot_peak()
    if peak is not None:
        print(
            f"bfloat16 dot-product peak {peak:.0f} GFLOP/s ({threads} threads, vdpbf16ps)",
            flush=True,
        )
    decode, prefill = [], []
    started = time.monotonic()
    loaded = contextlib.nullcontext() if args.cpu_load is None else cpu_load(*args.cpu_load)
    with loaded as load:
        if load is not None:
            print(
                f"background load: {load.busy_ms:g} ms of CPU every {load.period_ms:g} ms "
                f"on one thread of another process",
                flush=True,
            )
        panels = not args.enable_torch_compile and all(m == "none" for m in args.quantization)
        for dtype_name in dtype_names(args.dtypes, panels):
            for mode in args.quantization:
                rows = _bench_model(args, path, cfg, static, bandwidth, dtype_name, mode)
                decode += rows[0]
                prefill += rows[1]
    if load is not None:
        wall = time.monotonic() - started
        print(f"background load used {load.cpu_s:.1f} s of CPU in {wall:.1f} s", flush=True)
    return {
        "memory_bandwidth_bytes_per_s": bandwidth,
        "bf16_dot_peak_gflops": peak,
        "cpu_load_ms": args.cpu_load,
        "cpu_load_cpu_s": None if load is None else load.cpu_s,
        "decode": [asdict(r) for r in decode],
        "prefill": [asdict(r) for r in prefill],
    }


def _bench_model(
    args: argparse.Namespace,
    path: Path,
    cfg: ModelConfig,
    static: StaticDecodeConfig | None,
    bandwidth: float,
    dtype_name: str,
    mode: str,
) -> tuple[list[DecodeRow], list[PrefillRow]]:
    """The decode and prefill rows of one model load (`dtype_name`, quantization `mode`)."""
    dtype = getattr(torch, dtype_name)
    gguf = gguf_file(args.model_path) if mode == "gguf" else None
    quant = Quantization(mode, args.quantization_group_size, gguf)
    # torch.compile cannot trace oneDNN's packed weights: the executor keeps them plain too.
    prepack = not args.enable_torch_compile
    model = load_model(
        path, cfg, max_positions(args), dtype, torch.device("cpu"), prepack, quantization=quant
    )
    megabytes = weight_bytes(model) / 1e6
    print(f"{dtype_name}, {quant.label} weights: {megabytes:.1f} MB read per step", flush=True)
    bench_decode(model, cfg, 1, 16, 2, deterministic=args.enable_deterministic_inference)
    decode, prefill = [], []
    for kv_dtype in kv_dtypes(args.kv_cache_dtypes, dtype):
        kv_bytes = KVPool.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype)
        floors = Floors(weight_bytes(model), kv_bytes, bandwidth)
        kv_name = str(kv_dtype).removeprefix("torch.")
        for context in args.contexts:
            for case in decode_cases(args, context):
                for bs in args.batch_sizes:
                    row = _decode_row(
                        model, cfg, args, static, floors, case, bs, context, dtype_name, kv_dtype
                    )
                    decode.append(replace(row, quantization=mode, kv_cache_dtype=kv_name))
                    print(_fmt_decode(decode[-1]), flush=True)
        for n in args.prefill_prompts:
            prefill.append(_prefill_row(model, cfg, args, n, dtype_name, mode, kv_dtype))
            print(_fmt_prefill(prefill[-1]), flush=True)
    return decode, prefill


def _decode_row(
    model: nn.Module,
    cfg: ModelConfig,
    args: argparse.Namespace,
    static: StaticDecodeConfig | None,
    floors: Floors,
    case: DecodeCase,
    bs: int,
    context: int,
    dtype_name: str,
    kv_dtype: torch.dtype,
) -> DecodeRow:
    deterministic = args.enable_deterministic_inference
    timing = bench_decode(
        model, cfg, bs, context, args.steps, static, case, deterministic, kv_dtype
    )
    ms = timing.ms
    floor = linear_floor_ms(model, bs) + head_floor_ms(model, bs)
    bw_floor = floors.bandwidth_ms(timing.kv_positions)
    return DecodeRow(
        case.label,
        dtype_name,
        "none",
        dtype_name,
        bs,
        context,
        ms,
        bs / ms * 1e3,
        floor,
        ms / floor,
        bw_floor,
        ms / bw_floor,
        matmul_gflop(model, bs, bs) / floor * 1e3,
    )


def _prefill_row(
    model: nn.Module,
    cfg: ModelConfig,
    args: argparse.Namespace,
    n: int,
    dtype_name: str,
    mode: str,
    kv_dtype: torch.dtype,
) -> PrefillRow:
    length, cached = args.prefill_len, args.prefill_cached_len
    ms = bench_prefill(model, cfg, n, length, args.enable_deterministic_inference, kv_dtype, cached)
    floor = linear_floor_ms(model, n * length, repeats=2) + head_floor_ms(model, n)
    kv_name = str(kv_dtype).removeprefix("torch.")
    gflops = matmul_gflop(model, n * length, n) / floor * 1e3
    return PrefillRow(
        dtype_name, mode, kv_name, n, length, ms, n * length / ms * 1e3, floor, gflops, cached
    )


def _mode(static: StaticDecodeConfig | None, batch_sizes: list[int]) -> str:
    if static is None:
        return "eager"
    over = [bs for bs in batch_sizes if bs > static.max_bs]
    tail = f"; batches {over} above --cuda-graph-max-bs run eagerly" if over else ""
    return f"static buckets up to {static.max_bs}, torch.compile (dynamic=False){tail}"


def _quant(mode: str) -> str:
    return "" if mode == "none" else f"{mode:5s} "


def _kv(row: DecodeRow | PrefillRow) -> str:
    return "" if row.kv_cache_dtype == row.dtype else f"kv {row.kv_cache_dtype:11s} "


def _fmt_decode(r: DecodeRow) -> str:
    return (
        f"decode  {r.dtype:9s} {_quant(r.quantization)}{_kv(r)}{r.case:22s} ctx {r.context:5d} batch {r.batch:3d}: "
        f"{r.step_ms:8.1f} ms/step {r.tokens_per_s:8.1f} tok/s"
        f"   matmul floor {r.matmul_floor_ms:7.1f} ms ({r.ratio_to_floor:.2f}x,"
        f" {r.matmul_floor_gflops:4.0f} GFLOP/s)"
        f"   bandwidth floor {r.bandwidth_floor_ms:7.2f} ms ({r.ratio_to_bandwidth_floor:.2f}x)"
    )


def _fmt_prefill(r: PrefillRow) -> str:
    return (
        f"prefill {r.dtype:9s} {_quant(r.quantization)}{_kv(r)}{r.prompts} x {r.prompt_len}"
        f"{f' after {r.cached_len} cached' if r.cached_len else ''}: {r.step_ms:8.1f} ms "
        f"{r.tokens_per_s:8.1f} tok/s   matmul floor {r.matmul_floor_ms:7.1f} ms"
        f" ({r.matmul_floor_gflops:4.0f} GFLOP/s)"
    )


def main(args: argparse.Namespace) -> None:
    with torch.inference_mode():
        results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
