"""Tensor-parallel ranks as threads of the test process: the collectives parallel.py calls,
exchanged through memory, so sharded models run side by side without a process group."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
import torch

from services.executor import parallel

T = TypeVar("T")
TIMEOUT_S = 60.0


class ThreadCollectives:
    """`all_reduce` and `gather` of torch.distributed between `size` threads, the calling
    thread's rank set by `run_ranks`."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT_S)
        self.slots: list[torch.Tensor | None] = [None] * size
        self.local = threading.local()

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[self.local.rank] = tensor.clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return parts  # type: ignore[return-value]

    def all_reduce(self, tensor: torch.Tensor, op: object = None) -> None:
        parts = self._exchange(tensor)
        tensor.copy_(torch.stack(parts).sum(0))

    def gather(
        self, tensor: torch.Tensor, gather_list: list[torch.Tensor] | None = None, dst: int = 0
    ) -> None:
        parts = self._exchange(tensor)
        if self.local.rank == dst:
            assert gather_list is not None
            for out, part in zip(gather_list, parts, strict=True):
                out.copy_(part)


def run_ranks(
    monkeypatch: pytest.MonkeyPatch, size: int, fn: Callable[[parallel.Rank], T]
) -> list[T]:
    """fn(rank) on one thread per rank, with parallel.py's collectives between them."""
    collectives = ThreadCollectives(size)
    monkeypatch.setattr(parallel, "dist", collectives)

    def on_rank(index: int) -> T:
        collectives.local.rank = index
        try:
            return fn(parallel.Rank(index, size))
        except BaseException:
            collectives.barrier.abort()  # the other ranks fail instead of waiting
            raise

    with ThreadPoolExecutor(size) as pool:
        return list(pool.map(on_rank, range(size)))
