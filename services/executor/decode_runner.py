"""Static-shape decode: pure-decode batches padded to a few batch sizes and run on fixed buffers.

A decode batch of n requests runs as the smallest bucket bs >= n (1, 2, 4, 8, then steps of 8 up
to `--cuda-graph-max-bs`). Its inputs are copied into preallocated buffers and the forward reads
only those buffers, so every run of a bucket has the same shapes and tensor addresses: on CUDA each
bucket is captured once as a CUDA graph and replayed; elsewhere the step runs eagerly, or through
`torch.compile(dynamic=False)` with `--enable-torch-compile`.

Padding. Entries n..bs-1 of a bucket are padding: token 0 at position 0, stored into KV slot 0
(the pool's padding slot, never handed out), with seq_len 1 in table row `pad_row`, a row past the
ones steps may use (validation rejects rows >= max_running_requests) whose entries are all slot 0.
So a padded entry writes only slot 0 and reads only slot 0, whatever the backend. Slot 0 holds
finite values (zeros, or K/V of padding tokens), so it stays harmless where masked keys are
multiplied by zero. The padding is rewritten on every run, since a larger batch of an earlier run
left real rows and slots in those entries.

The attention backend provides the layout (`StaticDecodeBackend`): `static_kv_len` maps the
longest sequence of a step to a key length its static metadata is padded to (0 when, like the
Triton kernels, it reads the lengths from the device), and `init_static_decode` builds that
metadata from the buffers alone. A run is keyed by (bucket, key length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from services.executor.attention import AttentionBackend
from services.executor.forward_batch import ForwardBatch

# Most distinct key lengths one batch bucket may compile (the torch backend uses two per doubling
# of the context); torch.compile's default limit of 8 recompiles would silently fall back to eager.
MAX_KV_LEN_KEYS = 32


def batch_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, … up to `max_bs`, which is always the last bucket."""
    assert max_bs >= 1
    return [*(b for b in (1, 2, 4) if b < max_bs), *range(8, max_bs, 8), max_bs]


@dataclass(frozen=True)
class StaticDecodeConfig:
    max_bs: int = 32
    cuda_graph: bool = True  # on CUDA, capture each (bucket, key length) once and replay it
    torch_compile: bool = False  # torch.compile the bucketed step (before capture on CUDA)


@runtime_checkable
class StaticDecodeBackend(Protocol):
    def static_kv_len(self, max_seq_len: int) -> int: ...

    def init_static_decode(self, batch: ForwardBatch, kv_len: int) -> None: ...


class DecodeBuffers:
    """Inputs of the largest bucket; a bucket of size bs reads their first bs entries."""

    def __init__(self, max_bs: int, pad_row: int, device: torch.device) -> None:
        self.pad_row = pad_row

        def index(fill: int) -> torch.Tensor:  # [max_bs] int64
            return torch.full((max_bs,), fill, dtype=torch.int64, device=device)

        self.input_ids, self.positions, self.out_cache_loc = index(0), index(0), index(0)
        self.rows, self.seq_lens = index(pad_row), index(1)

    def _padding(self) -> tuple[tuple[torch.Tensor, int], ...]:
        return (
            (self.input_ids, 0),
            (self.positions, 0),
            (self.out_cache_loc, 0),
            (self.rows, self.pad_row),
            (self.seq_lens, 1),
        )

    def load(self, batch: ForwardBatch, bs: int) -> None:
        """Entries 0..n-1 from the pure-decode `batch`, n..bs-1 padding."""
        n = batch.num_decode
        sources = (
            batch.input_ids,
            batch.positions,
            batch.out_cache_loc,
            batch.rows,
            batch.seq_lens,
        )
        for (buf, pad), src in zip(self._padding(), sources, strict=True):
            buf[:n].copy_(src)
            buf[n:bs].fill_(pad)

    def load_padding(self, bs: int) -> None:
        for buf, pad in self._padding():
            buf[:bs].fill_(pad)

    def view(self, bs: int) -> ForwardBatch:
        # A decode token's position is its request's cached length: starts == positions.
        return ForwardBatch(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            rows=self.rows[:bs],
            starts=self.positions[:bs],
            seq_lens=self.seq_lens[:bs],
            num_extend=0,
            num_extend_tokens=0,
        )


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bs, vocab], rewritten by every replay


