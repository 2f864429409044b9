"""Lower bounds a step time is compared with in `radixserve bench-executor`.

- matmul floor: the model's weight matmuls alone at the step's shapes, timed.
- bandwidth floor: the bytes a step must read (every weight once, plus the KV cache it attends
  over) divided by the memory bandwidth measured at start by reading one large tensor.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


def linear_floor_ms(model: nn.Module, tokens: int, repeats: int = 5) -> float:
    """Median time of every weight matmul of one forward over `tokens` rows, lm_head excluded
    (the caller adds `head_floor_ms` for the rows that reach the head)."""
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
    with the embedding when tied) and the norms; the embedding table is only gathered from."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    skip.discard(id(model.lm_head.weight))
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def bandwidth_floor_ms(read_bytes: int, bytes_per_s: float) -> float:
    return read_bytes / bytes_per_s * 1e3
