"""Weight-only quantization: the quantized linear layers against their references, the quantizers'
round-trip error, fallbacks, batch invariance, GGUF block decoding and the executor's flags.

Kernel vs reference: a layer's output y is compared with ref = x @ dequantize()^T computed in
float64 from the same (dtype-rounded) x. With bound = |x| @ |W|^T (the sum the error of any
summation order scales with), the tolerance is |y - ref| <= 1e-5 * bound for float32
activations and <= 2^-8 * (|ref| + bound) for bfloat16 ones (two bfloat16 roundings: the output,
and either the per-channel scaling or, on the many-row int4 path, the expanded weight).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from torch import nn

from kernels.cpu import linear as cpu_linear
from services.common.model_store import ModelNotFoundError, gguf_file
from services.executor.batch_invariant import BatchInvariantLinear
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, EngineLimits
from services.executor.factory import quantization
from services.executor.gguf_weights import decode_q4, gguf_name, hf_name, unpermute_rows
from services.executor.model_config import ModelConfig
from services.executor.quantization import (
    DEQUANT_ROWS,
    F32_DEQUANT_ROWS,
    INT4_DEQUANT_ROWS,
    INT4_PAIRS_DEQUANT_ROWS,
    Int4Linear,
    Int8Linear,
    Quantization,
    int4_layout,
    pairs_kernel,
    quantize_int4,
    quantize_int8,
    quantize_linears,
    quantized_bytes,
    traceable_quantized,
)
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput
from services.executor.weights import build_model, load_weights
from tests.executor.tiny import hf_model

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(16, 32), (48, 96), (64, 1536), (1728, 576)]  # (N, K); the last: SmolLM2's qkv-sized
# odd sizes, and every kernel and float path
ROWS = [
    1, 3, 17, 64, DEQUANT_ROWS, 79, 300,
    F32_DEQUANT_ROWS + 3, INT4_DEQUANT_ROWS + 44, INT4_PAIRS_DEQUANT_ROWS + 5,
]  # fmt: skip


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # rows of different magnitudes and offsets, like real layers
    w = torch.randn(n, k, generator=gen) * 0.05
    return w * torch.rand(n, 1, generator=gen) * 4 + torch.randn(n, 1, generator=gen) * 0.01


def assert_matches_reference(layer: nn.Module, x: torch.Tensor) -> None:
    y = layer(x).double()
    w = layer.dequantize().double()
    xd = x.double()
    ref, bound = xd @ w.t(), xd.abs() @ w.abs().t()
    if x.dtype == torch.float32:
        tol = 1e-5 * bound
    else:
        tol = 2.0**-8 * (ref.abs() + bound)
    worst = ((y - ref).abs() - tol).max().item()
    assert worst <= 0, f"{type(layer).__name__} {tuple(x.shape)} {x.dtype}: exceeds by {worst}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_matches_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    layer = Int8Linear.from_float(weight(*shape), None, dtype)
    gen = torch.Generator().manual_seed(1)
    for rows in ROWS:
        assert_matches_reference(layer, torch.randn(rows, shape[1], generator=gen).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_matches_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    for group in (32, 64, 128, 256):
        if shape[1] % group:
            continue
        layer = Int4Linear.from_float(weight(*shape), None, group, dtype)
        for rows in ROWS:
            assert_matches_reference(layer, torch.randn(rows, shape[1], generator=gen).to(dtype))


def test_int4_torch_layout_binds_torchs_kernel_below_its_row_limit() -> None:
    """A float16 int4 layer (torch's packing on every CPU) hands the
    direct decode loop torch's kernel bound to its weights: the same output as the module, bit
    for bit; none from the float-GEMM row limit on, nor for a layer with a bias (the module adds
    it)."""
    layer = Int4Linear.from_float(weight(64, 128), None, 32, torch.float16)
    assert layer.layout == "torch"
    gen = torch.Generator().manual_seed(3)
    for rows in (1, 5, INT4_DEQUANT_ROWS - 1):
        x = torch.randn(rows, 128, generator=gen).to(torch.float16)
        call = layer.direct(x)
        assert call is not None
        expected = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, layer.qweight, 32, layer.scales_and_zeros
        )
        assert torch.equal(call(x), expected) and torch.equal(layer(x), expected)
    many = torch.randn(INT4_DEQUANT_ROWS, 128, generator=gen).to(torch.float16)
    assert layer.direct(many) is None
    biased = Int4Linear.from_float(weight(64, 128), torch.ones(64), 32, torch.float16)
    x = torch.randn(3, 128, generator=gen).to(torch.float16)
    assert biased.direct(x) is None
    assert torch.equal(biased(x), layer(x) + biased.bias)


@pytest.mark.skipif(
    not pairs_kernel(torch.bfloat16, 128), reason="no AVX-512 BF16 int4 kernel on this CPU"
)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_pairs_layout_binds_our_kernel_below_its_row_limit(group: int) -> None:
    """On AVX-512 BF16 CPUs a bfloat16 int4 layer holds our kernel's packing, a scale and a zero
    per 32 features whatever its group, and hands the direct decode loop that kernel bound to
    its weights (the bias too): the module's output bit for bit; the float GEMM from
    INT4_PAIRS_DEQUANT_ROWS rows, over the same W, and at every row count once the kernels are
    disabled."""
    w, bias = weight(64, 256), torch.randn(64) / 10
    layer = Int4Linear.from_float(w, bias, group, torch.bfloat16)
    assert layer.layout == "pairs"
    q, scale, zero = quantize_int4(w, group, torch.bfloat16)
    chunks = group // 32
    assert torch.equal(cpu_linear.unpack_int4_pairs(layer.qweight), q)
    assert torch.equal(layer.scale, scale.repeat_interleave(chunks, dim=1))
    assert torch.equal(layer.zero, zero.repeat_interleave(chunks, dim=1))
    gen = torch.Generator().manual_seed(4)
    for rows in (1, 4, 5, INT4_PAIRS_DEQUANT_ROWS - 1):
        x = torch.randn(rows, 256, generator=gen).bfloat16()
        call = layer.direct(x)
        assert call is not None
        kernel = cpu_linear.available(x, 256)
        expected = cpu_linear.linear_int4(
            kernel, x, layer.qweight, layer.scale, layer.zero, layer.bias
        )
        assert torch.equal(call(x), expected) and torch.equal(layer(x), expected)
    many = torch.randn(INT4_PAIRS_DEQUANT_ROWS, 256, generator=gen).bfloat16()
    assert layer.direct(many) is None
    ref = torch.nn.functional.linear(many, layer.dequantize().bfloat16()) + layer.bias
    assert torch.equal(layer(many), ref)
    few = many[:3]
    expected = torch.nn.functional.linear(few, layer.dequantize().bfloat16()) + layer.bias
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
        assert layer.direct(few) is None
        assert torch.equal(layer(few), expected)


def test_int4_packed_layout_is_recognised() -> None:
    """The many-row int4 path and the fast dequantize need torch's packed layout."""
    assert int4_layout() is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_is_the_quantizers_formula(dtype: torch.dtype) -> None:
    """Independently of the kernels: the layers hold exactly what the quantizers produced."""
    w = weight(96, 192)
    q8, s8 = quantize_int8(w, dtype)
    assert torch.equal(Int8Linear(q8, s8).dequantize(), q8.float() * s8.float()[:, None])
    q4, s4, z4 = quantize_int4(w, 64, dtype)
    terms = (q4.float() - 8).view(96, 3, 64) * s4.float()[..., None], z4.float()[..., None]
    expect = (terms[0] + terms[1]).view(96, 192)
    got = Int4Linear(q4, s4, z4, 64).dequantize()
    ulps = 2.0**-23 * (terms[0].abs() + terms[1].abs()).view(96, 192)  # fused or not
    assert ((got - expect).abs() <= ulps).all()


def int4_step_bound(scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """Per element: half a step, plus, in bfloat16, the rounding of the stored scale and zero."""
    s, z = scale.float(), zero.float()
    slack = 1e-6 * (z.abs() + 8 * s) if scale.dtype == torch.float32 else 2**-8 * (z.abs() + 8 * s)
    return (s / 2 + slack).repeat_interleave(group, dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_within_half_a_step(dtype: torch.dtype) -> None:
    w = weight(64, 512, seed=3)
    q8, s8 = quantize_int8(w, dtype)
    err8 = (w - Int8Linear(q8, s8).dequantize()).abs()
    assert (err8 <= s8.float()[:, None] / 2 * (1 + 1e-6)).all()
    for group in (32, 128):
        q4, s4, z4 = quantize_int4(w, group, dtype)
        err4 = (w - Int4Linear(q4, s4, z4, group).dequantize()).abs()
        assert (err4 <= int4_step_bound(s4, z4, group)).all()


def test_values_on_the_grid_and_at_group_boundaries() -> None:
    """Weights on int4 grid points come back exactly, halfway ones within half a step; each
    group keeps its own scale, even next to a group a thousand times larger."""
    step, lo = 2.0**-6, -0.25
    grid = lo + step * torch.arange(16.0)  # one group of 32: the grid twice
    halves = torch.cat([grid[:1], lo + step * (torch.arange(15.0) + 0.5), grid[-1:]])
    halves = torch.cat([halves, grid[1:16]])  # endpoints set min and max
    big = torch.linspace(-40, 40, 32)
    w = torch.stack([torch.cat([grid, grid, big]), torch.cat([halves, big])]).repeat(8, 1)
    q, s, z = quantize_int4(w, 32, torch.float32)
    out = Int4Linear(q, s, z, 32).dequantize()
    assert torch.equal(out[0, :32], w[0, :32])
    assert (out[1, :32] - w[1, :32]).abs().max() <= step / 2 + 1e-7
    assert (out[0, 32:] - w[0, 32:]).abs().max() <= 80 / 15 / 2 + 1e-5
    # int8: the row maximum sits on the grid, and a value exactly halfway rounds to even
    row = torch.tensor([[127.0, 0.5, 1.5, -126.5] + [0.0] * 12]) * 2.0**-7
    q8, s8 = quantize_int8(row, torch.float32)
    assert q8[0, :4].tolist() == [127, 0, 2, -126]
    assert s8.item() == 2.0**-7


def test_odd_shapes_fall_back_to_float_and_are_named(caplog) -> None:
    model = nn.Sequential(
        nn.Linear(24, 32), nn.Linear(64, 40), nn.Linear(96, 48), nn.Linear(64, 64)
    )
    kept = quantize_linears(model, "int8", 32)
    assert kept == ["0"]  # K = 24 is not a multiple of 16
    assert [type(m) for m in model] == [nn.Linear, Int8Linear, Int8Linear, Int8Linear]
    model = nn.Sequential(
        nn.Linear(24, 32), nn.Linear(64, 40), nn.Linear(96, 48), nn.Linear(64, 64)
    )
    assert quantize_linears(model, "int4", 64) == ["0", "1", "2"]  # K % 64, N % 16, K % 64
    assert "1 linear layers stay torch.float32 (output features 40 not a multiple of 16): 1" in (
        caplog.text
    )
    with pytest.raises(ValueError, match="group size"):
        quantize_linears(model, "int4", 16)


def test_bias_is_kept() -> None:
    linear = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    for layer in (
        Int8Linear.from_float(linear.weight, linear.bias, torch.float32),
        Int4Linear.from_float(linear.weight, linear.bias, 32, torch.float32),
    ):
        ref = x @ layer.dequantize().t() + linear.bias
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_rows_are_batch_invariant_under_tiles(method: str, dtype: torch.dtype) -> None:
    """Wrapped for --enable-deterministic-inference, a row's output does not depend on the
    other rows of its batch, bit for bit."""
    w = weight(160, 576)
    inner = (
        Int8Linear.from_float(w, None, dtype)
        if method == "int8"
        else Int4Linear.from_float(w, None, 32, dtype)
    )
    layer = BatchInvariantLinear(inner)
    x = torch.randn(64, 576).to(dtype)
    full = layer(x)
    for a, b in [(0, 1), (5, 22), (3, 64), (40, 41)]:
        assert torch.equal(layer(x[a:b]), full[a:b])


def tiny_model(variant: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, ModelConfig]:
    hf = hf_model(variant)
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    model = build_model(cfg, cfg.max_position_embeddings, dtype, torch.device("cpu"))
    load_weights(model, hf.state_dict().items())
    return model, cfg


def logits(model: nn.Module, cfg: ModelConfig, ids: list[int]) -> torch.Tensor:
    """Logprobs of the first two greedy steps' top-5 alternatives, as one tensor."""
    engine = Engine(model, cfg, EngineLimits(64, 1, 64), torch.device("cpu"))
    params = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5)
    slots = list(range(1, len(ids) + 3))
    first = engine.run_step(
        StepInput(1, add=[NewRequest(0, "a", params)], writes=[SlotWrite(0, 0, slots)],
                  slices=[Slice(0, 0, ids)])
    )  # fmt: skip
    second = engine.run_step(StepInput(2, slices=[Slice(0, len(ids), [], use_last_sampled=True)]))
    return torch.tensor([first.tokens[0].top_logprobs, second.tokens[0].top_logprobs])


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_equals_its_dequantized_twin(variant: str, method: str) -> None:
    """A tiny model (tied head for llama, q/k/v biases for qwen2) quantized, against the same
    model whose linear weights are replaced by what the quantized layers dequantize to."""
    model, cfg = tiny_model(variant)
    embed = model.model.embed_tokens.weight.detach().clone()
    assert quantize_linears(model, method, 32) == []
    assert isinstance(model.lm_head, Int8Linear)  # int4 keeps the head at 8 bits
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert len(layers) == 4 * cfg.num_layers + 1
    assert isinstance(model.model.embed_tokens.weight, nn.Parameter)
    assert torch.equal(model.model.embed_tokens.weight, embed)  # the tied table stays float
    twin, _ = tiny_model(variant)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (Int8Linear, Int4Linear)):
                target = twin.get_submodule(name)
                if name == "lm_head" and cfg.tie_word_embeddings:
                    target.weight = nn.Parameter(module.dequantize())  # untie, as quantized
                else:
                    target.weight.copy_(module.dequantize())
    ids = [5, 17, 99, 3, 42, 7, 11]
    torch.testing.assert_close(logits(model, cfg, ids), logits(twin, cfg, ids), rtol=0, atol=1e-4)


def test_quantized_bytes_count_the_buffers() -> None:
    """Quantized values, scales and zeros, not the bias: float16 layers keep torch's layouts
    (2-byte scales and zeros)."""
    w = weight(64, 256)
    assert quantized_bytes(Int8Linear.from_float(w, torch.zeros(64), torch.float16)) == (
        64 * 256 + 64 * 2
    )
    assert quantized_bytes(Int4Linear.from_float(w, None, 32, torch.float16)) == (
        64 * 256 // 2 + 64 * 8 * 2 * 2
    )


# GGUF blocks


def gguf_rows(qtype: Q, n: int = 32, k: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(raw block bytes [n, k / 32 * block bytes], the gguf package's dequantization [n, k])."""
    rng = np.random.default_rng(int(qtype))
    w = (rng.standard_normal((n, k)) * 0.05 + rng.standard_normal((n, 1)) * 0.02).astype(np.float32)
    raw = quantize(w, qtype)
    return raw, dequantize(raw, qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_q4_blocks_decode_to_the_gguf_reference(qtype: Q) -> None:
    raw, ref = gguf_rows(qtype)
    q, scale, zero = decode_q4(torch.from_numpy(raw), qtype)
    assert int(q.max()) <= 15
    mine = (q.float() - 8).view(32, 4, 32) * scale[..., None] + zero[..., None]
    torch.testing.assert_close(mine.view(32, 128), torch.from_numpy(ref), rtol=0, atol=1e-6)
    layer = Int4Linear(q, scale, zero, 32)  # and through the layer, in float32
    torch.testing.assert_close(layer.dequantize(), torch.from_numpy(ref), rtol=0, atol=1e-6)


def test_q8_blocks_requantize_per_channel_within_half_a_step() -> None:
    """Q8_0 (a scale per 32 weights) goes to per-channel int8: within half the row's step."""
    _, ref = gguf_rows(Q.Q8_0)
    w = torch.from_numpy(ref)
    layer = Int8Linear.from_float(w, None, torch.float32)
    assert ((layer.dequantize() - w).abs() <= layer.scale[:, None] / 2 * (1 + 1e-6)).all()


def test_rope_rows_are_unpermuted_as_transformers_does() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = np.arange(9 * 64 * 3, dtype=np.float32).reshape(9 * 64, 3)
    for heads in (9, 3):
        part = rows[: heads * 64]
        ref = LlamaTensorProcessor()._reverse_permute_weights(part, heads, heads)
        assert np.array_equal(unpermute_rows(torch.from_numpy(part), heads).numpy(), ref)


def test_tensor_names_round_trip() -> None:
    pairs = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("lm_head.weight", "output.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("model.layers.7.self_attn.k_proj.weight", "blk.7.attn_k.weight"),
        ("model.layers.7.self_attn.q_proj.bias", "blk.7.attn_q.bias"),
        ("model.layers.12.mlp.down_proj.weight", "blk.12.ffn_down.weight"),
        ("model.layers.0.post_attention_layernorm.weight", "blk.0.ffn_norm.weight"),
    ]
    for hf, gg in pairs:
        assert gguf_name(hf) == gg
        assert hf_name(gg) == hf


# flags


def test_flags_are_validated(tmp_path) -> None:
    assert ExecutorConfig(quantization="int4", quantization_group_size=128).quantization == "int4"
    with pytest.raises(ValueError, match="--tp"):
        ExecutorConfig(quantization="int8", tp=2)
    with pytest.raises(ValueError, match="group-size"):
        ExecutorConfig(quantization_group_size=48)
    with pytest.raises(ValueError, match="GGUF"):
        Quantization("gguf")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="GGUF"):
        gguf_file(str(tmp_path))
    (tmp_path / "model.gguf").write_bytes(b"")
    assert gguf_file(str(tmp_path / "model.gguf")) == tmp_path / "model.gguf"
    quant = quantization(
        ExecutorConfig(quantization="gguf", model_path=str(tmp_path / "model.gguf"))
    )
    assert (quant.method, quant.gguf_path) == ("gguf", tmp_path / "model.gguf")


def test_quantization_refuses_other_devices_and_tensor_parallel_loads() -> None:
    from services.executor.parallel import Rank
    from services.executor.quantization import check_quantizable
    from services.executor.weights import load_model

    check_quantizable(torch.bfloat16, torch.device("cuda"))  # the Triton kernels
    with pytest.raises(ValueError, match="CPU or CUDA"):
        check_quantizable(torch.float32, torch.device("mps"))
    with pytest.raises(ValueError, match="--tp"):
        load_model(
            None, None, 8, torch.float32, torch.device("cpu"),  # type: ignore[arg-type]
            rank=Rank(0, 2), quantization=Quantization("int8"),
        )  # fmt: skip


@pytest.mark.skipif(
    not pairs_kernel(torch.bfloat16, 128), reason="no AVX-512 BF16 int4 kernel on this CPU"
)
@pytest.mark.parametrize("group", [32, 64])
def test_quantized_layers_for_torch_compile_take_torchs_layout(group: int) -> None:
    """torch.compile cannot trace our kernels: `traceable_quantized` re-packs those layers in
    torch's layouts, with the same q, scales and zeros, so they compute the same weight."""
    model = nn.Sequential(nn.Linear(128, 64, bias=False), nn.Linear(64, 32), nn.Linear(32, 48))
    model[0] = Int4Linear.from_float(weight(64, 128), None, group, torch.bfloat16)
    model[1] = Int4Linear.from_float(weight(32, 64), torch.randn(32), group, torch.bfloat16)
    model[2] = Int8Linear.from_float(weight(48, 32), torch.randn(48), torch.bfloat16)
    assert [layer.layout for layer in model] == ["pairs", "pairs", "panels"]
    before = [layer.dequantize() for layer in model]
    biases = [model[1].bias.clone(), model[2].bias.clone()]
    assert traceable_quantized(model) == 3
    assert [layer.layout for layer in model] == ["torch", "torch", "rows"]
    for layer, w in zip(model, before, strict=True):
        assert torch.equal(layer.dequantize(), w)
    assert torch.equal(model[1].bias, biases[0]) and torch.equal(model[2].bias, biases[1])
    assert traceable_quantized(model) == 0
