"""Decode steps through direct kernel calls give the module path's logits, bit for bit, and the
engine takes that path exactly for the batches it can run."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from torch import nn

import kernels.cpu as cpu_kernels
from kernels.cpu import fused
from services.executor.attention import torch_backend
from services.executor.direct_decode import DirectDecode
from services.executor.engine import Engine, EngineLimits
from services.executor.model_config import ModelConfig
from services.executor.packed_linear import can_prepack, can_use_panels16, prepack_linears
from services.executor.quantization import quantize_linears
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, SharedPrefix, Slice, SlotWrite, StepInput
from services.executor.weights import build_model, load_weights
from tests.executor.driver import record_runs
from tests.executor.tiny import hf_model

GREEDY = SamplingParams(temperature=0)

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None or fused._fused.load() is None,
    reason="the CPU attention and fused kernels are not built here",
)


def engine(
    variant: str,
    mode: str,
    dtype: torch.dtype = torch.float32,
    deterministic: bool = False,
    kv_dtype: torch.dtype | None = None,
) -> Engine:
    """A tiny model loaded as `radixserve serve` loads one: quantized (int8, int4) or prepacked
    (none), in `dtype`; "plain" keeps torch's linears (as `--enable-torch-compile` does); the KV
    pool in `kv_dtype` (None: `dtype`)."""
    hf = hf_model(variant)
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    model = build_model(cfg, cfg.max_position_embeddings, dtype, torch.device("cpu"))
    load_weights(model, hf.state_dict().items())
    if mode == "none":
        prepack_linears(model)
    elif mode != "plain":
        assert quantize_linears(model, mode, 32) == []
    limits = EngineLimits(4096, 64, cfg.max_position_embeddings, kv_dtype=kv_dtype)
    return Engine(model, cfg, limits, torch.device("cpu"), deterministic=deterministic)


def prefill(n: int, seed: int) -> tuple[StepInput, list[int]]:
    """A step adding n requests with prompts of 2..40 tokens (slots for 60 positions each), and
    the prompt lengths."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(2, 40))] for _ in range(n)]
    return StepInput(
        1,
        add=[NewRequest(r, f"r{r}", GREEDY) for r in range(n)],
        writes=[SlotWrite(r, 0, list(range(1 + 60 * r, 1 + 60 * (r + 1)))) for r in range(n)],
        slices=[Slice(r, 0, p) for r, p in enumerate(prompts)],
    ), [len(p) for p in prompts]


def decode(step_id: int, lens: list[int]) -> StepInput:
    return StepInput(step_id, slices=[Slice(r, n, [], True) for r, n in enumerate(lens)])


def count_direct(e: Engine) -> list[int]:
    """Records the row count of every batch `e` runs through DirectDecode."""
    assert e.direct_decode is not None
    return record_runs(e.direct_decode)


BF16 = pytest.mark.skipif(
    not can_prepack(torch.bfloat16, torch.device("cpu")),
    reason="bfloat16 linears need oneDNN's bfloat16 GEMM (AVX-512)",
)
BF16_LINEARS = pytest.mark.skipif(
    not (
        can_prepack(torch.bfloat16, torch.device("cpu"))
        or can_use_panels16(torch.bfloat16, torch.device("cpu"))
    ),
    reason="bfloat16 linears need oneDNN's bfloat16 GEMM (AVX-512) or the AVX2 panels",
)
MODES = [
    ("none", torch.float32),
    ("int8", torch.float32),
    ("int4", torch.float32),
    ("plain", torch.float32),
    pytest.param("none", torch.bfloat16, marks=BF16_LINEARS),
    pytest.param("int8", torch.bfloat16, marks=BF16),
    pytest.param("int4", torch.bfloat16, marks=BF16),  # torch's int4 kernel and packing
]


@pytest.mark.parametrize("variant", ["llama", "qwen2", "gqa3-hd64"])
@pytest.mark.parametrize(("mode", "dtype"), MODES)
@pytest.mark.parametrize("batch", [1, 3, 7, 9, 17, 33])
def test_direct_decode_logits_equal_the_modules(
    variant: str, mode: str, dtype: torch.dtype, batch: int
) -> None:
    """Batch sizes on both sides of each layer's cut-overs (6 rows for the float32 kernel, 8 for
    the quantized ones' expansion in registers, 32 for their float GEMM, 4 for bfloat16 on AMX
    CPUs and 16 on others): three decode steps, the same logits bit for bit."""
    direct, modules = engine(variant, mode, dtype), engine(variant, mode, dtype)
    assert direct.direct_decode is not None
    modules.direct_decode = None
    runs = count_direct(direct)
    first, lens = prefill(batch, seed=batch)
    assert torch.equal(direct.logits(first), modules.logits(first))
    assert runs == []  # a prefill runs the modules
    for i in range(3):
        step = decode(2 + i, [n + i for n in lens])
        a, b = direct.logits(step), modules.logits(step)
        assert a.dtype == torch.float32 and a.shape == (batch, 256)
        assert torch.equal(a, b), f"step {i}: max diff {(a - b).abs().max()}"
    assert runs == [batch] * 3


