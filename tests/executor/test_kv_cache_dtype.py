"""`--kv-cache-dtype bfloat16` under a float32 model and `fp8_e5m2` under either: the pool holds
narrower K/V (half or a quarter of the bytes, more slots in the same memory), every attention path
reads it, and the logits stay those of the model's own cache to the rounding of K and V."""

from __future__ import annotations

import argparse

import pytest
import torch

import kernels.cpu as cpu_kernels
from services.common.config import add_arguments, from_args
from services.executor import factory
from services.executor.config import ExecutorConfig
from services.executor.factory import pick_dtype, pick_kv_dtype, size_kv_pool
from services.executor.kv_pool import KVPool
from services.executor.model_config import ModelConfig
from services.executor.packed_linear import can_use_panels16
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, SharedPrefix, Slice, SlotWrite, StepInput
from tests.executor.tiny import engine_for, hf_model

GREEDY = SamplingParams(temperature=0)
KERNELS = pytest.mark.skipif(
    cpu_kernels.load() is None, reason=f"kernel not built: {cpu_kernels.load_error()}"
)


@pytest.mark.parametrize(
    ("has_bf16", "bf16_panels", "picked"),
    [
        (True, False, torch.bfloat16),  # AVX-512 BF16 or AMX
        (False, True, torch.bfloat16),  # AVX2 without AVX-512: bfloat16 panels of ours
        (False, False, torch.float32),  # neither (or the kernels disabled)
    ],
)
def test_dtype_auto_on_a_cpu(
    monkeypatch: pytest.MonkeyPatch, has_bf16: bool, bf16_panels: bool, picked: torch.dtype
) -> None:
    monkeypatch.setattr(factory, "cpu_has_bf16", lambda: has_bf16)
    asked: list[torch.dtype] = []
    monkeypatch.setattr(
        factory, "can_use_panels16", lambda dtype, device: asked.append(dtype) or bf16_panels
    )
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == picked
    assert asked in ([], [torch.bfloat16])
    # quantized or torch.compile'd linears are not bfloat16 panels: float32 unless native
    assert pick_dtype("auto", cpu, panels=False) == (torch.bfloat16 if has_bf16 else torch.float32)
    for name in ("float32", "bfloat16", "float16"):
        assert pick_dtype(name, cpu) == getattr(torch, name)
        assert pick_dtype(name, cpu, panels=False) == getattr(torch, name)


@pytest.mark.parametrize(
    ("flags", "panels"),
    [
        ([], True),
        (["--quantization", "int8"], False),
        (["--quantization", "gguf"], False),
        (["--enable-torch-compile"], False),
    ],
)
def test_which_executors_may_pick_bfloat16_panels(flags: list[str], panels: bool) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, ExecutorConfig)
    cfg = from_args(ExecutorConfig, parser.parse_args(["--model-path", "m", *flags]))
    assert factory.panel_linears(cfg) is panels


def test_dtype_auto_on_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    fast = factory.cpu_has_bf16() or can_use_panels16(torch.bfloat16, cpu)
    assert pick_dtype("auto", cpu) == (torch.bfloat16 if fast else torch.float32)
    if not factory.cpu_has_bf16():  # without our kernels bfloat16 runs torch's scalar GEMM
        monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
        assert pick_dtype("auto", cpu) == torch.float32


def test_pick_kv_dtype() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert pick_kv_dtype("auto", dtype) == dtype
    for name in ("bfloat16", "bf16"):
        assert pick_kv_dtype(name, torch.float32) == torch.bfloat16
        assert pick_kv_dtype(name, torch.bfloat16) == torch.bfloat16
    assert pick_kv_dtype("fp8_e5m2", torch.float32) == torch.float8_e5m2
    assert pick_kv_dtype("fp8_e5m2", torch.bfloat16) == torch.float8_e5m2
    with pytest.raises(ValueError, match="--kv-cache-dtype bf16 needs a float32 or bfloat16"):
        pick_kv_dtype("bf16", torch.float16)
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8_e5m2 needs a float32 or"):
        pick_kv_dtype("fp8_e5m2", torch.float16)


