"""--enable-deterministic-inference on the real SmolLM2-135M-Instruct in the CPU's default dtype
(bfloat16 on AVX-512 BF16, and on AVX2 without AVX-512 through our panels; float32 elsewhere):
four seeded requests give the same tokens and logprobs, bit for bit, over 100 repetitions (40 in
float32,
whose weights take twice the reads per tile) that each mix them
with random background requests, prefill them in random chunks, join them at random steps and take
a random part of their prompts from a cached prefix computed by another request.

The repetitions drive the engine through real Steps as the scheduler would (rows, KV slots, table
writes, chunked prefill, decode), one harness for both modes; without the flag the same harness
shows the outputs moving."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from services.executor.batch_invariant import TILE_ROWS, BatchInvariantLinear
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, EngineLimits
from services.executor.factory import pick_dtype
from services.executor.model_config import ModelConfig
from services.executor.packed_linear import PackedLinear, PanelLinear, can_prepack, can_use_panels16
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput
from services.executor.weights import build_model, load_model
from tests.executor.tiny import hf_model

pytestmark = pytest.mark.slow

CONTEXT, SLOTS, ROWS = 1024, 8192, 64
VOCAB_SAMPLE = 2000  # prompt ids are drawn below this (ordinary text tokens of the vocabulary)
TARGETS = [  # (prompt length, sampling) of the four requests whose outputs must not move
    (29, SamplingParams(temperature=1.0, top_p=0.9, seed=11, logprobs=True)),
    (41, SamplingParams(temperature=0.8, seed=12, logprobs=True)),
    (23, SamplingParams(temperature=0.0, logprobs=True)),
    (36, SamplingParams(temperature=1.0, top_k=40, repetition_penalty=1.2, seed=13, logprobs=True)),
]
NEW_TOKENS = 8
# What `--dtype auto` serves on this CPU (bfloat16 only where it runs a kernel of ours: torch's
# emulated bfloat16 matmuls would not fit the test's time limit). Float32 steps read twice the
# weight bytes, so they repeat fewer times (about 100 s on 2 cores).
DTYPE = pick_dtype("auto", torch.device("cpu"))
REPETITIONS = 100 if torch.bfloat16 == DTYPE else 40


@dataclass
class Req:
    row: int
    name: str
    prompt: list[int]
    params: SamplingParams
    max_new: int
    slots: list[int]  # the table row's slots, positions 0 .. len(prompt) + max_new - 1
    done: int = 0  # prompt tokens computed (or taken from the cache)
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return len(self.output) >= self.max_new


def target_prompts() -> list[list[int]]:
    rng = random.Random(2024)
    return [[rng.randrange(VOCAB_SAMPLE) for _ in range(n)] for n, _ in TARGETS]


def repetition(engine: Engine, prompts: list[list[int]], seed: int) -> list[tuple]:
    """One repetition under random traffic; the targets' (tokens, logprobs)."""
    rng = random.Random(seed)
    next_slot, next_row, step_id = 1, 0, 0

    def new(name: str, prompt: list[int], params: SamplingParams, max_new: int) -> Req:
        nonlocal next_slot, next_row
        n = len(prompt) + max_new
        req = Req(next_row, name, prompt, params, max_new, list(range(next_slot, next_slot + n)))
        next_slot, next_row = next_slot + n, next_row + 1
        return req

    def background() -> Req:
        prompt = [rng.randrange(VOCAB_SAMPLE) for _ in range(rng.randint(1, 60))]
        params = SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), seed=rng.randrange(99))
        return new(f"bg{next_row}", prompt, params, rng.randint(1, 12))

    # Warm requests leave each cached target prefix in the pool: they share the target's first
    # k tokens (k random, 0: a cache miss), then go their own way.
    cached = [rng.choice([0, rng.randint(1, len(p) - 1)]) for p in prompts]
    waiting: list[Req] = [background() for _ in range(rng.randint(0, 4))]
    warm = {}
    for i, k in enumerate(cached):
        if k:
            tail = [rng.randrange(VOCAB_SAMPLE) for _ in range(rng.randint(1, 20))]
            warm[i] = new(f"warm{i}", prompts[i][:k] + tail, SamplingParams(temperature=0.0), 2)
    waiting += warm.values()
    targets = [new(f"t{i}", p, TARGETS[i][1], NEW_TOKENS) for i, p in enumerate(prompts)]
    pending = list(targets)  # join once their warm request has computed the shared prefix
    running: list[Req] = []
    while pending or waiting or running:
        step_id += 1
        add, writes, released = [], [], []
        for req in [r for r in waiting if rng.random() < 0.6] + [
            t for t in pending if rng.random() < 0.5 and ready(t, targets, warm, cached)
        ]:
            (waiting if req in waiting else pending).remove(req)
            i = targets.index(req) if req in targets else -1
            k = cached[i] if i >= 0 else 0
            if k:  # positions 0 .. k-1 read the warm request's slots
                writes += [SlotWrite(req.row, 0, warm[i].slots[:k])]
                req.done = k
            writes.append(SlotWrite(req.row, k, req.slots[k:]))
            add.append(NewRequest(req.row, req.name, req.params, req.prompt))
            running.append(req)
        slices = [next_slice(req, rng) for req in running]
        if not slices and not add:
            continue
        out = engine.run_step(StepInput(step_id, add=add, writes=writes, slices=slices))
        by_row = {r.row: r for r in running}
        for token in out.tokens:
            by_row[token.row].output.append(token.token_id)
            by_row[token.row].logprobs.append(token.logprob)
        for req in [r for r in running if r.finished]:
            running.remove(req)
            released.append(req.row)
        if released:
            engine.run_step(StepInput(step_id := step_id + 1, release_rows=released))
    return [(tuple(t.output), tuple(t.logprobs)) for t in targets]


