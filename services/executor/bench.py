"""`radixserve bench-executor`: decode and prefill step times of the engine, in process.

Decode steps run at a fixed context per request (the KV of that context is sized but its values are
irrelevant to speed), next to the floor: the model's weight matmuls alone at the same batch size.
With --enable-torch-compile decode runs on the static-shape runner, its bucketed step compiled;
untimed warm-up steps come first, so compilation is not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.common.model_store import resolve_model_path
from services.executor.decode_runner import StaticDecodeConfig
from services.executor.engine import Engine, EngineLimits
from services.executor.factory import set_threads
from services.executor.model_config import ModelConfig
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput
from services.executor.weights import load_model


@dataclass
class DecodeRow:
    dtype: str
    batch: int
    step_ms: float
    tokens_per_s: float
    matmul_floor_ms: float
    ratio_to_floor: float


@dataclass
class PrefillRow:
    dtype: str
    prompts: int
    prompt_len: int
    step_ms: float
    tokens_per_s: float
    matmul_floor_ms: float


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default="default")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    p.add_argument("--context", type=int, default=256, help="tokens already in each request's KV")
    p.add_argument("--steps", type=int, default=10, help="timed decode steps per batch size")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prefill-prompts", nargs="+", type=int, default=[1, 4])
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument(
        "--enable-torch-compile",
        action="store_true",
        help="decode on the static-shape runner with its bucketed step torch.compile'd",
    )
    p.add_argument("--cuda-graph-max-bs", type=int, default=32, help="largest static decode bucket")
    p.add_argument("--json", default=None, help="also write the results to this file")


def linear_floor_ms(model: nn.Module, tokens: int, repeats: int = 5) -> float:
    """Median time of every weight matmul of one forward over `tokens` rows (lm_head: 1 row
    per sequence is not assumed; the caller passes how many rows reach the head separately)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head]
    inputs = {
        m.in_features: torch.randn(tokens, m.in_features, dtype=m.weight.dtype) for m in linears
    }
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for m in linears:
            F.linear(inputs[m.in_features], m.weight, m.bias)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def head_floor_ms(model: nn.Module, rows: int, repeats: int = 5) -> float:
    head = model.lm_head
    x = torch.randn(rows, head.in_features, dtype=head.weight.dtype)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        F.linear(x, head.weight)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


WARMUP_STEPS = 2


def _engine(
    model: nn.Module,
    cfg: ModelConfig,
    slots: int,
    rows: int,
    ctx: int,
    static: StaticDecodeConfig | None = None,
) -> Engine:
    limits = EngineLimits(slots, rows, ctx)
    return Engine(model, cfg, limits, torch.device("cpu"), static_decode=static)


def bench_decode(
    model: nn.Module,
    cfg: ModelConfig,
    batch: int,
    context: int,
    steps: int,
    static: StaticDecodeConfig | None = None,
) -> float:
    """Median decode step time (ms) with `batch` requests at `context` tokens each, after
    WARMUP_STEPS untimed steps (which compile the static step when there is one)."""
    span = context + WARMUP_STEPS + steps + 2
    engine = _engine(model, cfg, batch * span, batch, span, static)
    greedy = SamplingParams(temperature=0.0)
    first = StepInput(
        1,
        add=[NewRequest(r, f"b{r}", greedy) for r in range(batch)],
        writes=[
            SlotWrite(r, 0, list(range(1 + r * span, 1 + (r + 1) * span))) for r in range(batch)
        ],
        slices=[Slice(r, context, [r % cfg.vocab_size]) for r in range(batch)],
    )
    engine.run_step(first)
    times = []
    for i in range(WARMUP_STEPS + steps):
        step = StepInput(2 + i, slices=[Slice(r, context + 1 + i, [], True) for r in range(batch)])
        start = time.perf_counter()
        engine.run_step(step)
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP_STEPS:]) * 1e3


def bench_prefill(model: nn.Module, cfg: ModelConfig, prompts: int, length: int) -> float:
    engine = _engine(model, cfg, prompts * length + 1, prompts, length + 1)
    greedy = SamplingParams(temperature=0.0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (prompts, length), generator=gen).tolist()
    times = []
    for rep in range(2):
        step = StepInput(
            rep + 1,
            release_rows=list(range(prompts)) if rep else [],
            add=[NewRequest(r, f"p{r}", greedy) for r in range(prompts)],
            writes=[
                SlotWrite(r, 0, list(range(1 + r * length, 1 + (r + 1) * length)))
                for r in range(prompts)
            ],
            slices=[Slice(r, 0, ids[r]) for r in range(prompts)],
        )
        start = time.perf_counter()
        engine.run_step(step)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def run(args: argparse.Namespace) -> dict[str, list[dict]]:
    threads = set_threads(args.num_threads)
    path = resolve_model_path(args.model_path)
    cfg = ModelConfig.from_dir(path)
    ctx = max(args.context + args.steps + 2, args.prefill_len + 1)
    static = None
    if args.enable_torch_compile:
        static = StaticDecodeConfig(args.cuda_graph_max_bs, cuda_graph=False, torch_compile=True)
    print(f"model {path.name}, {threads} threads, decode context {args.context}", flush=True)
    print(f"decode mode: {_mode(static, args.batch_sizes)}", flush=True)
    decode, prefill = [], []
    for dtype_name in args.dtypes:
        model = load_model(path, cfg, ctx, getattr(torch, dtype_name), torch.device("cpu"))
        bench_decode(model, cfg, 1, 16, 2)  # warm-up
        for bs in args.batch_sizes:
            ms = bench_decode(model, cfg, bs, args.context, args.steps, static)
            floor = linear_floor_ms(model, bs) + head_floor_ms(model, bs)
            decode.append(DecodeRow(dtype_name, bs, ms, bs / ms * 1e3, floor, ms / floor))
            print(_fmt_decode(decode[-1]), flush=True)
        for n in args.prefill_prompts:
            ms = bench_prefill(model, cfg, n, args.prefill_len)
            floor = linear_floor_ms(model, n * args.prefill_len, repeats=2) + head_floor_ms(
                model, n
            )
            tokens = n * args.prefill_len
            prefill.append(
                PrefillRow(dtype_name, n, args.prefill_len, ms, tokens / ms * 1e3, floor)
            )
            print(_fmt_prefill(prefill[-1]), flush=True)
    return {"decode": [asdict(r) for r in decode], "prefill": [asdict(r) for r in prefill]}


def _mode(static: StaticDecodeConfig | None, batch_sizes: list[int]) -> str:
    if static is None:
        return "eager"
    over = [bs for bs in batch_sizes if bs > static.max_bs]
    tail = f"; batches {over} above --cuda-graph-max-bs run eagerly" if over else ""
    return f"static buckets up to {static.max_bs}, torch.compile (dynamic=False){tail}"


def _fmt_decode(r: DecodeRow) -> str:
    return (
        f"decode  {r.dtype:9s} batch {r.batch:3d}: {r.step_ms:8.1f} ms/step {r.tokens_per_s:8.1f} tok/s"
        f"   matmul floor {r.matmul_floor_ms:7.1f} ms  ({r.ratio_to_floor:.2f}x)"
    )


def _fmt_prefill(r: PrefillRow) -> str:
    return (
        f"prefill {r.dtype:9s} {r.prompts} x {r.prompt_len}: {r.step_ms:8.1f} ms "
        f"{r.tokens_per_s:8.1f} tok/s   matmul floor {r.matmul_floor_ms:7.1f} ms"
    )


def main(args: argparse.Namespace) -> None:
    with torch.inference_mode():
        results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
