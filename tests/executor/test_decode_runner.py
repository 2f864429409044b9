"""The static-shape decode runner gives the eager decode's outputs, and padding touches only slot 0."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
import torch
import transformers
from torch.overrides import TorchFunctionMode

import kernels.cpu as cpu_kernels
from services.executor.attention.torch_backend import kv_len_bucket, kv_len_buckets
from services.executor.decode_runner import StaticDecodeConfig, batch_buckets
from services.executor.engine import Engine, EngineLimits
from services.executor.kv_pool import KVPool
from services.executor.model_config import ModelConfig
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput
from services.executor.weights import build_model, load_weights
from tests.executor.driver import Driver, record_runs
from tests.executor.tiny import hf_model

GREEDY = SamplingParams(temperature=0)
# Float32 on both paths; a padded batch may only change BLAS blocking and reduction lengths.
TOLERANCE = 1e-5


def make_engine(
    hf: transformers.PreTrainedModel,
    static: StaticDecodeConfig | None = None,
    device: str = "cpu",
    backend: str = "torch",
    max_rows: int = 16,
) -> Engine:
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    ctx = cfg.max_position_embeddings
    model = build_model(cfg, ctx, torch.float32, torch.device(device))
    load_weights(model, hf.state_dict().items())
    limits = EngineLimits(4096, max_rows, ctx)
    return Engine(model, cfg, limits, torch.device(device), backend, static)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(2, 50))] for _ in range(n)]


def count_runs(engine: Engine) -> list[int]:
    """Records the batch size of every run of `engine`'s decode runner."""
    assert engine.decode_runner is not None
    return record_runs(engine.decode_runner)


def lockstep_logits(
    engines: list[Engine], prompt_ids: list[list[int]], decode_steps: int
) -> list[list[torch.Tensor]]:
    """Prefills every prompt, then decodes them all `decode_steps` times on each engine, feeding
    the greedy tokens of the first engine to all; returns each engine's logits per step."""
    n = len(prompt_ids)
    span = 64
    first = StepInput(
        1,
        add=[NewRequest(r, f"r{r}", GREEDY) for r in range(n)],
        writes=[SlotWrite(r, 0, list(range(1 + r * span, 1 + (r + 1) * span))) for r in range(n)],
        slices=[Slice(r, 0, p) for r, p in enumerate(prompt_ids)],
    )
    per_engine: list[list[torch.Tensor]] = [[e.logits(first)] for e in engines]
    lengths = [len(p) for p in prompt_ids]
    for i in range(decode_steps):
        tokens = per_engine[0][-1].argmax(-1).tolist()
        step = StepInput(2 + i, slices=[Slice(r, lengths[r] + i, [tokens[r]]) for r in range(n)])
        for logits, engine in zip(per_engine, engines, strict=True):
            logits.append(engine.logits(step))
    return per_engine


def test_batch_and_key_length_buckets() -> None:
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(1) == [1]
    assert kv_len_buckets(512) == [64, 96, 128, 192, 256, 384, 512]
    assert kv_len_buckets(300) == [64, 96, 128, 192, 256, 300]
    lengths = (1, 64, 65, 200, 385, 512)
    assert [kv_len_bucket(n, 512) for n in lengths] == [64, 64, 96, 256, 512, 512]


@pytest.mark.parametrize("n", [3, 5, 11])
def test_between_bucket_batches_match_eager_decode(n: int) -> None:
    hf = hf_model("llama")
    eager = make_engine(hf)
    static = make_engine(hf, StaticDecodeConfig(max_bs=16, cuda_graph=False))
    runs = count_runs(static)
    batch = prompts(n, seed=n)
    by_step = zip(*lockstep_logits([eager, static], batch, decode_steps=4), strict=True)
    for i, (want, got) in enumerate(by_step):
        assert torch.equal(got.argmax(-1), want.argmax(-1)), f"step {i}"
        torch.testing.assert_close(got, want, rtol=TOLERANCE, atol=TOLERANCE, msg=f"step {i}")
    assert runs == [n] * 4  # the prefill ran eagerly, every decode on the static path

    # Through run_step and the last sampled tokens, as the scheduler drives it.
    static.reset()
    want_tokens = [j.output for j in Driver(make_engine(hf)).generate(batch, 6)]
    assert [j.output for j in Driver(static).generate(batch, 6)] == want_tokens


class PoolAccess(TorchFunctionMode):
    """Records the slot indices of every gather from and scatter into the KV pool."""

    def __init__(self, pool: KVPool) -> None:
        super().__init__()
        self.buffers = {id(t) for t in pool.k + pool.v}
        self.reads: list[torch.Tensor] = []
        self.writes: list[torch.Tensor] = []

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if args and id(args[0]) in self.buffers:
            if func is torch.Tensor.index_select:
                self.reads.append(args[2].clone())
            elif func is torch.Tensor.index_copy_:
                self.writes.append(args[2].clone())
        return func(*args, **kwargs)


