"""The small-batch CPU linear kernels against their references, and the layers that use them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.cpu import linear as cpu_linear
from services.executor import packed_linear, quantization
from services.executor.packed_linear import (
    AMX_MIN_ROWS,
    AMX_PANEL_ROWS,
    AMX_TILE_ROWS,
    HAS_AMX,
    SMALL_BATCH_ROWS,
    PackedLinear,
    amx_gemm,
    can_prepack,
)
from services.executor.quantization import Int8Linear, quantize_int8, quantized_bytes

KERNEL = cpu_linear._linear.load()
pytestmark = pytest.mark.skipif(
    KERNEL is None, reason=f"kernel not built: {cpu_linear.load_error()}"
)
AMX = cpu_linear.available_amx(torch.zeros(1, 32, dtype=torch.bfloat16), 32)
needs_amx = pytest.mark.skipif(AMX is None, reason="no AMX tiles here")
ROWS = [1, 2, 3, 4, 5, 7, 16, 33, 64]
SHAPES = [(32, 13), (32, 80), (64, 100), (576, 962), (1536, 576)]  # (K, N): odd channel counts too


def _ulp_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Within one bfloat16 rounding of the float32 sum (the kernel adds in another order)."""
    assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-3, rtol=2**-7)
    assert (out == ref).float().mean() > 0.9


@pytest.mark.parametrize("kernel", ["panels", pytest.param("amx", marks=needs_amx)])
@pytest.mark.parametrize("rows", [*ROWS, 6, 8, 13, 17, 24, 32, 48, 65, 100, 130, 530])
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_panels_match_reference(kernel: str, rows: int, k: int, n: int, bias: bool) -> None:
    """The AVX-512 kernel: row tiles of 1-8 rows, panels of 1-3 channel blocks (80 channels are
    2 + 3 blocks on two threads) and a last block of 1-16 lanes. The AMX kernel over the same
    panels: one x tile (up to 16 rows) or pairs of them, the last ones starting early where the
    tiles hold more rows than x, blocks of 1-4 and a last block of 1-16 lanes."""
    gen = torch.Generator().manual_seed(rows * n + k + (2 if kernel == "panels" else 5))
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) / k**0.5).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    panels = cpu_linear.pack_panels(KERNEL, w)
    if kernel == "panels":
        out = cpu_linear.linear_bf16_panels(KERNEL, x, panels, n, b)
    else:
        out = cpu_linear.linear_bf16_amx(AMX, x, panels, n, b)
    _ulp_close(out, cpu_linear.linear_bf16_ref(x, w, b))


@pytest.mark.parametrize("rows", [*ROWS, 6, 8, 13, 65])
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_panels_match_reference(rows: int, k: int, n: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows * n + k + 3)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, generator=gen) / 127 / k**0.5).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    out = cpu_linear.linear_int8_panels(KERNEL, x, cpu_linear.pack_panels(KERNEL, q), scale, b)
    _ulp_close(out, cpu_linear.linear_int8_ref(x, q, scale, b))


