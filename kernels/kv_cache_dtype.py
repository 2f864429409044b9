"""KV caches narrower than the model (`--kv-cache-dtype`): how a key or value is rounded into the
pool, and how rows are stored into a pool of any dtype."""

from __future__ import annotations

import torch

# Pool dtypes stored as 8-bit floats: OCP FP8 E5M2 (the top byte of an IEEE half), which every
# attention path widens to float32 exactly.
FLOAT8_DTYPES = (torch.float8_e5m2,)


def to_kv_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` rounded to the pool dtype `dtype` (x itself when it has that dtype already): to
    nearest even, as `Tensor.to`; a float8 pool saturates at its largest finite value (57,344 for
    E5M2) instead of overflowing to infinity, as vLLM's and SGLang's fp8 KV caches do."""
    if x.dtype == dtype:
        return x
    if dtype in FLOAT8_DTYPES:
        largest = torch.finfo(dtype).max
        return x.clamp(-largest, largest).to(dtype)
    return x.to(dtype)


def store_rows(buf: torch.Tensor, loc: torch.Tensor, x: torch.Tensor) -> None:
    """In place: buf[loc[i]] = x[i], rounded by `to_kv_dtype`. buf: [slots, ...] (a pool of any
    dtype); loc: [n] int64 distinct slots; x: [n, ...] float. A float8 pool takes the rows as
    bytes: torch's `index_copy_` has no float8 kernel on the CPU."""
    rows = to_kv_dtype(x, buf.dtype)
    if buf.dtype in FLOAT8_DTYPES:
        buf.view(torch.uint8).index_copy_(0, loc, rows.view(torch.uint8))
    else:
        buf.index_copy_(0, loc, rows)