def poison_unreferenced_slots(engine: Engine) -> None:
    """NaN into every slot but 0 that no active row's table entries point at."""
    active = list(engine.rows)
    referenced = set(engine.table.table[active].unique().tolist()) if active else set()
    unused = [s for s in range(1, engine.pool.num_slots + 1) if s not in referenced]
    for buf in engine.pool.k + engine.pool.v:
        buf[unused] = float("nan")


@pytest.mark.parametrize("cpu_kernel", [False, True])
def test_padded_entries_read_and_write_only_the_padding_slot(
    cpu_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if cpu_kernel and cpu_kernels.load() is None:
        pytest.skip(f"CPU kernel not built: {cpu_kernels.load_error()}")
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "" if cpu_kernel else "1")
    hf = hf_model("llama")
    engine = make_engine(hf, StaticDecodeConfig(max_bs=8, cuda_graph=False))
    runner = engine.decode_runner
    assert runner is not None
    assert engine.attn.use_cpu_kernel == cpu_kernel  # type: ignore[attr-defined]
    bucket_logits: list[torch.Tensor] = []
    engine.model.register_forward_hook(lambda _m, _a, out: bucket_logits.append(out))
    batch = prompts(5, seed=7)
    greedy = SamplingParams(temperature=0)
    engine.run_step(
        StepInput(
            1,
            add=[NewRequest(r, f"r{r}", greedy) for r in range(5)],
            writes=[SlotWrite(r, 0, list(range(1 + 64 * r, 1 + 64 * (r + 1)))) for r in range(5)],
            slices=[Slice(r, 0, p) for r, p in enumerate(batch)],
        )
    )
    lengths = {r: len(p) for r, p in enumerate(batch)}
    # 5 requests (bucket 8, 3 padded); 4 (bucket 4, none); 3 (bucket 4: entry 3 held a real
    # request in the previous run, and its slots are NaN now).
    for step_id, release in ((2, []), (3, [4]), (4, [3])):
        if release:
            engine.run_step(StepInput(step_id * 10, release_rows=release))
        poison_unreferenced_slots(engine)
        rows = sorted(engine.rows)
        slices = [Slice(r, lengths[r], [], use_last_sampled=True) for r in rows]
        with PoolAccess(engine.pool) as access:
            out = engine.run_step(StepInput(step_id, slices=slices))
        for r in rows:
            lengths[r] += 1
        n, bs = len(rows), runner.bucket(len(rows))
        assert len(out.tokens) == n
        # The kernel reads the pool in C++, out of the spy's sight: a padded entry reading any
        # slot but 0 would meet the NaN poison and turn its logits non-finite (checked below).
        assert len(access.reads) == (0 if cpu_kernel else 4)  # 2 layers x (K, V)
        assert len(access.writes) == 4
        for loc in access.writes:
            assert loc.shape == (bs,) and loc[n:].eq(0).all(), f"padding wrote {loc.tolist()}"
        for idx in access.reads:
            assert idx.view(bs, -1)[n:].eq(0).all(), "a padded entry read a slot other than 0"
        assert bucket_logits[-1].shape[0] == bs and bucket_logits[-1].isfinite().all()
    assert engine.table.table[engine.pad_row].eq(0).all()


def test_torch_compile_matches_eager_decode() -> None:
    hf = hf_model("llama")
    eager = make_engine(hf)
    compiled = make_engine(hf, StaticDecodeConfig(max_bs=8, cuda_graph=False, torch_compile=True))
    runs = count_runs(compiled)
    started = time.perf_counter()
    by_step = zip(
        *lockstep_logits([eager, compiled], prompts(3, seed=1), decode_steps=3), strict=True
    )
    for i, (want, got) in enumerate(by_step):
        assert torch.equal(got.argmax(-1), want.argmax(-1)), f"step {i}"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"step {i}")
    assert runs == [3] * 3
    elapsed = time.perf_counter() - started
    print(f"torch.compile of the bucket-4 step and 3 decodes: {elapsed:.1f} s")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_replay_matches_eager_decode(backend: str) -> None:
    hf = hf_model("llama")
    eager = make_engine(hf, device="cuda", backend=backend)
    graphed = make_engine(hf, StaticDecodeConfig(max_bs=16), device="cuda", backend=backend)
    runner = graphed.decode_runner
    assert runner is not None and runner.use_cuda_graph
    graphed.warmup()
    kv_len = runner.attn.static_kv_len(1)
    assert {(bs, kv_len) for bs in runner.buckets} <= set(runner.graphs)
    runs = count_runs(graphed)
    for n in (3, 5, 11):
        batch = prompts(n, seed=n)
        by_step = zip(*lockstep_logits([eager, graphed], batch, decode_steps=4), strict=True)
        for i, (want, got) in enumerate(by_step):
            assert torch.equal(got.argmax(-1), want.argmax(-1)), f"batch {n}, step {i}"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for engine in (eager, graphed):
            engine.reset()
        want_tokens = [j.output for j in Driver(eager).generate(batch, 6)]
        assert [j.output for j in Driver(graphed).generate(batch, 6)] == want_tokens
    assert runs and all(r in (3, 5, 11) for r in runs)
    assert graphed.table.table[graphed.pad_row].eq(0).all()
