"""The float32 small-batch CPU linear kernels (AVX2 FMA) against their references, and the layers
that use them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.cpu import linear as cpu_linear
from kernels.cpu.build import cpu_flags
from services.executor.packed_linear import (
    F32_FALLBACK_ROWS,
    F32_SMALL_BATCH_ROWS,
    PackedLinear,
    PanelLinear,
    SmallBatchLinear,
    can_prepack,
    can_use_panels16,
    prepack_linears,
)
from services.executor.quantization import (
    F32_DEQUANT_ROWS,
    F32_PANEL_ROWS,
    Int4Linear,
    Int8Linear,
    pairs_kernel,
    quantize_int4,
    quantize_int8,
)

KERNEL = cpu_linear._linear_f32.load()
AVX512 = "avx512f" in cpu_flags().split()
pytestmark = pytest.mark.skipif(
    KERNEL is None, reason=f"kernel not built: {cpu_linear.f32_load_error()}"
)
# 8 rows and fewer run quantized weights through dot products, more through panel tiles of 16
# rows (full, partial and one of at most 8 rows): both sides
ROWS = [1, 2, 3, 7, 8, 9, 16, 33, 41]
# (K, N): odd channel counts too, and K of 64s plus a last 32 (how panel tiles expand weights)
SHAPES = [(32, 13), (64, 100), (160, 7), (576, 962), (1536, 576)]


def _close(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Within float32 rounding of the sum, scaled by the sum of the terms' magnitudes."""
    assert out.dtype == ref.dtype == torch.float32 and out.shape == ref.shape
    bound = x.abs() @ w.abs().t()
    assert ((out - ref).abs() <= 1e-5 * bound + 1e-6).all()


