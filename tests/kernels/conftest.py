"""Kernel tests run on a GPU when there is one, else under Triton's interpreter on the CPU.

Triton 3.x reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, i.e. when a module of
`kernels/` is imported (not when `triton` itself is imported), so the variable is set here, at
import time of this conftest, before any test module imports a kernel.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    # A kernel module imported earlier in this session (by another test package) holds compiled
    # JITFunctions that cannot take CPU tensors; re-import it so its kernels are interpreted.
    for _name in [m for m in sys.modules if m.startswith("kernels.")]:
        importlib.reload(sys.modules[_name])

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

KvPool = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def make_kv_pool() -> Callable[..., KvPool]:
    """Builds a KV pool holding `seq_lens[i]` tokens for request i, at random slots and rows.

    Returns (k_buffer, v_buffer, req_to_token, req_rows). Every slot not owned by a request
    (slot 0, the free slots, the table's unused tail) holds NaN, so a kernel that reads past its
    mask shows up as NaN in its output.
    """

    def build(
        seq_lens: list[int],
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        index_dtype: torch.dtype = torch.int32,
        seed: int = 0,
    ) -> KvPool:
        gen = torch.Generator().manual_seed(seed)
        total = sum(seq_lens)
        num_slots = 2 * total + 1  # half of the pool stays free, interleaved with used slots
        # k_buffer, v_buffer: [num_slots, num_kv_heads, head_dim]
        shape = (num_slots, num_kv_heads, head_dim)
        k_buffer = torch.full(shape, float("nan"), dtype=dtype)
        v_buffer = torch.full(shape, float("nan"), dtype=dtype)
        slots = torch.randperm(num_slots - 1, generator=gen)[:total] + 1  # never slot 0
        k_buffer[slots] = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_buffer[slots] = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
        # req_to_token: [max_rows, context_len], rows given out in random order
        max_rows, context_len = len(seq_lens) + 3, max(seq_lens) + 5
        req_to_token = torch.zeros(max_rows, context_len, dtype=index_dtype)
        req_rows = torch.randperm(max_rows, generator=gen)[: len(seq_lens)]
        for row, chunk in zip(req_rows.tolist(), slots.split(seq_lens), strict=True):
            req_to_token[row, : len(chunk)] = chunk.to(index_dtype)
        tensors = (k_buffer, v_buffer, req_to_token, req_rows.to(index_dtype))
        return tuple(t.to(DEVICE) for t in tensors)  # type: ignore[return-value]

    return build
