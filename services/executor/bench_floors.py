"""Lower bounds a step time is compared with in `radixserve bench-executor`.

- matmul floor: the model's weight matmuls alone at the step's shapes, timed.
- bandwidth floor: the bytes a step must read (every weight once, plus the KV cache it attends
  over) divided by the memory bandwidth measured at start by reading one large tensor.

Beside them, `radixserve bench-executor` prints the machine's bfloat16 dot-product rate
(`kernels/cpu/linear.bf16_dot_peak`), the ceiling of the matmul floor on CPUs with AVX-512 BF16:
where the matmul floor's rate (`matmul_gflop` over its time) comes near it, the linears are
compute-bound.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from services.executor.packed_linear import FLOAT_LINEARS
from services.executor.quantization import QUANTIZED_LINEARS, quantized_bytes


def _linears(model: nn.Module) -> list[nn.Module]:
    """Every weight matmul as the engine runs it: `nn.Linear`, its oneDNN-packed twin or a
    quantized one."""
    kinds = (*FLOAT_LINEARS, *QUANTIZED_LINEARS)
    return [m for m in model.modules() if isinstance(m, kinds)]


def _body_linears(model: nn.Module) -> list[nn.Module]:
    """`_linears` without the LM head (nor its inner layer, when wrapped)."""
    head = set(model.lm_head.modules())
    return [m for m in _linears(model) if m not in head]


def _head_layer(model: nn.Module) -> nn.Module:
    """The LM head's layer: its inner one when wrapped under deterministic inference."""
    return getattr(model.lm_head, "inner", model.lm_head)


def _dtype(model: nn.Module) -> torch.dtype:
    """The activations' dtype: the embedding's (linear weights may be packed or quantized)."""
    return next(model.parameters()).dtype


def _time_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def linear_floor_ms(model: nn.Module, tokens: int, repeats: int = 5) -> float:
    """Median time of every weight matmul of one forward over `tokens` rows, lm_head excluded
    (the caller adds `head_floor_ms` for the rows that reach the head). Each layer is called as
    the model calls it, so packed weights are timed packed and quantized ones quantized."""
    dtype = _dtype(model)
    linears = _body_linears(model)
    inputs = {m.in_features: torch.randn(tokens, m.in_features, dtype=dtype) for m in linears}

    def run() -> None:
        for m in linears:
            m(inputs[m.in_features])

    run()  # untimed: oneDNN builds its kernels for a new shape on the first call
    return _time_ms(run, repeats)


def matmul_gflop(model: nn.Module, tokens: int, head_rows: int) -> float:
    """GFLOP of the matmuls `linear_floor_ms(model, tokens)` + `head_floor_ms(model, head_rows)`
    time: 2 x rows x in_features x out_features for each layer (a multiply and an add per
    weight and row), whatever the weights' storage."""
    per_row = sum(m.in_features * m.out_features for m in _body_linears(model))
    head = _head_layer(model)
    return 2 * (tokens * per_row + head_rows * head.in_features * head.out_features) / 1e9


def head_floor_ms(model: nn.Module, rows: int, repeats: int = 5) -> float:
    head = model.lm_head
    features = _head_layer(model).in_features
    x = torch.randn(rows, features, dtype=_dtype(model))
    head(x)
    return _time_ms(lambda: head(x), repeats)


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of `torch.sum` over a `gib` GiB float32 tensor, median of `repeats`
    (one untimed pass first)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights one decode step reads: every linear layer (lm_head included, shared
    with the embedding when tied), quantized ones as stored (values, scales and zeros), and the
    norms; the embedding table is only gathered from."""
    itemsize = _dtype(model).itemsize
    matmuls = sum(
        quantized_bytes(m)
        if isinstance(m, QUANTIZED_LINEARS)
        else m.in_features * m.out_features * itemsize
        for m in _linears(model)
    )
    norms = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if name.endswith("norm.weight")
    )
    return matmuls + norms


def bandwidth_floor_ms(read_bytes: int, bytes_per_s: float) -> float:
    return read_bytes / bytes_per_s * 1e3
