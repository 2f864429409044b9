"""Benchmarks of each kernel against its PyTorch reference, in the shape of Triton's tutorials.

    python -m kernels.bench                      # every kernel
    python -m kernels.bench rmsnorm rope         # some of them
    python -m kernels.bench --save-path out/     # also write CSV tables and PNG plots

Needs a CUDA device (and pandas + matplotlib, which triton.testing.perf_report draws with). On a
machine without one it refuses: timings of Triton's CPU interpreter say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from collections.abc import Callable

import torch
import triton

from kernels.cpu.linear import pack_int4
from kernels.decode_attention import decode_attention, decode_attention_ref
from kernels.extend_attention import extend_attention, extend_attention_ref
from kernels.kv_store import store_kv, store_kv_ref
from kernels.quant_matmul import int4_linear, int4_linear_ref, int8_linear, int8_linear_ref
from kernels.rmsnorm import rmsnorm, rmsnorm_ref
from kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin
from kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

NO_CUDA = "kernels.bench needs a CUDA device; interpreter timings are meaningless"
NO_PLOTTING = "kernels.bench needs pandas and matplotlib (used by triton.testing.perf_report)"
DEVICE = "cuda"
DTYPE = torch.bfloat16
QUANTILES = [0.5, 0.2, 0.8]
TOKENS = [2**i for i in range(4, 15)]  # 16 .. 16384
# Llama-3-8B-like shapes
HIDDEN, INTERMEDIATE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128


def _benchmark(
    x_name: str, x_vals: list[int], ylabel: str, plot_name: str
) -> triton.testing.Benchmark:
    return triton.testing.Benchmark(
        x_names=[x_name],
        x_vals=x_vals,
        line_arg="provider",
        line_vals=["triton", "torch"],
        line_names=["Triton", "Torch"],
        styles=[("blue", "-"), ("green", "-")],
        ylabel=ylabel,
        plot_name=plot_name,
        args={},
    )


def _time(fn: Callable[[], object], per_ms: Callable[[float], float]) -> tuple[float, float, float]:
    """Median, then the slow and fast quantiles, each through `per_ms` (ms -> GB/s or TFLOP/s)."""
    ms, min_ms, max_ms = triton.testing.do_bench(fn, quantiles=QUANTILES)
    return per_ms(ms), per_ms(max_ms), per_ms(min_ms)


def _gbps(nbytes: int) -> Callable[[float], float]:
    return lambda ms: nbytes * 1e-9 / (ms * 1e-3)


@triton.testing.perf_report(_benchmark("num_tokens", TOKENS, "GB/s", "rmsnorm-residual"))
def bench_rmsnorm(num_tokens: int, provider: str) -> tuple[float, float, float]:
    x = torch.randn(num_tokens, HIDDEN, device=DEVICE, dtype=DTYPE)
    residual, weight = torch.randn_like(x), torch.ones(HIDDEN, device=DEVICE, dtype=DTYPE)
    fn = rmsnorm if provider == "triton" else rmsnorm_ref
    # reads x, residual, weight; writes out, residual
    return _time(lambda: fn(x, weight, 1e-6, residual), _gbps(4 * x.numel() * x.element_size()))


@triton.testing.perf_report(_benchmark("num_tokens", TOKENS, "GB/s", "silu-and-mul"))
def bench_silu_and_mul(num_tokens: int, provider: str) -> tuple[float, float, float]:
    x = torch.randn(num_tokens, 2 * INTERMEDIATE, device=DEVICE, dtype=DTYPE)
    fn = silu_and_mul if provider == "triton" else silu_and_mul_ref
    return _time(lambda: fn(x), _gbps(3 * x.numel() // 2 * x.element_size()))


@triton.testing.perf_report(_benchmark("num_tokens", TOKENS, "GB/s", "rope"))
def bench_rope(num_tokens: int, provider: str) -> tuple[float, float, float]:
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM)
    cos, sin = rope_cos_sin(inv_freq, 8192)
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    positions = torch.randint(0, 8192, (num_tokens,), device=DEVICE)
    fn = apply_rope if provider == "triton" else apply_rope_ref
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()  # read and write q, k
    return _time(lambda: fn(q, k, positions, cos, sin), _gbps(nbytes))


@triton.testing.perf_report(_benchmark("num_tokens", TOKENS, "GB/s", "kv-store"))
def bench_kv_store(num_tokens: int, provider: str) -> tuple[float, float, float]:
    k, v = torch.randn(2, num_tokens, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k_buffer, v_buffer = torch.zeros(
        2, 4 * num_tokens + 1, *k.shape[1:], device=DEVICE, dtype=DTYPE
    )
    loc = torch.randperm(4 * num_tokens, device=DEVICE)[:num_tokens] + 1
    fn = store_kv if provider == "triton" else store_kv_ref
    nbytes = 4 * k.numel() * k.element_size()  # read k, v; write their slots
    return _time(lambda: fn(k, v, k_buffer, v_buffer, loc), _gbps(nbytes))


def _kv_pool(seq_lens: list[int]) -> tuple[torch.Tensor, ...]:
    """(k_buffer, v_buffer, req_to_token, req_rows) with the tokens at random slots."""
    total = sum(seq_lens)
    k_buffer, v_buffer = torch.randn(
        2, total + 1, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE
    )
    slots = (torch.randperm(total, device=DEVICE) + 1).to(torch.int32)
    req_to_token = torch.zeros(len(seq_lens), max(seq_lens), dtype=torch.int32, device=DEVICE)
    for row, chunk in enumerate(slots.split(seq_lens)):
        req_to_token[row, : len(chunk)] = chunk
    req_rows = torch.arange(len(seq_lens), dtype=torch.int32, device=DEVICE)
    return k_buffer, v_buffer, req_to_token, req_rows


@triton.testing.perf_report(
    _benchmark("seq_len", [2**i for i in range(8, 15)], "GB/s", "decode-attention-batch16")
)
def bench_decode_attention(seq_len: int, provider: str) -> tuple[float, float, float]:
    batch = 16
    pool = _kv_pool([seq_len] * batch)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=DEVICE)
    args = (q, *pool, seq_lens, 1 / math.sqrt(HEAD_DIM))
    fn = decode_attention if provider == "triton" else decode_attention_ref
    nbytes = 2 * batch * seq_len * NUM_KV_HEADS * HEAD_DIM * q.element_size()  # K and V
    return _time(lambda: fn(*args), _gbps(nbytes))


@triton.testing.perf_report(
    _benchmark("extend_len", [2**i for i in range(7, 11)], "TFLOP/s", "extend-attention-batch4")
)
def bench_extend_attention(extend_len: int, provider: str) -> tuple[float, float, float]:
    batch, prefix_len = 4, extend_len  # half of each context is a cached prefix
    pool = _kv_pool([prefix_len + extend_len] * batch)
    q = torch.randn(batch * extend_len, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    lens = [torch.full((batch,), n, device=DEVICE) for n in (prefix_len, extend_len)]
    qo_start = torch.arange(batch, device=DEVICE) * extend_len
    args = (q, *pool, *lens, qo_start, 1 / math.sqrt(HEAD_DIM))
    fn = extend_attention if provider == "triton" else extend_attention_ref
    # QK^T and PV over the causal part: each new token sees prefix_len + its index + 1 keys
    keys_seen = batch * (extend_len * prefix_len + extend_len * (extend_len + 1) // 2)
    flops = 4 * keys_seen * NUM_HEADS * HEAD_DIM
    return _time(lambda: fn(*args), lambda ms: flops * 1e-12 / (ms * 1e-3))


ROWS = [2**i for i in range(0, 11)]  # 1 .. 1024 rows of a weight-only quantized linear layer


@triton.testing.perf_report(_benchmark("rows", ROWS, "GB/s", "int8-linear-down-proj"))
def bench_int8_linear(rows: int, provider: str) -> tuple[float, float, float]:
    n, k = HIDDEN, INTERMEDIATE  # down_proj
    x = torch.randn(rows, k, device=DEVICE, dtype=DTYPE)
    q = torch.randint(-127, 128, (n, k), device=DEVICE, dtype=torch.int8)
    scale = torch.rand(n, device=DEVICE, dtype=DTYPE) / 1000
    fn = int8_linear if provider == "triton" else int8_linear_ref
    nbytes = q.numel() + (x.numel() + rows * n) * x.element_size()  # q, x read; out written
    return _time(lambda: fn(x, q, scale, None), _gbps(nbytes))


@triton.testing.perf_report(_benchmark("rows", ROWS, "GB/s", "int4-linear-g128-down-proj"))
def bench_int4_linear(rows: int, provider: str) -> tuple[float, float, float]:
    n, k, group = HIDDEN, INTERMEDIATE, 128
    x = torch.randn(rows, k, device=DEVICE, dtype=DTYPE)
    q = pack_int4(torch.randint(0, 16, (n, k), device=DEVICE))
    scale = torch.rand(n, k // group, device=DEVICE, dtype=DTYPE) / 1000
    zero = torch.randn(n, k // group, device=DEVICE, dtype=DTYPE) / 1000
    fn = int4_linear if provider == "triton" else int4_linear_ref
    nbytes = q.numel() + 2 * scale.numel() * 2 + (x.numel() + rows * n) * x.element_size()
    return _time(lambda: fn(x, q, scale, zero, group, None), _gbps(nbytes))


BENCHMARKS = {
    "rmsnorm": bench_rmsnorm,
    "silu_and_mul": bench_silu_and_mul,
    "rope": bench_rope,
    "kv_store": bench_kv_store,
    "decode_attention": bench_decode_attention,
    "extend_attention": bench_extend_attention,
    "int8_linear": bench_int8_linear,
    "int4_linear": bench_int4_linear,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "kernels", nargs="*", metavar="KERNEL", help=f"any of {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--save-path", default="", help="directory for CSV tables and PNG plots")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.kernels) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown kernels {unknown}; choose from {list(BENCHMARKS)}")
    interpreted = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
    if not torch.cuda.is_available() or interpreted:
        print(NO_CUDA, file=sys.stderr)
        return 1
    if not all(importlib.util.find_spec(name) for name in ("pandas", "matplotlib")):
        print(NO_PLOTTING, file=sys.stderr)
        return 1
    for name in args.kernels or BENCHMARKS:
        BENCHMARKS[name].run(print_data=True, save_path=args.save_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