def test_flag_and_pool_sizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flag parses in SGLang's spellings, rejects others, and a bfloat16 cache fits twice
    the tokens of a float32 one in the same --mem-fraction-static, a float8 one four times."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, ExecutorConfig)

    def parse(*argv: str) -> ExecutorConfig:
        return from_args(ExecutorConfig, parser.parse_args(argv))

    assert parse("--kv-cache-dtype", "bf16").kv_cache_dtype == "bf16"
    assert parse("--kv-cache-dtype", "fp8_e5m2").kv_cache_dtype == "fp8_e5m2"
    assert parse().kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):  # argparse names the flag and its choices
        parse("--kv-cache-dtype", "fp8_e4m3")
    cfg = ModelConfig.from_dict(hf_model("gqa3-hd64").config.to_dict())
    monkeypatch.setattr("services.executor.factory.available_memory", lambda device: 1 << 30)
    exe = ExecutorConfig(max_running_requests=10_000)
    cpu = torch.device("cpu")
    f32, bf16, fp8 = (
        size_kv_pool(exe, cfg, d, cpu, 4096)
        for d in (torch.float32, torch.bfloat16, torch.float8_e5m2)
    )
    assert bf16 - 2 * f32 in (0, 1) and fp8 - 4 * f32 in (0, 1, 2, 3)  # budget // bytes per token
    per_token = KVPool.bytes_per_token(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16
    )
    assert per_token * 2 == KVPool.bytes_per_token(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32
    )


def steps(spans: bool) -> list[StepInput]:
    """A prefill of 80 tokens; three requests reusing 50, 33 and 0 of its slots (cached-prefix
    extends); then decode steps of all four, with the 33 shared positions of rows 0-2 sent as a
    shared-prefix span when `spans`."""
    prompt = list(range(3, 83))
    shared = [SharedPrefix(33, [0, 1, 2])] if spans else []
    out = [
        StepInput(
            1,
            add=[NewRequest(0, "a", GREEDY)],
            writes=[SlotWrite(0, 0, list(range(1, 101)))],
            slices=[Slice(0, 0, prompt)],
        ),
        StepInput(
            2,
            add=[NewRequest(r, f"r{r}", GREEDY) for r in (1, 2, 3)],
            writes=[
                SlotWrite(1, 0, list(range(1, 51)) + list(range(200, 250))),
                SlotWrite(2, 0, [*range(1, 34), *range(300, 320)]),
                SlotWrite(3, 0, list(range(400, 440))),
            ],
            slices=[
                Slice(1, 50, list(range(90, 120))),
                Slice(2, 33, [7]),
                Slice(3, 0, list(range(23))),
            ],
        ),
    ]
    lens = [80, 80, 34, 23]
    for i in range(3):
        slices = [Slice(r, n + i, [], True) for r, n in enumerate(lens)]
        out.append(StepInput(3 + i, slices=slices, shared_prefixes=shared))
    return out


def logits(engine, spans: bool = False) -> torch.Tensor:
    return torch.cat([engine.logits(s) for s in steps(spans)])


# (model dtype, KV cache dtype, bound on the largest logit change relative to the largest logit):
# K and V rounded to 8 significant bits move the logits by a few parts in a thousand (measured:
# up to 1e-3), to 3 bits by a few parts in a hundred (up to 2.6e-2)
NARROW_CACHES = [
    (torch.float32, torch.bfloat16, 2e-2),
    (torch.float32, torch.float8_e5m2, 8e-2),
    (torch.bfloat16, torch.float8_e5m2, 8e-2),
]


@pytest.mark.parametrize(("dtype", "kv_dtype", "bound"), NARROW_CACHES, ids=str)
@pytest.mark.parametrize("variant", ["llama", "gqa3-hd64"])
def test_logits_stay_close_to_the_models_own_cache(
    variant: str, dtype: torch.dtype, kv_dtype: torch.dtype, bound: float
) -> None:
    hf = hf_model(variant)
    full, narrow = engine_for(hf, dtype=dtype), engine_for(hf, dtype=dtype, kv_dtype=kv_dtype)
    assert full.pool.k[0].dtype == dtype and narrow.pool.k[0].dtype == kv_dtype
    a, b = logits(full), logits(narrow)
    assert a.shape == b.shape and torch.isfinite(b).all()
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    assert 0 < diff < bound * scale, (diff, scale)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@KERNELS
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e5m2], ids=str)
@pytest.mark.parametrize("spans", [False, True])
@pytest.mark.parametrize("extend", ["kernel", "sdpa"])
def test_kernels_give_the_pytorch_paths_logits(
    spans: bool, extend: str, kv_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a narrower pool under float32 queries: the C++ decode, extend and shared-prefix
    kernels (or SDPA for extends) against the PyTorch paths over the same stored K/V."""
    monkeypatch.setenv("RADIXSERVE_CPU_EXTEND_ATTENTION", extend)
    monkeypatch.setenv("RADIXSERVE_CPU_SHARED_PREFIX", "always")
    hf = hf_model("gqa3-hd64")
    kernel = engine_for(hf, kv_dtype=kv_dtype)
    assert kernel.attn.use_cpu_kernel
    assert kernel.attn.use_cpu_extend_kernel == (extend == "kernel")
    reference = engine_for(hf, kv_dtype=kv_dtype)
    reference.attn.use_cpu_kernel = reference.attn.use_cpu_extend_kernel = False
    reference.direct_decode = None
    a, b = logits(kernel, spans), logits(reference, spans)
    assert (a - b).abs().max().item() < 1e-4