def ready(target: Req, targets: list[Req], warm: dict[int, Req], cached: list[int]) -> bool:
    i = targets.index(target)
    return not cached[i] or warm[i].done >= len(warm[i].prompt)


def next_slice(req: Req, rng: random.Random) -> Slice:
    if req.done < len(req.prompt):
        left = len(req.prompt) - req.done
        n = rng.choice([left, rng.randint(1, left)])  # the rest, or a random chunk
        start, req.done = req.done, req.done + n
        return Slice(
            req.row, start, req.prompt[start : req.done], sample=req.done == len(req.prompt)
        )
    return Slice(req.row, len(req.prompt) + len(req.output) - 1, [], use_last_sampled=True)


def engine_of(model_dir: Path, deterministic: bool) -> Engine:
    cfg = ModelConfig.from_dir(model_dir)
    model = load_model(model_dir, cfg, CONTEXT, DTYPE, torch.device("cpu"))
    limits = EngineLimits(SLOTS, ROWS, CONTEXT)
    return Engine(model, cfg, limits, torch.device("cpu"), deterministic=deterministic)


def test_seeded_requests_repeat_exactly_under_random_batches_chunks_and_cache(
    default_model_dir: Path,
) -> None:
    prompts = target_prompts()
    engine = engine_of(default_model_dir, deterministic=True)
    first = repetition(engine, prompts, seed=0)
    assert all(len(tokens) == NEW_TOKENS for tokens, _ in first)
    for seed in range(1, REPETITIONS):
        assert repetition(engine, prompts, seed) == first, f"repetition {seed} differs"


def test_without_the_flag_the_same_traffic_moves_the_outputs(default_model_dir: Path) -> None:
    """The harness can tell: batch composition, chunking and caching change the logprobs
    (though rarely a token) when the flag is off."""
    prompts = target_prompts()
    engine = engine_of(default_model_dir, deterministic=False)
    runs = {tuple(repetition(engine, prompts, seed)) for seed in range(8)}
    assert len(runs) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("k", "n"), [(576, 1536), (1536, 576), (576, 2000)])
def test_batch_invariant_linear_rows_do_not_depend_on_the_batch(
    dtype: torch.dtype, k: int, n: int
) -> None:
    """Each row of any batch size (1 .. 3 tiles and odd sizes), at any position, equals the same
    row computed alone, bit for bit; packed oneDNN weights and panels too."""
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False).to(dtype)
    layers = [BatchInvariantLinear(linear)]
    if can_prepack(dtype, torch.device("cpu")):
        layers.append(BatchInvariantLinear(PackedLinear(linear)))
    if can_use_panels16(dtype, torch.device("cpu")):
        layers.append(BatchInvariantLinear(PanelLinear(linear)))
    x = torch.randn(200, k).to(dtype)
    rng = random.Random(1)
    for layer in layers:
        alone = torch.cat([layer(x[i : i + 1]) for i in range(8)])
        for m in [1, 2, 7, TILE_ROWS - 1, TILE_ROWS, TILE_ROWS + 1, 33, 47, 64, 130]:
            idx = torch.randint(0, 200, (m,))
            pos, row = rng.randrange(m), rng.randrange(8)
            idx[pos] = row
            assert torch.equal(layer(x[idx])[pos], alone[row]), f"{m} rows, row at {pos}"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"tp": 2}, "does not support --tp"),
        ({"enable_torch_compile": True}, "drop --enable-torch-compile"),
    ],
)
def test_the_flag_refuses_what_it_cannot_make_deterministic(flags: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExecutorConfig(enable_deterministic_inference=True, **flags)


def test_a_backend_without_a_batch_invariant_mode_is_refused() -> None:
    hf = hf_model("llama")
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    model = build_model(cfg, 64, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="triton attention backend has no batch-invariant mode"):
        Engine(
            model, cfg, EngineLimits(256, 4, 64), torch.device("cpu"), "triton", deterministic=True
        )
