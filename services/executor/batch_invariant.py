"""Batch-invariant linear layers for `--enable-deterministic-inference`.

A token's result must not depend on what else is in its forward pass. oneDNN and MKL choose their
GEMM kernel, blocking and thread split from the shape, so the same input row can come out with
different rounding in a batch of 1, of 17 or of 512 rows: measured here, float32 `F.linear` rounds
differently below 16 rows than at 16 and more, and bfloat16 at 33+ rows differs from 16 rows on some
rows. One shape always gives the same rounding to a given row, wherever the row sits in it (the
GEMM never mixes rows). So every product here runs on exactly `TILE_ROWS` rows: the input is padded
with zero rows to a multiple of the tile and multiplied one tile at a time, each tile the same
shape, and each row's reduction over the input features happens in the same order in every step.

The price is the padding at small batches (a decode of one request multiplies 16 rows) and one
GEMM call per tile at large ones (a 512-token prefill makes 32 calls per layer, each reading the
weights again). `radixserve bench-executor --enable-deterministic-inference` measures it.

Like packing (services/executor/packed_linear.py), this is applied to a built model from outside
the model files: `make_batch_invariant` wraps every linear layer in place.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from services.executor.packed_linear import FLOAT_LINEARS, children_of_type
from services.executor.quantization import QUANTIZED_LINEARS

log = logging.getLogger("radixserve.executor")

TILE_ROWS = 16  # rows of every GEMM call (oneDNN and MKL pick their kernel by the row count)


class BatchInvariantLinear(nn.Module):
    """`inner` applied to fixed-size tiles of rows: x [..., in] → [..., out] in x's dtype, each
    output row a function of its input row alone (bit for bit, whatever the other rows)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        """The wrapped layer's attributes (`weight`, `in_features`, …) read through the wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        rows = flat.shape[0]
        if rows == 0:
            return self.inner(x)
        pad = -rows % TILE_ROWS
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad, shape[-1])])
        tiles = [self.inner(tile) for tile in flat.split(TILE_ROWS)]
        out = tiles[0] if len(tiles) == 1 else torch.cat(tiles)
        return out[:rows].view(*shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"tile_rows={TILE_ROWS}"


def make_batch_invariant(model: nn.Module) -> int:
    """Wraps every linear layer of `model` (`nn.Linear`, `PackedLinear`, `PanelLinear`, the
    quantized ones) in a `BatchInvariantLinear`, in place; returns how many were wrapped (0 when
    they all are)."""
    linears = (*FLOAT_LINEARS, *QUANTIZED_LINEARS)
    targets = children_of_type(model, linears, skip=BatchInvariantLinear)
    if not targets:
        return 0
    for parent, name, _, child in targets:
        setattr(parent, name, BatchInvariantLinear(child))
    log.info(
        "deterministic inference: %d linear layers run on %d-row tiles", len(targets), TILE_ROWS
    )
    return len(targets)