def test_panels_hold_pairs_of_features_of_16_channels() -> None:
    w = torch.arange(19 * 6, dtype=torch.float32).view(19, 6).bfloat16()
    panels = cpu_linear.pack_panels(KERNEL, w)
    assert panels.shape == (2, 6 * 16)
    for n in range(32):
        for k in range(6):
            expected = w[n, k] if n < 19 else 0.0  # channels past N are zero
            assert panels[n // 16, (k // 2) * 32 + 2 * (n % 16) + k % 2] == expected
    q = torch.arange(-57, 57, dtype=torch.int8).view(19, 6)
    q_panels = cpu_linear.pack_panels(KERNEL, q)
    assert q_panels.dtype == torch.int8 and q_panels.shape == (2, 6 * 16)
    for n in range(32):
        for k in range(6):
            expected = q[n, k] if n < 19 else 0
            assert q_panels[n // 16, (k // 2) * 32 + 2 * (n % 16) + k % 2] == expected


@pytest.mark.parametrize("rows", [1, 5, 7, 8, 13])
def test_int8_panels_convert_every_value_exactly(rows: int) -> None:
    """Unit rows pick single weights: with a scale of 1 the output is q itself, for every int8
    value, whether the first row tile alone reads the panel (up to 8 rows) or the later tiles
    read its converted copy."""
    k = 64
    q = torch.arange(-128, 128, dtype=torch.int8).repeat(19 * k // 256 + 1)[: 19 * k]
    q = q.view(19, k)[:, torch.randperm(k, generator=torch.Generator().manual_seed(rows))]
    panels = cpu_linear.pack_panels(KERNEL, q.contiguous())
    for start in range(0, k, rows):
        x = torch.eye(k)[start : start + rows].bfloat16()
        out = cpu_linear.linear_int8_panels(KERNEL, x, panels, torch.ones(19).bfloat16(), None)
        assert torch.equal(out, q[:, start : start + rows].t().bfloat16()), start


@pytest.mark.parametrize("kind", [pytest.param("amx", marks=needs_amx), "panels", "int8 panels"])
def test_a_row_does_not_depend_on_its_batch(kind: str) -> None:
    """Each row's sum runs in the same order whatever else is in the batch: bit for bit."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(37, 576, generator=gen).bfloat16()
    w = torch.randn(300, 576, generator=gen).bfloat16()
    q = torch.randint(-127, 128, (300, 576), generator=gen, dtype=torch.int8)
    scale = torch.rand(300, generator=gen).bfloat16() / 100
    panels, q_panels = cpu_linear.pack_panels(KERNEL, w), cpu_linear.pack_panels(KERNEL, q)

    def apply(rows: torch.Tensor) -> torch.Tensor:
        if kind == "amx":
            return cpu_linear.linear_bf16_amx(AMX, rows, panels, 300, None)
        if kind == "panels":
            return cpu_linear.linear_bf16_panels(KERNEL, rows, panels, 300, None)
        return cpu_linear.linear_int8_panels(KERNEL, rows, q_panels, scale, None)

    alone = torch.cat([apply(x[i : i + 1]) for i in range(37)])
    for m in (2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 37):
        assert torch.equal(apply(x[:m]), alone[:m]), f"{m} rows"


def test_shapes_and_dtypes_it_cannot_take_are_refused() -> None:
    x = torch.randn(2, 48).bfloat16()
    assert cpu_linear.available(x, 48) is None  # the layers fall back instead
    assert cpu_linear.available_amx(x, 48) is None
    with pytest.raises(RuntimeError, match="even"):
        cpu_linear.pack_panels(KERNEL, torch.randn(8, 33).bfloat16())
    panels = cpu_linear.pack_panels(KERNEL, torch.randn(20, 64).bfloat16())
    with pytest.raises(RuntimeError, match="blocks"):
        cpu_linear.linear_bf16_panels(KERNEL, torch.randn(2, 64).bfloat16(), panels, 33, None)
    with pytest.raises(RuntimeError, match="features"):
        cpu_linear.linear_bf16_panels(KERNEL, torch.randn(2, 32).bfloat16(), panels, 20, None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_linear.linear_bf16_panels(KERNEL, torch.randn(2, 64), panels, 20, None)
    with pytest.raises(RuntimeError, match="Char"):  # bfloat16 panels for the int8 kernel
        cpu_linear.linear_int8_panels(
            KERNEL, torch.randn(2, 64).bfloat16(), panels, torch.ones(20).bfloat16(), None
        )
    assert cpu_linear.available(torch.randn(2, 64), 64) is None


@needs_amx
def test_the_amx_kernel_refuses_shapes_and_dtypes_it_cannot_take() -> None:
    panels = cpu_linear.pack_panels(KERNEL, torch.randn(20, 64).bfloat16())
    with pytest.raises(RuntimeError, match="blocks"):
        cpu_linear.linear_bf16_amx(AMX, torch.randn(2, 64).bfloat16(), panels, 33, None)
    with pytest.raises(RuntimeError, match="features"):
        cpu_linear.linear_bf16_amx(AMX, torch.randn(2, 32).bfloat16(), panels, 20, None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_linear.linear_bf16_amx(AMX, torch.randn(2, 64), panels, 20, None)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_linear.linear_bf16_amx(
            AMX, torch.randn(2, 64).bfloat16(), panels, 20, torch.zeros(19).bfloat16()
        )
    odd = cpu_linear.pack_panels(KERNEL, torch.randn(20, 48).bfloat16())
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_linear.linear_bf16_amx(AMX, torch.randn(2, 48).bfloat16(), odd, 20, None)


def test_disabled_kernels_are_not_offered(monkeypatch) -> None:
    x = torch.randn(1, 64).bfloat16()
    assert cpu_linear.available(x, 64) is KERNEL
    assert cpu_linear.available_amx(x, 64) is AMX
    # refused: built, but the tiles not granted (the module is not offered then)
    assert cpu_linear.amx_refused() == (cpu_linear._linear_amx.load() is not None and AMX is None)
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    assert cpu_linear.available(x, 64) is None
    assert cpu_linear.available_amx(x, 64) is None


@pytest.mark.skipif(not can_prepack(torch.bfloat16, torch.device("cpu")), reason="no oneDNN")
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_runs_the_kernel_on_few_rows_and_onednn_on_more(
    monkeypatch, bias: bool
) -> None:
    """The AMX tiles from AMX_MIN_ROWS up to AMX_TILE_ROWS where the CPU has them, else the
    AVX-512 panels up to SMALL_BATCH_ROWS; oneDNN above."""
    torch.manual_seed(0)
    linear = nn.Linear(576, 962, bias=bias).bfloat16()
    layer = PackedLinear(linear)
    # leading dims are flattened
    x = torch.randn(3, max(AMX_TILE_ROWS, SMALL_BATCH_ROWS) + 3, 576).bfloat16()
    panels = cpu_linear.pack_panels(KERNEL, linear.weight)
    assert layer.plain is None and torch.equal(layer.panels, panels)  # the only other copy
    calls: list[int] = []
    tiles = cpu_linear.linear_bf16_amx

    def spy(
        kernel: object, x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        calls.append(x.shape[0])
        return tiles(kernel, x, panels, n, bias)

    monkeypatch.setattr(cpu_linear, "linear_bf16_amx", spy)
    for rows in (
        1,
        2,
        5,
        16,
        17,
        64,
        AMX_TILE_ROWS,
        AMX_TILE_ROWS + 1,
        SMALL_BATCH_ROWS,
        SMALL_BATCH_ROWS + 1,
    ):
        part = x[0, :rows]
        calls.clear()
        out = layer(part)
        on_tiles = AMX is not None and AMX_MIN_ROWS <= rows <= AMX_TILE_ROWS
        assert calls == ([rows] if on_tiles else []), rows
        if on_tiles:
            expected = tiles(AMX, part, panels, 962, linear.bias)
        elif rows <= SMALL_BATCH_ROWS and (rows <= AMX_PANEL_ROWS or not amx_gemm()):
            expected = cpu_linear.linear_bf16_panels(KERNEL, part, panels, 962, linear.bias)
        else:  # oneDNN: above the panels' rows, or on its own AMX kernels without the tiles
            expected = torch.ops.mkldnn._linear_pointwise(
                part, layer.weight, layer.bias, "none", [], ""
            )
        assert torch.equal(out, expected), rows
        _ulp_close(out, nn.functional.linear(part, linear.weight, linear.bias))
    # above AMX_TILE_ROWS and SMALL_BATCH_ROWS rows: oneDNN, bit for bit F.linear
    calls.clear()
    assert torch.equal(layer(x), nn.functional.linear(x, linear.weight, linear.bias))
    assert calls == []


@pytest.mark.skipif(not can_prepack(torch.bfloat16, torch.device("cpu")), reason="no oneDNN")
def test_a_narrowing_layer_stays_on_the_amx_tiles_at_any_row_count(monkeypatch) -> None:
    """in_features >= 2 x out_features (the MLP's down projection): the tiles at every row count
    where the CPU has them (oneDNN kept to one thread there), oneDNN above the small batches
    elsewhere; a layer that does not narrow twofold goes to oneDNN above AMX_TILE_ROWS. A spy on
    the tile kernel tells the paths apart (oneDNN runs on the same tiles and may round alike)."""
    calls: list[tuple[int, int]] = []
    tiles = cpu_linear.linear_bf16_amx

    def spy(
        kernel: object, x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        calls.append((x.shape[0], n))
        return tiles(kernel, x, panels, n, bias)

    monkeypatch.setattr(cpu_linear, "linear_bf16_amx", spy)
    torch.manual_seed(4)
    down = PackedLinear(nn.Linear(1536, 576, bias=False).bfloat16())
    wide = PackedLinear(nn.Linear(1024, 576, bias=False).bfloat16())
    rows = max(AMX_TILE_ROWS, SMALL_BATCH_ROWS) + 70
    for layer in (down, wide):
        calls.clear()
        x = torch.randn(rows, layer.in_features).bfloat16()
        onednn = torch.ops.mkldnn._linear_pointwise(x, layer.weight, None, "none", [], "")
        out = layer(x)
        if AMX is not None and layer is down:
            assert calls == [(rows, 576)]
            assert torch.equal(out, tiles(AMX, x, layer.panels, 576, None))
        else:
            assert calls == []
            assert torch.equal(out, onednn)
        _ulp_close(out, onednn)


@pytest.mark.skipif(not HAS_AMX, reason="no AMX on this CPU")
def test_the_amx_kernel_builds_where_the_cpu_has_amx() -> None:
    assert cpu_linear._linear_amx.load() is not None, cpu_linear._linear_amx.error


@pytest.mark.skipif(not can_prepack(torch.bfloat16, torch.device("cpu")), reason="no oneDNN")
@pytest.mark.parametrize("refused", [False, True])
def test_packed_linear_on_amx_without_the_tile_kernel_runs_the_panels(
    monkeypatch, refused: bool
) -> None:
    """A CPU with AMX whose tile kernel is not built: the AVX-512 panels up to AMX_PANEL_ROWS,
    oneDNN (on its own AMX kernels) above. Where Linux refused the process the tiles, oneDNN runs
    without them as well, and the panels run every small batch."""
    monkeypatch.setattr(packed_linear, "HAS_AMX", True)
    monkeypatch.setattr(cpu_linear, "available_amx", lambda x, in_features: None)
    monkeypatch.setattr(cpu_linear, "amx_refused", lambda: refused)
    torch.manual_seed(2)
    linear = nn.Linear(576, 100).bfloat16()
    layer = PackedLinear(linear)
    x = torch.randn(max(AMX_TILE_ROWS, SMALL_BATCH_ROWS) + 1, 576).bfloat16()
    for rows in (
        1,
        AMX_PANEL_ROWS,
        AMX_PANEL_ROWS + 1,
        AMX_TILE_ROWS,
        SMALL_BATCH_ROWS,
        SMALL_BATCH_ROWS + 1,
    ):
        part = x[:rows]
        if rows <= SMALL_BATCH_ROWS and (refused or rows <= AMX_PANEL_ROWS):
            expected = cpu_linear.linear_bf16_panels(KERNEL, part, layer.panels, 100, linear.bias)
        else:
            expected = torch.ops.mkldnn._linear_pointwise(
                part, layer.weight, layer.bias, "none", [], ""
            )
        assert torch.equal(layer(part), expected), rows


@pytest.mark.skipif(not can_prepack(torch.bfloat16, torch.device("cpu")), reason="no oneDNN")
def test_packed_bfloat16_linears_fall_back_to_onednn_when_the_kernels_are_disabled(
    monkeypatch,
) -> None:
    torch.manual_seed(1)
    layer = PackedLinear(nn.Linear(576, 100).bfloat16())
    x = torch.randn(2, 576).bfloat16()
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")  # after the layer was built
    packed = torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    assert torch.equal(layer(x), packed)


@pytest.mark.parametrize("rows", [1, 4, 16, 31, 80, 300])
def test_int8_linear_keeps_only_panels_and_runs_them_at_every_row_count(
    rows: int, monkeypatch
) -> None:
    """Without a row limit (CPUs without AMX; with AMX see the test below)."""
    monkeypatch.setattr(quantization, "INT8_PANEL_MAX_ROWS", None)
    torch.manual_seed(rows)
    weight = torch.randn(962, 576) / 24
    q, scale = quantize_int8(weight, torch.bfloat16)
    layer = Int8Linear(q, scale, torch.randn(962))
    assert layer.layout == "panels"
    assert torch.equal(layer.qweight, cpu_linear.pack_panels(KERNEL, q))  # the only int8 copy
    assert layer.panels is None and quantized_bytes(layer) == 61 * 16 * 576 + 962 * 2
    assert torch.equal(layer.dequantize(), q.float() * scale.float()[:, None])
    x = torch.randn(rows, 576).bfloat16()
    out = layer(x)
    assert torch.equal(
        out, cpu_linear.linear_int8_panels(KERNEL, x, layer.qweight, scale, layer.bias)
    )
    _ulp_close(out, cpu_linear.linear_int8_ref(x, q, scale, layer.bias))


@pytest.mark.parametrize(("blocks", "n"), [(1, 16), (1, 5), (3, 40), (61, 962)])
def test_int8_panels_convert_back_to_the_weight_exactly(blocks: int, n: int) -> None:
    q = torch.randint(-128, 128, (blocks * 16, 96), dtype=torch.int8)
    q[n:] = 0  # channels past N
    panels = cpu_linear.pack_panels(KERNEL, q[:n].contiguous())
    assert torch.equal(cpu_linear.unpack_panels(panels, n), q[:n])
    assert torch.equal(cpu_linear.int8_panels_to_bf16(KERNEL, panels, n), q[:n].bfloat16())
    if blocks > 1:  # a slice of blocks, as the float GEMM's chunks take them
        part = panels[1:3]
        assert torch.equal(cpu_linear.int8_panels_to_bf16(KERNEL, part, 20), q[16:36].bfloat16())
    with pytest.raises(RuntimeError, match="do not fit"):
        cpu_linear.int8_panels_to_bf16(KERNEL, panels, blocks * 16 + 1)


def test_int8_linear_reads_any_rows_of_its_panels() -> None:
    q, scale = quantize_int8(torch.randn(70, 64), torch.bfloat16)
    layer = Int8Linear(q, scale)
    assert layer.layout == "panels"
    for start, end in [(0, 70), (5, 40), (16, 17), (33, 70)]:
        assert torch.equal(layer._rows(start, end), q[start:end])


def test_int8_linear_with_amx_runs_the_float_gemm_from_its_row_limit(monkeypatch) -> None:
    """On CPUs with AMX, from INT8_PANEL_MAX_ROWS rows: oneDNN's GEMM over the converted panels."""
    monkeypatch.setattr(quantization, "INT8_PANEL_MAX_ROWS", 8)
    monkeypatch.setattr(quantization, "DEQUANT_CHUNK", 576 * 40)  # 31 chunks of 32 channels
    torch.manual_seed(1)
    q, scale = quantize_int8(torch.randn(962, 576) / 24, torch.bfloat16)
    layer = Int8Linear(q, scale, torch.randn(962))
    x = torch.randn(8, 576).bfloat16()
    assert layer.direct(x[:7]) is not None and layer.direct(x) is None
    expected = nn.functional.linear(x, q.bfloat16()) * scale + layer.bias
    _ulp_close(layer(x), expected)


def test_int8_linear_with_kernels_disabled_multiplies_the_unpacked_weight(monkeypatch) -> None:
    torch.manual_seed(0)
    q, scale = quantize_int8(torch.randn(962, 576) / 24, torch.bfloat16)
    layer = Int8Linear(q, scale, None)
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    monkeypatch.setattr(quantization, "DEQUANT_CHUNK", 576 * 40)  # 31 chunks of 32 channels
    x = torch.randn(3, 576).bfloat16()
    _ulp_close(layer(x), nn.functional.linear(x, q.bfloat16()) * scale)


INT4_SHAPES = [(64, 13), (128, 100), (576, 962), (1536, 576)]  # (K, N)
INT4_DIRECT_ROWS = 4  # the kernel scales each chunk up to this many rows, then expands W


def _int4_operands(rows: int, k: int, n: int, bias: bool, seed: int) -> tuple[torch.Tensor, ...]:
    """x, q [N, K] in [0, 15], packed q, scale and zero [N, K/32] (magnitudes and offsets of a
    real layer's groups), bias or None."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = ((torch.rand(n, k // 32, generator=gen) + 0.1) / 15 / k**0.5).bfloat16()
    zero = (torch.randn(n, k // 32, generator=gen) * 0.3 / k**0.5).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    return x, q, cpu_linear.pack_int4_pairs(q), scale, zero, b


@pytest.mark.parametrize("rows", [*ROWS, 6, 8, 13])
@pytest.mark.parametrize(("k", "n"), INT4_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int4_matches_reference(rows: int, k: int, n: int, bias: bool) -> None:
    """Up to 4 rows: within one bfloat16 rounding of the float32 product over W in float32;
    from 5 rows, of the same over W rounded to bfloat16 (expanded once per call)."""
    x, _, packed, scale, zero, b = _int4_operands(rows, k, n, bias, rows * n + k + 4)
    out = cpu_linear.linear_int4(KERNEL, x, packed, scale, zero, b)
    expanded = rows > INT4_DIRECT_ROWS
    _ulp_close(out, cpu_linear.linear_int4_ref(x, packed, scale, zero, b, expanded))


def test_int4_pairs_hold_two_chunks_a_byte() -> None:
    q = torch.arange(2 * 128).remainder(16).view(2, 128).to(torch.uint8)
    packed = cpu_linear.pack_int4_pairs(q)
    assert packed.shape == (2, 64) and packed.dtype == torch.uint8
    for n in range(2):
        for p in range(2):
            for b in range(32):
                byte = int(packed[n, 32 * p + b])
                assert byte & 15 == q[n, 64 * p + b] and byte >> 4 == q[n, 64 * p + 32 + b]
    assert torch.equal(cpu_linear.unpack_int4_pairs(packed), q)
    with pytest.raises(ValueError, match="multiple of 64"):
        cpu_linear.pack_int4_pairs(q[:, :96])


def test_int4_every_nibble_and_a_row_alone_or_in_any_batch() -> None:
    """Each of the 16 values at every position of a chunk is read as q - 8 (one-hot x picks
    single weights), and a row's output does not depend on the batch within each regime."""
    k, n = 128, 16
    q = (torch.arange(n * k).view(n, k) * 7 + torch.arange(n)[:, None]).remainder(16)
    q = q.to(torch.uint8)
    scale = torch.full((n, k // 32), 0.5).bfloat16()
    zero = torch.full((n, k // 32), 0.25).bfloat16()
    packed = cpu_linear.pack_int4_pairs(q)
    eye = torch.eye(k).bfloat16()
    for rows in (1, 3, INT4_DIRECT_ROWS, 5, 64):  # one-hot rows, in batches of each size
        for start in range(0, k, rows):
            x = eye[start : start + rows]
            out = cpu_linear.linear_int4(KERNEL, x, packed, scale, zero, None).float()
            expected = (q[:, start : start + rows].t().float() - 8) * 0.5 + 0.25
            assert torch.equal(out, expected), f"{rows} rows from feature {start}"
    x, _, packed, scale, zero, _ = _int4_operands(37, 576, 300, False, 9)
    alone = torch.cat(
        [cpu_linear.linear_int4(KERNEL, x[i : i + 1], packed, scale, zero, None) for i in range(37)]
    )
    for m in (2, 3, INT4_DIRECT_ROWS):
        assert torch.equal(
            cpu_linear.linear_int4(KERNEL, x[:m], packed, scale, zero, None), alone[:m]
        )
    many = cpu_linear.linear_int4(KERNEL, x, packed, scale, zero, None)
    for m in (5, 8, 16, 33):
        assert torch.equal(
            cpu_linear.linear_int4(KERNEL, x[:m], packed, scale, zero, None), many[:m]
        )


def test_int4_refuses_what_it_cannot_take() -> None:
    x, _, packed, scale, zero, _ = _int4_operands(2, 128, 16, False, 10)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        cpu_linear.linear_int4(
            KERNEL,
            x[:, :96].contiguous(),
            packed[:, :48].contiguous(),
            scale[:, :3].contiguous(),
            zero[:, :3].contiguous(),
            None,
        )
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_linear.linear_int4(KERNEL, x.float(), packed, scale, zero, None)
    with pytest.raises(RuntimeError, match="scale and zero"):
        cpu_linear.linear_int4(KERNEL, x, packed, scale.float(), zero, None)
    with pytest.raises(RuntimeError, match="scale and zero"):
        cpu_linear.linear_int4(KERNEL, x, packed, scale, zero[:, :2].contiguous(), None)


@pytest.mark.parametrize(("k", "n"), INT4_SHAPES)
def test_int4_pairs_to_bf16_is_the_weight_rounded_once(k: int, n: int) -> None:
    _, _, packed, scale, zero, _ = _int4_operands(1, k, n, False, k + n)
    w = cpu_linear.int4_pairs_to_bf16(KERNEL, packed, scale, zero)
    assert torch.equal(w, cpu_linear.int4_pairs_weight(packed, scale, zero).bfloat16())
    with pytest.raises(RuntimeError, match="multiple of 64"):
        cpu_linear.int4_pairs_to_bf16(KERNEL, packed[:, :16].contiguous(), scale, zero)


def test_the_dot_product_peak_is_a_positive_rate_or_none_without_the_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RADIXSERVE_DISABLE_CPU_KERNELS", raising=False)
    peak = cpu_linear.bf16_dot_peak(rounds=20_000, repeats=1)
    assert peak is not None and 0 < peak < float("inf")
    for bad in ({"rounds": 0}, {"repeats": 0}):
        with pytest.raises(ValueError, match="rounds and repeats must be at least 1"):
            cpu_linear.bf16_dot_peak(**bad)
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    assert cpu_linear.bf16_dot_peak() is None