class StaticDecodeRunner:
    """Runs pure-decode batches of up to `max_bs` requests on static shapes (see the module doc).

    `pad_row` must be a table row no request uses, all of whose entries stay slot 0.
    """

    def __init__(
        self,
        model: nn.Module,
        attn: AttentionBackend,
        pad_row: int,
        config: StaticDecodeConfig,
        device: torch.device,
    ) -> None:
        if not isinstance(attn, StaticDecodeBackend):
            raise ValueError(f"attention backend {attn.name!r} has no static-shape decode")
        self.model, self.attn, self.device = model, attn, device
        self.buckets = batch_buckets(config.max_bs)
        self.max_bs = config.max_bs
        self.buffers = DecodeBuffers(config.max_bs, pad_row, device)
        self.use_cuda_graph = config.cuda_graph and device.type == "cuda"
        self.compiled = config.torch_compile
        self.step = self._step
        if self.compiled:
            _raise_recompile_limit(len(self.buckets) * MAX_KV_LEN_KEYS)
            self.step = torch.compile(self._step, dynamic=False)
        self.graphs: dict[tuple[int, int], CapturedStep] = {}
        self.graph_pool: tuple[int, int] | None = None

    @property
    def mode(self) -> str:
        parts = ["torch.compile"] if self.compiled else []
        parts.append("CUDA graphs" if self.use_cuda_graph else "no capture")
        return f"static decode, batch buckets {self.buckets}, " + ", ".join(parts)

    def can_run(self, batch: ForwardBatch) -> bool:
        """A pure-decode batch within the largest bucket, returning only sampled logits."""
        return (
            batch.num_extend == 0
            and 0 < batch.num_decode <= self.max_bs
            and batch.prompt_token_idx is None
        )

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [num_sampled, vocab] (float32) of a batch `can_run` accepted, as the eager
        forward returns them; the tensor is the caller's (no buffer of the runner)."""
        assert self.can_run(batch)
        bs = self.bucket(batch.num_decode)
        kv_len = self.attn.static_kv_len(max(batch.seq_lens_cpu))
        self.buffers.load(batch, bs)
        if self.use_cuda_graph:
            logits = self._replay(bs, kv_len)
        else:
            logits = self.step(bs, kv_len)
        idx = batch.sample_token_idx
        return logits[idx] if idx is not None else logits[: batch.num_decode].clone()

    def _step(self, bs: int, kv_len: int) -> torch.Tensor:
        # Reads only the buffers (and the pool, table and weights, whose storage never moves).
        batch = self.buffers.view(bs)
        self.attn.init_static_decode(batch, kv_len)
        return self.model(batch, self.attn)

    # --- CUDA graphs ---------------------------------------------------------------------------

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Captures every batch bucket up front (largest first, so the smaller graphs reuse its
        memory pool), at the key length of one-token sequences; other key lengths (torch backend
        only) are captured on first use. Writes only the padding slot. No-op without CUDA graphs."""
        if not self.use_cuda_graph:
            return
        kv_len = self.attn.static_kv_len(1)
        for bs in reversed(self.buckets):
            if (bs, kv_len) not in self.graphs:
                self.buffers.load_padding(bs)
                self.graphs[(bs, kv_len)] = self._capture(bs, kv_len)

    def _replay(self, bs: int, kv_len: int) -> torch.Tensor:
        key = (bs, kv_len)
        if key not in self.graphs:
            # The buffers hold this step's inputs: warm-up and capture rewrite the same K/V.
            self.graphs[key] = self._capture(bs, kv_len)
        captured = self.graphs[key]
        captured.graph.replay()
        return captured.logits

    def _capture(self, bs: int, kv_len: int) -> CapturedStep:
        # Warm-up on a side stream first: Triton JIT compiles, cuBLAS workspaces, torch.compile
        # and allocator growth must not happen inside the capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(bs, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = self.step(bs, kv_len)
        return CapturedStep(graph, logits)


def _raise_recompile_limit(limit: int) -> None:
    import torch._dynamo  # only when compiling: importing dynamo is slow

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, limit)