@pytest.mark.parametrize("kv", [torch.bfloat16, torch.float8_e5m2], ids=str)
@pytest.mark.parametrize("variant", ["llama", "gqa3-hd64"])
@pytest.mark.parametrize("batch", [1, 9, 17])
def test_narrow_kv_cache_direct_decode_equals_the_modules(
    variant: str, batch: int, kv: torch.dtype
) -> None:
    """A float32 model over a bfloat16 or float8 KV pool (--kv-cache-dtype bfloat16, fp8_e5m2):
    the direct loop stores K/V rounded and runs the mixed-dtype kernel, with the module path's
    logits."""
    direct, modules = engine(variant, "none", kv_dtype=kv), engine(variant, "none", kv_dtype=kv)
    assert direct.pool.k[0].dtype == kv and direct.direct_decode is not None
    modules.direct_decode = None
    runs = count_direct(direct)
    first, lens = prefill(batch, seed=batch)
    assert torch.equal(direct.logits(first), modules.logits(first))
    for i in range(3):
        step = decode(2 + i, [n + i for n in lens])
        a, b = direct.logits(step), modules.logits(step)
        assert torch.equal(a, b), f"step {i}: max diff {(a - b).abs().max()}"
    assert runs == [batch] * 3


def test_mixed_batches_run_the_modules() -> None:
    """A step with an extend slice beside decodes is not a pure decode: the modules run it."""
    e = engine("llama", "int8")
    runs = count_direct(e)
    first, lens = prefill(2, seed=1)
    e.run_step(first)
    e.run_step(
        StepInput(
            2,
            add=[NewRequest(5, "late", GREEDY)],
            writes=[SlotWrite(5, 0, list(range(1000, 1010)))],
            slices=[Slice(0, lens[0], [], True), Slice(5, 0, [1, 2, 3])],
        )
    )
    assert runs == []
    e.run_step(decode(3, [lens[0] + 1, lens[1]]))
    assert runs == [2]