def _int4(n: int, k: int, group: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=gen) / 8
    zero = torch.randn(n, k // group, generator=gen) / 4
    return cpu_linear.pack_int4(q), scale, zero


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_f32_matches_reference(rows: int, k: int, n: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    out = cpu_linear.linear_f32(KERNEL, x, w, b)
    _close(out, cpu_linear.linear_f32_ref(x, w, b), x, w)


# Panel tiles are up to 6 rows, balanced (8 rows as 4 + 4): 1-6, 7-8 as two, 13 as three, more
PANEL_ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 16, 33, 64, 65]
# (K, N): any K (odd ones too), partial last panels of 13 and 962 % 16 = 2 channels
PANEL_SHAPES = [(7, 13), (64, 16), (100, 33), (576, 962), (1536, 576)]


@pytest.mark.parametrize("rows", PANEL_ROWS)
@pytest.mark.parametrize(("k", "n"), PANEL_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_f32_panels_match_reference(rows: int, k: int, n: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows * n + k + 1)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    panels = cpu_linear.pack_panels16(w)
    out = cpu_linear.linear_f32_panels(KERNEL, x, panels, n, b)
    _close(out, cpu_linear.linear_f32_ref(x, w, b), x, w)


@pytest.mark.parametrize("rows", PANEL_ROWS)
@pytest.mark.parametrize(("k", "n"), PANEL_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_panels_are_the_float32_panels_rounded_once(
    rows: int, k: int, n: int, bias: bool
) -> None:
    """Bfloat16 weights widened as they are read (exact), over x and bias widened too: bit for
    bit the float32 panels over the widened values, rounded to bfloat16 once, and within a
    bfloat16 rounding of the reference."""
    gen = torch.Generator().manual_seed(rows * n + k + 3)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) / k**0.5).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    panels = cpu_linear.pack_panels16(w)
    assert panels.dtype == torch.bfloat16
    out = cpu_linear.linear_bf16_f32_panels(KERNEL, x, panels, n, b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    wide = cpu_linear.linear_f32_panels(
        KERNEL, x.float(), cpu_linear.pack_panels16(w.float()), n, None if b is None else b.float()
    )
    assert torch.equal(out, wide.bfloat16())
    ref = cpu_linear.linear_bf16_ref(x, w, b).float()
    bound = x.float().abs() @ w.float().abs().t()
    assert ((out.float() - ref).abs() <= ref.abs() / 128 + 1e-5 * bound + 1e-6).all()


@pytest.mark.parametrize("rows", PANEL_ROWS)
@pytest.mark.parametrize(("k", "n"), PANEL_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_panels_match_reference(rows: int, k: int, n: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows * n + k + 2)
    x = torch.randn(rows, k, generator=gen)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 100
    b = torch.randn(n, generator=gen) if bias else None
    out = cpu_linear.linear_int8_f32_panels(KERNEL, x, cpu_linear.pack_panels16(q), scale, b)
    _close(out, cpu_linear.linear_int8_ref(x, q, scale, b), x, q.float() * scale[:, None])


@pytest.mark.parametrize("rows", [1, 5, 8, 13, 33, 65])
@pytest.mark.parametrize(("k", "n"), [(96, 20), (256, 13), (576, 962), (1536, 576)])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_panels_match_reference(rows: int, k: int, n: int, group: int) -> None:
    """Every group size, each group with its own scale and zero, with and without bias."""
    if k % group:
        pytest.skip("K not a multiple of the group")
    packed, scale, zero = _int4(n, k, group, rows + k + group + 1)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + 1))
    b = torch.randn(n) if rows % 2 else None
    panels = cpu_linear.pack_int4_panels16(cpu_linear.unpack_int4(packed), scale, zero)
    out = cpu_linear.linear_int4_f32_panels(KERNEL, x, panels, group, n, b)
    ref = cpu_linear.linear_int4_f32_ref(x, packed, scale, zero, group, b)
    weight = cpu_linear.int4_weight(*cpu_linear.block_int4(packed, scale, zero), group, n)
    _close(out, ref, x, weight)


@pytest.mark.parametrize("group", [32, 64])
def test_int4_panels_expand_each_weight_as_the_blocks_kernel(group: int) -> None:
    """One-hot rows read back every weight the panels multiply by: bit for bit the weight
    the blocks' kernel expands (q * scale + zero in one fused multiply-add)."""
    packed, scale, zero = _int4(37, 128, group, group)
    panels = cpu_linear.pack_int4_panels16(cpu_linear.unpack_int4(packed), scale, zero)
    weight = cpu_linear.int4_weight(*cpu_linear.block_int4(packed, scale, zero), group, 37)
    out = cpu_linear.linear_int4_f32_panels(KERNEL, torch.eye(128), panels, group, 37, None)
    assert torch.equal(out, weight.t())


@pytest.mark.parametrize("n", [1, 16, 17, 962])
def test_f32_panels_hold_16_channels_per_feature(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, 40, generator=gen)
    panels = cpu_linear.pack_panels16(w)
    blocks = (n + 15) // 16
    assert panels.shape == (blocks, 40 * 16) and panels.dtype == torch.float32
    view = panels.view(blocks, 40, 16)
    for c in {0, n // 2, n - 1}:
        assert torch.equal(view[c // 16, :, c % 16], w[c])  # channel c's features in its lane
    assert not view.transpose(1, 2).reshape(blocks * 16, 40)[n:].any()  # channels past N zero
    assert torch.equal(cpu_linear.unpack_panels16(panels, n), w)
    q = torch.randint(-127, 128, (n, 40), generator=gen, dtype=torch.int8)
    assert torch.equal(cpu_linear.unpack_panels16(cpu_linear.pack_panels16(q), n), q)


# (rows, K): 37 wide rows swept in row blocks (x of a block kept in L2: 12 rows at 4,096
# features); 5 to 16 rows (one to three tiles) taking a panel 128 features at a time, their sums
# kept between spans, a last span shorter when K is not a multiple of 128
ROWS_ALONE = [(37, 4096)] + [
    (m, k) for m in (5, 6, 7, 8, 12, 13, 16) for k in (100, 128, 576, 1536)
]


@pytest.mark.parametrize(("rows", "k"), ROWS_ALONE)
def test_f32_panels_rows_are_rows_alone(rows: int, k: int) -> None:
    """Every row of a batch is bit for bit the row alone (one row runs a panel in one pass),
    and close to the reference: over row blocks and over spans."""
    gen = torch.Generator().manual_seed(rows + k)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(40, k, generator=gen) / k**0.5
    b = torch.randn(40, generator=gen)
    panels = cpu_linear.pack_panels16(w)
    out = cpu_linear.linear_f32_panels(KERNEL, x, panels, 40, b)
    _close(out, cpu_linear.linear_f32_ref(x, w, b), x, w)
    alone = torch.cat([cpu_linear.linear_f32_panels(KERNEL, r, panels, 40, b) for r in x.split(1)])
    assert torch.equal(out, alone)


@pytest.mark.parametrize(("rows", "k"), ROWS_ALONE)
def test_bf16_panels_rows_are_rows_alone(rows: int, k: int) -> None:
    """The same for bfloat16 panels, whose spans are widened by their first tile for the others
    (and whose batches of 13 to 16 rows were expanded whole before): every row bit for bit the
    row alone, and the float32 panels over the widened values rounded once."""
    gen = torch.Generator().manual_seed(rows + k + 1)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = (torch.randn(40, k, generator=gen) / k**0.5).bfloat16()
    b = torch.randn(40, generator=gen).bfloat16()
    panels = cpu_linear.pack_panels16(w)
    out = cpu_linear.linear_bf16_f32_panels(KERNEL, x, panels, 40, b)
    alone = [cpu_linear.linear_bf16_f32_panels(KERNEL, r, panels, 40, b) for r in x.split(1)]
    assert torch.equal(out, torch.cat(alone))
    wide = cpu_linear.linear_f32_panels(
        KERNEL, x.float(), cpu_linear.pack_panels16(w.float()), 40, b.float()
    )
    assert torch.equal(out, wide.bfloat16())


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_matches_reference(rows: int, k: int, n: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows * n + k + 1)
    x = torch.randn(rows, k, generator=gen)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 127 / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    out = cpu_linear.linear_int8_f32(KERNEL, x, cpu_linear.block_int8(q), scale, b)
    ref = cpu_linear.linear_int8_ref(x, q, scale, b)
    _close(out, ref, x, q.float() * scale[:, None])


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("k", "n"), [(96, 20), (256, 13), (576, 962), (1536, 576)])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_matches_reference(rows: int, k: int, n: int, group: int) -> None:
    """Every group size, each group with its own scale and zero (so a group boundary read from
    the wrong group shows), with and without bias."""
    if k % group:
        pytest.skip("K not a multiple of the group")
    packed, scale, zero = _int4(n, k, group, rows + k + group)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    b = torch.randn(n) if rows % 2 else None
    blocks = cpu_linear.block_int4(packed, scale, zero)
    out = cpu_linear.linear_int4_f32(KERNEL, x, *blocks, group, n, b)
    ref = cpu_linear.linear_int4_f32_ref(x, packed, scale, zero, group, b)
    _close(out, ref, x, cpu_linear.int4_weight(*blocks, group, n))


@pytest.mark.parametrize("group", [32, 64, 256])
def test_int4_weight_expands_as_the_reference(group: int) -> None:
    """The kernel's expansion (one fused multiply-add) within a rounding of q * scale + zero."""
    packed, scale, zero = _int4(48, 512, group, group)
    blocks = cpu_linear.block_int4(packed, scale, zero)
    got = cpu_linear.int4_weight(*blocks, group, 48)
    ref = cpu_linear.int4_weight_ref(packed, scale, zero, group)
    q = cpu_linear.unpack_int4(packed).float().view(48, -1, group)
    terms = (q * scale[..., None]).abs() + zero.abs()[..., None]
    assert got.shape == (48, 512) and ((got - ref).abs() <= 2.0**-23 * terms.view(48, 512)).all()
    eye = torch.eye(512)  # a product with unit rows reads the multiplied weights back exactly
    for rows in (eye[:3], eye[100:116]):  # in registers, and through the buffer
        cols = cpu_linear.linear_int4_f32(KERNEL, rows, *blocks, group, 48, None)
        assert torch.equal(cols, (rows @ got.t()))


def test_int4_packing_is_gguf_block_order() -> None:
    """Byte i of each 32-feature block holds features i (low nibble) and i + 16 (high)."""
    q = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    packed = cpu_linear.pack_int4(q)
    assert packed.shape == (5, 48) and packed.dtype == torch.uint8
    for block in range(3):
        for i in range(16):
            byte = packed[:, block * 16 + i]
            assert torch.equal(byte & 15, q[:, block * 32 + i])
            assert torch.equal(byte >> 4, q[:, block * 32 + 16 + i])
    assert torch.equal(cpu_linear.unpack_int4(packed), q)


@pytest.mark.parametrize("n", [1, 7, 8, 962])
def test_blocks_hold_four_channels_of_32_features_in_a_row(n: int) -> None:
    """Block (b, j) is features 32j..32j+31 of channels 4b..4b+3 (past N: zero), for int8 and
    for int4's bytes, scales and zeros; unblocking gives the rows back."""
    gen = torch.Generator().manual_seed(n)
    q = torch.randint(-127, 128, (n, 96), generator=gen, dtype=torch.int8)
    blocks = cpu_linear.block_int8(q)
    assert blocks.shape == (-(-n // 4), 3, 4, 32) and blocks.is_contiguous()
    for c in range(blocks.shape[0] * 4):
        for j in range(3):
            want = q[c, 32 * j : 32 * j + 32] if c < n else torch.zeros(32, dtype=torch.int8)
            assert torch.equal(blocks[c // 4, j, c % 4], want)
    assert torch.equal(cpu_linear.unblock_int8(blocks, n), q)
    packed, scale, zero = _int4(n, 128, 64, n)
    qb, sb, zb = cpu_linear.block_int4(packed, scale, zero)
    assert qb.shape == (-(-n // 4), 4, 4, 16) and sb.shape == zb.shape == (-(-n // 4), 2, 4)
    assert torch.equal(qb[(n - 1) // 4, 3, (n - 1) % 4], packed[n - 1, 48:64])
    assert torch.equal(sb[(n - 1) // 4, 1, (n - 1) % 4], scale[n - 1, 1])
    back = cpu_linear.unblock_int4(qb, sb, zb, n)
    assert all(torch.equal(a, b) for a, b in zip(back, (packed, scale, zero), strict=True))


@pytest.mark.parametrize(
    "kind", ["f32", "f32 panels", "bf16 panels", "int8", "int8 panels", "int4", "int4 panels"]
)
@pytest.mark.parametrize(("k", "n"), [(576, 300), (160, 301)])  # and a partial block and panel
def test_a_row_does_not_depend_on_its_batch(kind: str, k: int, n: int) -> None:
    """Each row's sum runs in the same order whatever else is in the batch, whether it goes
    through the dot products (few rows) or the panel tiles (more), or through packed panels in
    tiles of up to 6 rows: bit for bit."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(37, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    q = cpu_linear.block_int8(torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8))
    scale = torch.rand(n, generator=gen) / 100
    int4 = cpu_linear.block_int4(*_int4(n, k, 32, 3))

    panels = cpu_linear.pack_panels16(w)
    bf16_panels = cpu_linear.pack_panels16(w.bfloat16())
    q_panels = cpu_linear.pack_panels16(cpu_linear.unblock_int8(q, n))
    packed, s4, z4 = _int4(n, k, 32, 3)
    int4_panels = cpu_linear.pack_int4_panels16(cpu_linear.unpack_int4(packed), s4, z4)

    def apply(rows: torch.Tensor) -> torch.Tensor:
        if kind == "f32":
            return cpu_linear.linear_f32(KERNEL, rows, w, None)
        if kind == "f32 panels":
            return cpu_linear.linear_f32_panels(KERNEL, rows, panels, n, None)
        if kind == "bf16 panels":
            return cpu_linear.linear_bf16_f32_panels(KERNEL, rows.bfloat16(), bf16_panels, n, None)
        if kind == "int8 panels":
            return cpu_linear.linear_int8_f32_panels(KERNEL, rows, q_panels, scale, None)
        if kind == "int4 panels":
            return cpu_linear.linear_int4_f32_panels(KERNEL, rows, int4_panels, 32, n, None)
        if kind == "int8":
            return cpu_linear.linear_int8_f32(KERNEL, rows, q, scale, None)
        return cpu_linear.linear_int4_f32(KERNEL, rows, *int4, 32, n, None)

    alone = torch.cat([apply(x[i : i + 1]) for i in range(37)])
    for m in (2, 3, 8, 9, 15, 16, 17, 24, 37):  # tiles of 16 rows, full and partial
        assert torch.equal(apply(x[:m]), alone[:m]), f"{m} rows"


@pytest.mark.parametrize("kind", ["int8", "int8 panels", "int4", "int4 panels"])
@pytest.mark.parametrize(
    ("rows", "k", "n"),
    # 300 rows, and 2 of a head's 49,152 channels: converted by torch, not in the kernel
    [(r, k, n) for r in (1, 2, 3, 8, 9, 40, 300) for k, n in ((576, 962), (1536, 576))]
    + [(1, 64, 49152), (2, 64, 49152)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_kernels_take_bfloat16_and_round_the_float32_sums_once(
    kind: str, rows: int, k: int, n: int, bias: bool
) -> None:
    """bfloat16 x gives, bit for bit, the float32 result over x widened, rounded to bfloat16 once:
    small calls convert in the kernel, large ones (rows x max(K, N) above 65,536) with torch."""
    gen = torch.Generator().manual_seed(rows * 7 + k)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 100
    b = torch.randn(n, generator=gen) if bias else None
    packed, s4, z4 = _int4(n, k, 32, rows)
    if kind == "int8":
        blocks = cpu_linear.block_int8(q)
        out, wide = (
            cpu_linear.linear_int8_f32(KERNEL, v, blocks, scale, b) for v in (x, x.float())
        )
    elif kind == "int8 panels":
        panels = cpu_linear.pack_panels16(q)
        out, wide = (
            cpu_linear.linear_int8_f32_panels(KERNEL, v, panels, scale, b) for v in (x, x.float())
        )
    elif kind == "int4":
        blocks4 = cpu_linear.block_int4(packed, s4, z4)
        out, wide = (
            cpu_linear.linear_int4_f32(KERNEL, v, *blocks4, 32, n, b) for v in (x, x.float())
        )
    else:
        panels4 = cpu_linear.pack_int4_panels16(cpu_linear.unpack_int4(packed), s4, z4)
        out, wide = (
            cpu_linear.linear_int4_f32_panels(KERNEL, v, panels4, 32, n, b) for v in (x, x.float())
        )
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    assert torch.equal(out, wide.bfloat16())


def test_shapes_dtypes_and_groups_it_cannot_take_are_refused() -> None:
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_linear.linear_f32(KERNEL, torch.randn(2, 48), torch.randn(8, 48), None)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_linear.linear_f32(KERNEL, torch.randn(2, 64).bfloat16(), torch.randn(8, 64), None)
    with pytest.raises(RuntimeError, match="features"):
        cpu_linear.linear_f32(KERNEL, torch.randn(2, 64), torch.randn(8, 32), None)
    q = torch.zeros(8, 64, dtype=torch.int8)
    blocks8 = cpu_linear.block_int8(q)
    with pytest.raises(RuntimeError, match="blocks"):  # rows of q, or blocks of 8 for 3 scales
        cpu_linear.linear_int8_f32(KERNEL, torch.randn(2, 64), q, torch.ones(8), None)
    with pytest.raises(RuntimeError, match="blocks"):
        blocks = cpu_linear.block_int8(q)
        cpu_linear.linear_int8_f32(KERNEL, torch.randn(2, 64), blocks, torch.ones(3), None)
    with pytest.raises(RuntimeError, match="scale"):
        cpu_linear.linear_int8_f32(KERNEL, torch.randn(2, 64), blocks, torch.ones(16)[::2], None)
    packed, scale, zero = _int4(8, 96, 32, 0)
    blocks = cpu_linear.block_int4(packed, scale, zero)
    with pytest.raises(RuntimeError, match="power of 2"):
        cpu_linear.linear_int4_f32(KERNEL, torch.randn(2, 96), *blocks, 48, 8, None)
    with pytest.raises(RuntimeError, match="blocks"):
        cpu_linear.linear_int4_f32(KERNEL, torch.randn(2, 96), packed, *blocks[1:], 32, 8, None)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_linear.linear_int4_f32(KERNEL, torch.randn(2, 96), *blocks, 32, 8, torch.ones(3))
    panels = cpu_linear.pack_panels16(torch.randn(20, 48))
    with pytest.raises(RuntimeError, match="panels must be"):  # 20 channels, not 40
        cpu_linear.linear_f32_panels(KERNEL, torch.randn(2, 48), panels, 40, None)
    with pytest.raises(RuntimeError, match="panels must be"):  # 48 features, not 64
        cpu_linear.linear_f32_panels(KERNEL, torch.randn(2, 64), panels, 20, None)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_linear.linear_f32_panels(KERNEL, torch.randn(2, 48).double(), panels, 20, None)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_linear.linear_f32_panels(KERNEL, torch.randn(2, 48), panels, 20, torch.ones(19))
    q_panels = cpu_linear.pack_panels16(torch.ones(20, 48, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="panels must be"):  # int8 panels for float32 weights
        cpu_linear.linear_f32_panels(KERNEL, torch.randn(2, 48), q_panels, 20, None)
    p4 = cpu_linear.pack_int4_panels16(
        torch.zeros(20, 64, dtype=torch.uint8), *[torch.ones(20, 2)] * 2
    )
    with pytest.raises(RuntimeError, match="group size"):  # 64 features in groups of 48
        cpu_linear.linear_int4_f32_panels(KERNEL, torch.randn(2, 64), p4, 48, 20, None)
    with pytest.raises(RuntimeError, match="scale must be"):  # 2 groups of 32, not 4 of 16
        cpu_linear.linear_int4_f32_panels(KERNEL, torch.randn(2, 64), p4, 16, 20, None)
    with pytest.raises(RuntimeError, match="panels must be"):  # 64 features, not 128
        cpu_linear.linear_int4_f32_panels(KERNEL, torch.randn(2, 128), p4, 32, 20, None)
    with pytest.raises(RuntimeError, match="panels must be"):  # 20 scales for 20 channels, not 40
        cpu_linear.linear_int8_f32_panels(
            KERNEL, torch.randn(2, 48), q_panels, torch.ones(40), None
        )
    bf16_panels = cpu_linear.pack_panels16(torch.randn(20, 48).bfloat16())
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_linear.linear_bf16_f32_panels(KERNEL, torch.randn(2, 48), bf16_panels, 20, None)
    with pytest.raises(RuntimeError, match="panels must be"):  # float32 panels, bfloat16 x
        cpu_linear.linear_bf16_f32_panels(KERNEL, torch.randn(2, 48).bfloat16(), panels, 20, None)
    with pytest.raises(RuntimeError, match="panels must be"):  # bfloat16 panels, float32 x
        cpu_linear.linear_f32_panels(KERNEL, torch.randn(2, 48), bf16_panels, 20, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):  # the quantized kernels
        cpu_linear.linear_int8_f32(KERNEL, torch.randn(2, 64).half(), blocks8, torch.ones(8), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_linear.linear_int4_f32_panels(KERNEL, torch.randn(2, 64).double(), p4, 32, 20, None)
    assert cpu_linear.available_f32(torch.randn(2, 48), 48) is None  # the layers fall back
    assert cpu_linear.available_f32(torch.randn(2, 64).bfloat16(), 64) is None
    assert cpu_linear.available_f32(torch.randn(2, 64).bfloat16(), 64, bfloat16=True) is KERNEL
    assert cpu_linear.available_f32(torch.randn(2, 64).half(), 64, bfloat16=True) is None


def test_disabled_kernels_are_not_offered(monkeypatch) -> None:
    x = torch.randn(1, 64)
    assert cpu_linear.available_f32(x, 64) is KERNEL
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    assert cpu_linear.available_f32(x, 64) is None


@pytest.mark.parametrize("bias", [False, True])
def test_small_batch_linear_runs_the_kernel_on_few_rows_and_f_linear_on_more(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(576, 962, bias=bias)
    layer = SmallBatchLinear(linear)
    x = torch.randn(3, F32_FALLBACK_ROWS + 3, 576)  # leading dims are flattened
    for rows in (1, F32_FALLBACK_ROWS):
        part = x[0, :rows]
        out = layer(part)
        assert torch.equal(out, cpu_linear.linear_f32(KERNEL, part, linear.weight, linear.bias))
        _close(out, nn.functional.linear(part, linear.weight, linear.bias), part, linear.weight)
    assert torch.equal(layer(x), nn.functional.linear(x, linear.weight, linear.bias))


ONEDNN_F32 = can_prepack(torch.float32, torch.device("cpu"))


@pytest.mark.skipif(not ONEDNN_F32, reason="torch without oneDNN")
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_runs_the_kernel_on_few_float32_rows_and_onednn_on_more(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(576, 962, bias=bias)
    layer = PackedLinear(linear)
    assert layer.plain.data_ptr() == linear.weight.data_ptr()  # the kernel reads the loaded weight
    x = torch.randn(3, F32_SMALL_BATCH_ROWS + 3, 576)  # leading dims are flattened
    for rows in (1, F32_SMALL_BATCH_ROWS):
        part = x[0, :rows]
        out = layer(part)
        assert torch.equal(out, cpu_linear.linear_f32(KERNEL, part, linear.weight, linear.bias))
    for part in (x[0, : F32_SMALL_BATCH_ROWS + 1], x):
        out = layer(part)
        flat = part.reshape(-1, 576)
        packed = torch.ops.mkldnn._linear_pointwise(flat, layer.weight, layer.bias, "none", [], "")
        assert torch.equal(out.reshape(-1, 962), packed)
        with torch.no_grad():
            ref = nn.functional.linear(part, linear.weight, linear.bias)
        _close(out, ref, part, linear.weight)


@pytest.mark.skipif(not ONEDNN_F32, reason="torch without oneDNN")
def test_packed_float32_linears_fall_back_to_onednn_when_the_kernels_are_disabled(
    monkeypatch,
) -> None:
    torch.manual_seed(1)
    linear = nn.Linear(576, 100)
    layer = PackedLinear(linear)
    x = torch.randn(2, 576)
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    out = layer(x)
    packed = torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    assert torch.equal(out, packed)
    # disabled at load time: no plain weight is kept, oneDNN runs every batch
    late = PackedLinear(linear)
    assert late.plain is None
    monkeypatch.delenv("RADIXSERVE_DISABLE_CPU_KERNELS")
    assert torch.equal(late(x), packed)


@pytest.mark.skipif(not ONEDNN_F32, reason="torch without oneDNN")
def test_packed_float32_linears_the_kernel_cannot_take_keep_no_plain_weight() -> None:
    torch.manual_seed(2)
    linear = nn.Linear(100, 40)  # 100 input features: not a multiple of 32
    layer = PackedLinear(linear)
    assert layer.plain is None
    x = torch.randn(1, 100)
    with torch.no_grad():
        _close(layer(x), nn.functional.linear(x, linear.weight, linear.bias), x, linear.weight)


F32_PANELS = can_use_panels16(torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("bias", [False, True])
def test_f32_panel_linear_runs_the_panels_at_every_row_count(bias: bool) -> None:
    torch.manual_seed(3)
    linear = nn.Linear(576, 962, bias=bias)
    layer = PanelLinear(linear)
    assert layer.panels.shape == (61, 576 * 16)
    assert torch.equal(layer.unpacked_weight(), linear.weight)  # the panels are the weight
    x = torch.randn(3, 70, 576)  # leading dims are flattened
    for part in (x[0, :1], x[0, :8], x[0, :65], x):
        flat = part.reshape(-1, 576)
        out = layer(part)
        panels = cpu_linear.linear_f32_panels(KERNEL, flat, layer.panels, 962, linear.bias)
        assert torch.equal(out.reshape(-1, 962), panels)
        with torch.no_grad():
            _close(
                out.reshape(-1, 962),
                nn.functional.linear(flat, linear.weight, linear.bias),
                flat,
                linear.weight,
            )


def test_f32_panel_linears_multiply_the_unpacked_weight_when_the_kernels_are_disabled(
    monkeypatch,
) -> None:
    torch.manual_seed(4)
    linear = nn.Linear(100, 40)  # any width
    layer = PanelLinear(linear)
    x = torch.randn(3, 100)
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    with torch.no_grad():
        assert torch.equal(layer(x), nn.functional.linear(x, linear.weight, linear.bias))


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_panel_linear_runs_the_bf16_panels_at_every_row_count(bias: bool, monkeypatch) -> None:
    torch.manual_seed(5)
    linear = nn.Linear(576, 962, bias=bias).bfloat16()
    layer = PanelLinear(linear)
    assert layer.panels.dtype == torch.bfloat16 and layer.panels.shape == (61, 576 * 16)
    assert torch.equal(layer.unpacked_weight(), linear.weight)
    x = torch.randn(2, 70, 576).bfloat16()
    for part in (x[0, :1], x[0, :8], x[0, :65], x):
        flat = part.reshape(-1, 576)
        out = layer(part)
        assert out.dtype == torch.bfloat16 and out.shape == (*part.shape[:-1], 962)
        panels = cpu_linear.linear_bf16_f32_panels(KERNEL, flat, layer.panels, 962, linear.bias)
        assert torch.equal(out.reshape(-1, 962), panels)
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")  # F.linear over the unpacked weight
    with torch.no_grad():
        flat = x[0, :3]
        assert torch.equal(layer(flat), nn.functional.linear(flat, linear.weight, linear.bias))


@pytest.mark.skipif("avx512f" in cpu_flags().split(), reason="AVX-512 CPUs keep oneDNN")
def test_a_bfloat16_model_without_avx512_gets_panel_linears() -> None:
    """Where torch has no bfloat16 GEMM of oneDNN's, every bfloat16 linear (a tied head too)
    becomes a PanelLinear over bfloat16 panels; the embedding keeps its own weight."""
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 32), nn.Linear(32, 10, bias=False))
    model = model.bfloat16()
    head = model[2].weight.detach().clone()
    assert can_use_panels16(torch.bfloat16, torch.device("cpu"))
    assert prepack_linears(model) == 2
    assert [type(m) for m in model] == [nn.Embedding, PanelLinear, PanelLinear]
    assert model[2].panels.dtype == torch.bfloat16
    assert torch.equal(model[2].unpacked_weight(), head)
    assert dict(model.named_parameters()).keys() == {"0.weight"}
    x = torch.randint(0, 10, (3,))
    with torch.no_grad():
        hidden = model[0](x)
        ref = cpu_linear.linear_bf16_ref(hidden, model[1].unpacked_weight(), model[1].bias)
        out = model[1](hidden)
        assert out.dtype == torch.bfloat16
        assert ((out.float() - ref.float()).abs() <= ref.float().abs() / 128 + 1e-3).all()


def test_a_float32_model_gets_linears_sharing_its_weights() -> None:
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 32), nn.Linear(32, 10, bias=False))
    model[2].weight = nn.Parameter(torch.randn(10, 32))
    head = model[2].weight
    assert prepack_linears(model) == 2
    assert ("avx512f" not in cpu_flags().split()) == F32_PANELS  # the kernel is built here
    kind = PanelLinear if F32_PANELS else PackedLinear if ONEDNN_F32 else SmallBatchLinear
    assert [type(m) for m in model] == [nn.Embedding, kind, kind]
    # not copied: a tied embedding keeps sharing the weight the small-batch kernel reads
    if F32_PANELS:  # the panels are the layers' only weights; the embedding keeps its own
        assert torch.equal(model[2].unpacked_weight(), head)
        assert dict(model.named_parameters()).keys() == {"0.weight"}
    elif ONEDNN_F32:
        assert model[2].plain.data_ptr() == head.data_ptr()
        assert dict(model.named_parameters()).keys() == {"0.weight"}
    else:
        assert model[2].weight is head
        names = {"0.weight", "1.weight", "1.bias", "2.weight"}
        assert dict(model.named_parameters()).keys() == names


@pytest.mark.parametrize(
    "rows",
    [1, F32_PANEL_ROWS - 1, F32_PANEL_ROWS, 40, F32_DEQUANT_ROWS - 1, F32_DEQUANT_ROWS + 7],
)
def test_int4_linear_in_float32_runs_the_kernel_then_the_float_gemm(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(208, 576, generator=gen) / 24
    layer = Int4Linear(*quantize_int4(w, 64, torch.float32), 64, torch.randn(208))
    assert layer.layout == "fma" and layer.qweight.shape == (52, 18, 4, 16)
    x = torch.randn(rows, 576, generator=gen)
    out = layer(x)
    ref = nn.functional.linear(x, layer.dequantize(), layer.bias)
    _close(out, ref, x, layer.dequantize())
    if rows < F32_PANEL_ROWS:  # the blocks' dot products
        kernel = cpu_linear.linear_int4_f32(
            KERNEL, x, layer.qweight, layer.scale, layer.zero, 64, 208, layer.bias
        )
        assert torch.equal(out, kernel)
    elif rows < F32_DEQUANT_ROWS:  # the panels, expanding the same weights
        panels = cpu_linear.linear_int4_f32_panels(KERNEL, x, layer.panels, 64, 208, layer.bias)
        assert torch.equal(out, panels)


@pytest.mark.parametrize("rows", [1, F32_PANEL_ROWS - 1, F32_PANEL_ROWS, 40, F32_DEQUANT_ROWS - 1])
def test_int8_linear_in_float32_runs_the_kernel_below_the_float_gemm(rows: int) -> None:
    torch.manual_seed(rows)
    layer = Int8Linear.from_float(torch.randn(962, 576) / 24, torch.randn(962), torch.float32)
    x = torch.randn(rows, 576)
    out = layer(x)
    assert layer.layout == "blocks" and layer.qweight.shape == (241, 18, 4, 32)
    if rows < F32_PANEL_ROWS:  # the blocks' dot products
        expect = cpu_linear.linear_int8_f32(KERNEL, x, layer.qweight, layer.scale, layer.bias)
    else:  # the panels
        expect = cpu_linear.linear_int8_f32_panels(KERNEL, x, layer.panels, layer.scale, layer.bias)
    assert torch.equal(out, expect)
    q = cpu_linear.unblock_int8(layer.qweight, 962)
    _close(out, cpu_linear.linear_int8_ref(x, q, layer.scale, layer.bias), x, layer.dequantize())


@pytest.mark.parametrize("rows", [1, F32_DEQUANT_ROWS + 3])
def test_int8_blocks_run_the_float_gemm_when_the_kernels_are_disabled(rows: int, monkeypatch):
    """A layer built in blocks still answers (through the float GEMM) after
    RADIXSERVE_DISABLE_CPU_KERNELS=1, with the weight it was built with."""
    torch.manual_seed(rows)
    w = torch.randn(201, 576) / 24
    layer = Int8Linear.from_float(w, torch.randn(201), torch.float32)
    assert layer.layout == "blocks"
    x = torch.randn(rows, 576)
    with_kernel = layer(x)
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    assert layer.direct(x) is None
    out = layer(x)
    ref = nn.functional.linear(x, layer.dequantize(), layer.bias)
    _close(out, ref, x, layer.dequantize())
    _close(out, with_kernel, x, layer.dequantize())
    assert Int8Linear.from_float(w, None, torch.float32).layout == "rows"
    assert Int8Linear.from_float(w, None, torch.bfloat16).layout == "rows"


def test_int4_layers_keep_torchs_packing_where_the_kernel_may_not_run(monkeypatch) -> None:
    """bfloat16 runs the float32 kernel without AVX-512 and our AVX-512 BF16 kernel where the
    CPU has it; torch's kernel otherwise, for float16, and wherever the kernels are disabled."""
    w = torch.randn(64, 128)
    if not AVX512:
        bf16 = "fma"
    else:
        bf16 = "pairs" if pairs_kernel(torch.bfloat16, 128) else "torch"
    assert Int4Linear.from_float(w, None, 32, torch.bfloat16).layout == bf16
    assert Int4Linear.from_float(w, None, 32, torch.float16).layout == "torch"
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    assert Int4Linear.from_float(w, None, 32, torch.bfloat16).layout == "torch"
    layer = Int4Linear.from_float(w, None, 32, torch.float32)
    assert layer.layout == "torch" and hasattr(layer, "scales_and_zeros")
    x = torch.randn(3, 128)
    _close(layer(x), nn.functional.linear(x, layer.dequantize()), x, layer.dequantize())


@pytest.mark.skipif(AVX512, reason="AVX-512 CPUs run the AVX-512 bfloat16 kernels")
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, F32_PANEL_ROWS, 40, F32_DEQUANT_ROWS + 7])
def test_bfloat16_quantized_layers_without_avx512_compute_in_float32(
    method: str, rows: int, monkeypatch
) -> None:
    """Without AVX-512 a bfloat16 layer stores what a float32 one stores (blocks, panels, float32
    scales, zeros and bias) and gives the float32 layer's output over its widened input, rounded
    to bfloat16 once: through the kernels, the float GEMM (F32_DEQUANT_ROWS rows and more), and
    the float GEMM again when the kernels are disabled after it is built."""
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(208, 576, generator=gen) / 24
    bias = torch.randn(208, generator=gen).bfloat16()
    if method == "int8":
        q, scale = quantize_int8(w, torch.bfloat16)
        layer, wide = Int8Linear(q, scale, bias), Int8Linear(q, scale.float(), bias.float())
        assert layer.layout == "blocks" and layer.panels is not None
    else:
        q, scale, zero = quantize_int4(w, 32, torch.bfloat16)
        layer = Int4Linear(q, scale, zero, 32, bias)
        wide = Int4Linear(q, scale.float(), zero.float(), 32, bias.float())
        assert layer.layout == "fma" and layer.zero.dtype == torch.float32
    assert layer.scale.dtype == layer.bias.dtype == torch.float32
    x = torch.randn(2, rows, 576, generator=gen).bfloat16()
    expect = wide(x.float()).bfloat16()
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, rows, 208)
    assert torch.equal(out, expect)
    assert (layer.direct(x[0]) is None) == (rows >= F32_DEQUANT_ROWS)
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    assert layer.direct(x[0]) is None
    slow = layer(x)
    assert slow.dtype == torch.bfloat16
    ref = nn.functional.linear(x.float(), layer.dequantize(), layer.bias)
    assert ((slow.float() - ref).abs() <= ref.abs() / 128 + 1e-3).all()  # one bfloat16 rounding


@pytest.mark.parametrize("n", [4, 48])  # one block of 4 channels (a last chunk can be one), more
def test_int4_blocks_expand_the_same_when_the_kernels_are_disabled(n: int, monkeypatch) -> None:
    """`int4_weight` without the kernel (PyTorch over the unblocked bytes) gives the weight the
    kernel gives, within one rounding; an "fma" layer then answers through its float GEMM."""
    blocks = cpu_linear.block_int4(*_int4(n, 256, 32, n))
    with_kernel = cpu_linear.int4_weight(*blocks, 32, n)
    layer = Int4Linear.from_float(torch.randn(208, 576) / 24, torch.randn(208), 64, torch.float32)
    x = torch.randn(3, 576)
    before = layer(x)
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    without = cpu_linear.int4_weight(*blocks, 32, n)
    assert without.shape == (n, 256)
    assert ((without - with_kernel).abs() <= 2.0**-22 * with_kernel.abs() + 1e-7).all()
    assert layer.layout == "fma" and layer.direct(x) is None
    _close(layer(x), before, x, layer.dequantize())
