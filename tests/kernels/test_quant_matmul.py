"""The Triton weight-only int8 / int4 linear kernels against their references, and the quantized
layers' "triton" layout that runs them on CUDA devices."""

from __future__ import annotations

import pytest
import torch

from kernels import quant_matmul as qm
from kernels.cpu.linear import pack_int4
from services.executor import quantization
from services.executor.quantization import Int4Linear, Int8Linear, quantize_int4, quantize_int8

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# float32 sums in another order; in 16 bits one rounding of the output (the interpreter truncates
# float32 -> bfloat16 where a GPU rounds to nearest, so two ulps there)
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2**-6),
    torch.float16: dict(atol=2e-3, rtol=2**-9),
}
# (M, N, K): K = 48 and 80 end mid-block (32 inputs a step; int8 takes any multiple of 16)
SHAPES = [(1, 19, 64), (5, 70, 96), (16, 64, 128), (17, 130, 256), (64, 33, 64)]
INT8_SHAPES = [*SHAPES, (3, 19, 48), (9, 40, 80)]


def _rand(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "n", "k"), INT8_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_matches_reference(device, dtype, m, n, k, bias):
    gen = torch.Generator().manual_seed(m * n + k)
    x = _rand(m, k, gen=gen).to(dtype)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, generator=gen) / 64 / k**0.5).to(dtype)
    b = _rand(n, gen=gen).to(dtype) if bias else None
    args = [t.to(device) if t is not None else None for t in (x, q, scale, b)]

    out = qm.int8_linear(*args)

    assert out.shape == (m, n) and out.dtype == dtype
    ref = qm.int8_linear_ref(*args)
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("m", "n", "k", "group"),
    [(*shape, g) for shape in SHAPES for g in (32, 64, 128) if shape[2] % g == 0],
)
def test_int4_matches_reference_across_group_boundaries(device, dtype, m, n, k, group):
    gen = torch.Generator().manual_seed(m * n + k + group)
    x = _rand(m, k, gen=gen).to(dtype)
    q = torch.randint(0, 16, (n, k), generator=gen)
    # every group its own scale and zero, so a group read off by one shows
    scale = (torch.rand(n, k // group, generator=gen) / 8 / k**0.5).to(dtype)
    zero = (_rand(n, k // group, gen=gen) / 8 / k**0.5).to(dtype)
    b = _rand(n, gen=gen).to(dtype)
    packed = pack_int4(q)
    args = [t.to(device) for t in (x, packed, scale, zero)]

    out = qm.int4_linear(*args, group, b.to(device))

    ref = qm.int4_linear_ref(*args, group, b.to(device))
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCES[dtype])


def test_int4_weight_expands_pack_int4s_bytes_exactly():
    q = torch.arange(16).repeat(6, 4)  # [6, 64], every nibble
    scale, zero = torch.tensor([[0.5, 2.0]] * 6), torch.tensor([[1.0, -1.0]] * 6)
    w = qm.int4_weight(pack_int4(q), scale, zero, 32)
    assert torch.equal(w[:, :32], (q[:, :32] - 8) * 0.5 + 1.0)
    assert torch.equal(w[:, 32:], (q[:, 32:] - 8) * 2.0 - 1.0)


def test_empty_input_gives_an_empty_output(device):
    q = torch.zeros(8, 32, dtype=torch.int8, device=device)
    out = qm.int8_linear(torch.zeros(0, 32, device=device), q, torch.ones(8, device=device), None)
    assert out.shape == (0, 8)


def test_bad_inputs_are_refused(device):
    x = torch.randn(2, 64, device=device)
    q = torch.zeros(8, 64, dtype=torch.int8, device=device)
    s = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="x must be"):
        qm.int8_linear(x.long(), q, s, None)
    with pytest.raises(ValueError, match="q must be"):
        qm.int8_linear(x, q.to(torch.uint8), s, None)
    with pytest.raises(ValueError, match="q must be"):
        qm.int8_linear(x[:, :32], q, s, None)
    with pytest.raises(ValueError, match="scale must be"):
        qm.int8_linear(x, q, s.half(), None)
    with pytest.raises(ValueError, match="bias must be"):
        qm.int8_linear(x, q, s, torch.ones(9, device=device))
    packed = torch.zeros(8, 32, dtype=torch.uint8, device=device)
    sz = torch.ones(8, 2, device=device)
    with pytest.raises(ValueError, match="group size"):
        qm.int4_linear(x, packed, sz, sz, 48, None)
    with pytest.raises(ValueError, match="zero must be"):
        qm.int4_linear(x, packed, sz, sz[:, :1], 32, None)
    with pytest.raises(ValueError, match="bias must be"):
        qm.int8_linear(x, q, s, torch.ones(8, 2, device=device)[:, 0])


@pytest.fixture
def triton_layers(monkeypatch):
    """Quantized layers built here take the "triton" layout, as they do on a CUDA device."""
    monkeypatch.setattr(quantization, "triton_device", lambda t: True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_int8_layer_on_cuda_runs_the_triton_kernel(triton_layers, device, dtype):
    torch.manual_seed(0)
    q, scale = quantize_int8(torch.randn(70, 96) / 10, dtype)
    layer = Int8Linear(q, scale, torch.randn(70)).to(device)
    assert layer.layout == "triton" and torch.equal(layer.qweight.cpu(), q)
    x = torch.randn(2, 3, 96).to(dtype).to(device)  # leading dims are flattened

    out = layer(x)

    assert out.shape == (2, 3, 70)
    expected = qm.int8_linear(x.reshape(6, 96), layer.qweight, layer.scale, layer.bias)
    assert torch.equal(out.reshape(6, 70), expected)
    ref = torch.nn.functional.linear(x.float(), layer.dequantize().to(device), layer.bias.float())
    torch.testing.assert_close(out.float(), ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("group", [32, 64])
def test_int4_layer_on_cuda_runs_the_triton_kernel(triton_layers, device, group):
    torch.manual_seed(group)
    weight = torch.randn(64, 128) / 10
    q, scale, zero = quantize_int4(weight, group, torch.bfloat16)
    layer = Int4Linear(q, scale, zero, group).to(device)
    assert layer.layout == "triton"
    expected_w = (q.float() - 8) * scale.float().repeat_interleave(group, 1)
    expected_w += zero.float().repeat_interleave(group, 1)
    assert torch.equal(layer.dequantize().cpu(), expected_w)
    x = torch.randn(5, 128).bfloat16().to(device)

    out = layer(x)

    ref = qm.int4_linear_ref(x, layer.qweight, layer.scale, layer.zero, group, None)
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCES[torch.bfloat16])


def test_gguf_layers_on_cuda_take_the_triton_layout(triton_layers, device):
    """The bundled Q4_1 file's blocks become a "triton" int4 layer holding the file's weight
    (what the CPU's layouts apply too)."""
    from services.common.model_store import default_gguf_path
    from services.executor.gguf_weights import GGUFTensors, _quantized

    gguf = GGUFTensors(default_gguf_path(), num_heads=9, num_kv_heads=3)
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"]
    layer = _quantized(gguf, names, None, torch.bfloat16, torch.device(device))
    assert isinstance(layer, Int4Linear) and layer.layout == "triton"
    q, scale, zero = (torch.cat(p) for p in zip(*(gguf.int4(n) for n in names), strict=True))
    # W = (q - 8) * scale + zero per 32 inputs, scale and zero rounded to bfloat16
    expected = (q.float() - 8) * scale.bfloat16().float().repeat_interleave(32, 1)
    expected += zero.bfloat16().float().repeat_interleave(32, 1)
    assert torch.equal(layer.dequantize().cpu(), expected)
    x = torch.randn(3, 576).bfloat16().to(device)
    out = layer(x).float().cpu()
    ref = qm.int4_linear_ref(x, layer.qweight, layer.scale, layer.zero, 32, None).float().cpu()
    # real weights cancel: within a few bfloat16 roundings of the terms' magnitudes (W rounded
    # to bfloat16, the output rounded; the interpreter truncates where a GPU rounds)
    bound = x.float().abs().cpu() @ expected.abs().t()
    assert ((out - ref).abs() <= 2**-6 * bound).all()