@pytest.mark.parametrize("spans_mode", ["always", "auto"])
def test_shared_prefix_spans_run_the_modules(
    spans_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows sent with a shared-prefix span run the modules (cascade attention) where the engine
    keeps the spans, and the direct loop where it drops them (SDPA extends; by default, spans
    of fewer rows and positions than pay) or runs them as decode groups (the AVX2 decode
    kernel's grouped form); the same logits as the module path either way."""
    monkeypatch.setenv("RADIXSERVE_CPU_SHARED_PREFIX", spans_mode)
    direct, modules = engine("gqa3-hd64", "int8"), engine("gqa3-hd64", "int8")
    modules.direct_decode = None
    runs = count_direct(direct)
    rng = random.Random(3)
    shared = [rng.randrange(256) for _ in range(64)]
    prompts = [shared + [rng.randrange(256) for _ in range(5 + r)] for r in range(4)]
    head = list(range(1, 65))  # the four rows' first 64 positions map to the same slots
    steps = [
        StepInput(  # row 0 computes the shared prefix and its own tokens
            1,
            add=[NewRequest(0, "r0", GREEDY)],
            writes=[SlotWrite(0, 0, [*head, *range(100, 150)])],
            slices=[Slice(0, 0, prompts[0])],
        ),
        StepInput(  # rows 1-3 find it cached, as after a radix-tree hit
            2,
            add=[NewRequest(r, f"r{r}", GREEDY) for r in range(1, 4)],
            writes=[
                SlotWrite(r, 0, [*head, *range(100 + 50 * r, 150 + 50 * r)]) for r in (1, 2, 3)
            ],
            slices=[Slice(r, 64, prompts[r][64:]) for r in range(1, 4)],
        ),
    ]
    for step in steps:
        assert torch.equal(direct.logits(step), modules.logits(step))
    spans = [SharedPrefix(64, [0, 1, 2, 3])]
    for i in range(2):
        step = StepInput(
            3 + i,
            slices=[Slice(r, len(p) + i, [], True) for r, p in enumerate(prompts)],
            shared_prefixes=spans,
        )
        assert torch.equal(direct.logits(step), modules.logits(step))
    grouped = direct.attn.grouped_decode  # decode groups run in the direct loop
    kept = direct.attn.supports_shared_prefixes and spans_mode == "always" and not grouped
    assert runs == ([] if kept else [4, 4])


def test_unsampled_rows_take_the_lm_head_of_the_sampled_ones() -> None:
    """A decode step whose rows are not all sampled: the LM head runs on the sampled rows only,
    and the logits equal the module path's."""
    direct, modules = engine("llama", "none"), engine("llama", "none")
    modules.direct_decode = None
    runs = count_direct(direct)
    first, lens = prefill(3, seed=4)
    direct.logits(first), modules.logits(first)
    step = StepInput(2, slices=[Slice(r, n, [], True, sample=r != 1) for r, n in enumerate(lens)])
    a, b = direct.logits(step), modules.logits(step)
    assert a.shape == (2, 256) and torch.equal(a, b)
    assert runs == [3]


def test_disabled_kernels_run_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """RADIXSERVE_DISABLE_CPU_KERNELS=1, set after start-up, sends decode back to the modules
    (and their PyTorch references); unset again, the direct loop gives the modules' logits."""
    direct, modules = engine("llama", "none"), engine("llama", "none")
    modules.direct_decode = None
    runs = count_direct(direct)
    first, lens = prefill(1, seed=2)
    direct.run_step(first), modules.run_step(first)
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    direct.run_step(decode(2, lens)), modules.run_step(decode(2, lens))
    assert runs == []
    monkeypatch.delenv("RADIXSERVE_DISABLE_CPU_KERNELS")
    step = decode(3, [lens[0] + 1])
    assert torch.equal(direct.logits(step), modules.logits(step))
    assert runs == [1]


def test_unknown_models_and_modes_are_declined() -> None:
    """Deterministic inference (batch-invariant layers), forward hooks (tensor parallelism's
    all-reduces) and layers it does not know keep the module path."""
    assert engine("llama", "none", deterministic=True).direct_decode is None
    e = engine("llama", "none")
    assert DirectDecode.supports(e.model, e.attn, torch.device("cpu"))
    handle = e.model.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    assert not DirectDecode.supports(e.model, e.attn, torch.device("cpu"))
    handle.remove()
    e.model.model.layers[1].mlp.down_proj = nn.Sequential(e.model.model.layers[1].mlp.down_proj)
    assert not DirectDecode.supports(e.model, e.attn, torch.device("cpu"))


@BF16_LINEARS
def test_amx_decode_groups_run_the_direct_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the AMX attention kernel runs, decode rows grouped under shared spans run the direct
    loop too (one cascade call per layer): the same logits, bit for bit, as the module path,
    and those of the plain Steps up to bfloat16 rounding."""
    monkeypatch.setattr(torch_backend, "AMX_SPAN_MIN_ROWS", 2)
    monkeypatch.setattr(torch_backend, "AMX_SPAN_MIN_LENGTH", 64)
    direct, modules, plain = (engine("gqa3-hd64", "none", torch.bfloat16) for _ in range(3))
    if not direct.attn.amx_cascade:  # type: ignore[attr-defined]
        pytest.skip("the AMX attention kernel does not run here")
    modules.direct_decode = None
    runs = count_direct(direct)
    rng = random.Random(5)
    shared = [rng.randrange(256) for _ in range(70)]
    prompts = [shared + [rng.randrange(256) for _ in range(3 + r)] for r in range(5)]
    head = list(range(1, 71))
    first = StepInput(
        1,
        add=[NewRequest(r, f"r{r}", GREEDY) for r in range(5)],
        writes=[SlotWrite(r, 0, [*head, *range(100 + 50 * r, 150 + 50 * r)]) for r in range(5)],
        slices=[Slice(0, 0, prompts[0])],
    )
    rest = StepInput(2, slices=[Slice(r, 70, prompts[r][70:]) for r in range(1, 5)])
    for step in (first, rest):
        for e in (direct, modules, plain):
            e.run_step(step)
    # rows 0-1 share 70 positions, rows 2-3 64 of them; row 4 is in no group
    spans = [SharedPrefix(70, [0, 1]), SharedPrefix(64, [2, 3])]
    for i in range(3):
        slices = [Slice(r, len(p) + i, [], True) for r, p in enumerate(prompts)]
        step = StepInput(3 + i, slices=slices, shared_prefixes=spans)
        a, b = direct.logits(step), modules.logits(step)
        assert torch.equal(a, b)
        c = plain.logits(replace(step, shared_prefixes=[]))
        assert (a - c).abs().max().item() < 2e-2
    assert runs == [5, 5, 5]
