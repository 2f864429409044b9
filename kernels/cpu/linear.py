"""Small-batch linear layers on the CPU, with references.

At decode batch sizes a linear layer's time is reading its weights; oneDNN's bfloat16 GEMM adds
20-30 us per call to that, torch's int8 kernel reads at about half the memory bandwidth, and on
CPUs without AVX-512 torch's int8 and int4 kernels run scalar code (measured on an AVX2 host over
SmolLM2-135M's layers at one row: 65 ms int8, against 7 ms here). The C++ kernels here stream the
weights into vector dot products instead, for inputs of a few rows (the callers pick the row limit
from measurements, see packed_linear.py and quantization.py):

- bfloat16 activations (linear.cpp): AVX-512 BF16 dot products over bfloat16 or int8 weights;
  built on CPUs with AVX-512 BF16. `linear_bf16_panels` and `linear_int8_panels` read weights
  packed once into panels whose vector lanes are output channels (`pack_panels`): bfloat16
  layers from one row up to 352 on CPUs without AMX, int8 layers at every row count.
  `linear_int4` reads int4 weights with a scale and a zero per 32 input features, packed once by
  `pack_int4_pairs`.
- bfloat16 activations on AMX tiles (linear_amx.cpp): `linear_bf16_amx` reads the same bfloat16
  panels, which are also the tiles' weight layout; built on CPUs with AMX, where it runs the
  bfloat16 layers from two rows up to tens.
- float32 activations (linear_f32.cpp): AVX2 FMAs over float32, int8 or int4 weights; built on
  CPUs with AVX2 and FMA. `linear_f32` reads the plain weight; `linear_f32_panels` and
  `linear_int8_f32_panels` read a float32 or int8 weight packed once into panels of 16 output
  channels (`pack_panels16`); on CPUs without AVX-512 the float32 layers run them at every row
  count.

Each `*_ref` is the PyTorch formula the kernel computes; results agree with it to float32
summation order (rounded to bfloat16 once for bfloat16 activations). Inputs need a width that is a
multiple of 32 (64 for `linear_int4`, which the int4 layers check when they pick their layout).
Where a kernel is not built, `available*` returns None and callers use PyTorch.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from kernels.cpu.build import Extension, kernels_enabled

_linear = Extension(
    "radixserve_cpu_linear",
    Path(__file__).with_name("linear.cpp"),
    "CPU small-batch linear kernels",
    requires=("avx512f", "avx512bw", "avx512_bf16"),
)
_linear_amx = Extension(
    "radixserve_cpu_linear_amx",
    Path(__file__).with_name("linear_amx.cpp"),
    "CPU AMX linear kernel",
    requires=("avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"),
    cflags=("-mamx-tile", "-mamx-bf16"),
)
_linear_f32 = Extension(
    "radixserve_cpu_linear_f32",
    Path(__file__).with_name("linear_f32.cpp"),
    "CPU float32 small-batch linear kernels",
    requires=("avx2", "fma"),
)
K_MULTIPLE = 32  # input features per AVX-512 BF16 dot product, and per step of the FMA kernels
PANEL_CHANNELS = 16  # output channels per panel (pack_panels, pack_panels16)
INT4_BLOCK = 32  # features per block of the float32 kernel's int4 packing (pack_int4)


def available(x: torch.Tensor, in_features: int) -> ModuleType | None:
    """The compiled module when an input like `x` ([M, in_features]) can use it: bfloat16 on
    the CPU, `in_features` a multiple of 32, kernels not disabled by
    RADIXSERVE_DISABLE_CPU_KERNELS=1, not inside torch.compile; None otherwise."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or in_features % K_MULTIPLE:
        return None
    return _linear.load() if kernels_enabled() else None


def available_amx(x: torch.Tensor, in_features: int) -> ModuleType | None:
    """The compiled AMX module when an input like `x` ([M, in_features]) can use it: what
    `available` requires, on a CPU with AMX whose tiles Linux lets this process use; else
    None."""
    if available(x, in_features) is None:
        return None
    module = _linear_amx.load()
    return module if module is not None and module.tiles_available() else None


def amx_refused() -> bool:
    """True where the AMX module is built but Linux refused this process the tiles (oneDNN then
    runs without them too); False where they are granted or the module is not built."""
    module = _linear_amx.load() if kernels_enabled() else None
    return module is not None and not module.tiles_available()


def available_f32(x: torch.Tensor, in_features: int, bfloat16: bool = False) -> ModuleType | None:
    """The compiled float32 module when an input like `x` ([M, in_features]) can use it: float32
    (or, with `bfloat16`, bfloat16: what the int8 and int4 kernels also take) on the CPU,
    `in_features` a multiple of 32, kernels enabled (see `available`); else None."""
    dtypes = (torch.float32, torch.bfloat16) if bfloat16 else (torch.float32,)
    if x.dtype not in dtypes or x.device.type != "cpu" or in_features % K_MULTIPLE:
        return None
    return f32_module()


def available_panels16(x: torch.Tensor) -> ModuleType | None:
    """The compiled float32 module when an input like `x` can run the panels of 16 channels
    (`linear_f32_panels` for float32, `linear_bf16_f32_panels` for bfloat16; any width): float32
    or bfloat16 on the CPU, kernels enabled (see `available`); else None."""
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        return None
    return f32_module()


def f32_module() -> ModuleType | None:
    """The compiled float32 module (built on the first call) when it is built here and kernels
    are enabled (see `kernels_enabled`); else None."""
    return _linear_f32.load() if kernels_enabled() else None


def bf16_dot_peak(rounds: int = 10_000_000, repeats: int = 3) -> float | None:
    """The bfloat16 dot-product rate of this CPU in GFLOP/s (`vdpbf16ps`, 64 operations each, on
    every intra-op thread at once; best of `repeats` runs of `rounds` x 12 instructions a
    thread): the ceiling of the AVX-512 BF16 panels. None where the bfloat16 kernels are not
    built (no AVX-512 BF16, or the build failed) or are disabled. Raises ValueError for rounds or
    repeats < 1."""
    if rounds < 1 or repeats < 1:
        raise ValueError(f"rounds and repeats must be at least 1, not {rounds} and {repeats}")
    module = _linear.load() if kernels_enabled() else None
    if module is None:
        return None
    return max(module.bf16_dot_peak(rounds) for _ in range(repeats))


def load_error() -> str | None:
    """Why the bfloat16 kernels could not be built (None: built, or not tried yet)."""
    return _linear.error


def f32_load_error() -> str | None:
    """Why the float32 kernels could not be built (None: built, or not tried yet)."""
    return _linear_f32.error


def pack_panels(module: ModuleType, weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] bfloat16 or int8 (K even) → the panels `linear_bf16_panels` or
    `linear_int8_panels` reads: [ceil(N / 16), K * 16] of the weight's dtype,
    panels[b, (k // 2) * 32 + 2 * c + k % 2] = weight[16 b + c, k] (pairs of input features of 16
    output channels, vdpbf16ps's operand layout), channels past N zero. A copy: the weight itself
    is not kept. Raises RuntimeError on another dtype or odd K."""
    return module.pack_panels(weight.contiguous())


def unpack_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of the weight [N, K] that `pack_panels` packed into `panels`
    ([blocks, K * 16]; blocks may be a slice, then row 0 is its first block's first channel),
    as a new contiguous tensor of the panels' dtype."""
    blocks, width = panels.shape
    k = width // PANEL_CHANNELS
    rows = panels.view(blocks, k // 2, PANEL_CHANNELS, 2).permute(0, 2, 1, 3)
    return rows.reshape(blocks * PANEL_CHANNELS, k)[:n].contiguous()


def int8_panels_to_bf16(module: ModuleType, panels: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of the int8 weight that `pack_panels` packed into `panels` ([blocks,
    K * 16] int8, possibly a slice of blocks), converted to bfloat16 (exact): [n, K], what
    `unpack_panels(panels, n).to(torch.bfloat16)` gives, in one pass over all threads. Raises
    RuntimeError on another dtype or an n the blocks do not hold."""
    return module.int8_panels_to_bf16(panels.contiguous(), n)


def linear_bf16_panels(
    module: ModuleType,
    x: torch.Tensor,
    panels: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] bfloat16 @ weight [N = out_features, K]^T + bias [N] → [M, N] bfloat16, with the
    weight as `pack_panels` packed it; the same formula as `linear_bf16_ref`. Each output is a
    float32 sum over input features in ascending order (so a row does not depend on the others in
    its batch), rounded to bfloat16 once. Raises RuntimeError on a shape or dtype it does not
    take."""
    return module.linear_bf16_panels(x.contiguous(), panels, out_features, bias)


def linear_bf16_amx(
    module: ModuleType,
    x: torch.Tensor,
    panels: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """`linear_bf16_panels` on AMX tiles (`module` from `available_amx`): x [M, K] bfloat16 @
    weight [N = out_features, K]^T + bias [N] → [M, N] bfloat16, the weight as `pack_panels`
    packed it. Each output is the tile unit's float32 sum over input features, 32 at a time in
    ascending order (so a row does not depend on the others in its batch), rounded to bfloat16
    once; it can differ from `linear_bf16_panels` by float32 rounding. Raises RuntimeError on a
    shape or dtype it does not take."""
    return module.linear_bf16_amx(x.contiguous(), panels, out_features, bias)


def linear_int8_panels(
    module: ModuleType,
    x: torch.Tensor,
    panels: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] bfloat16 @ (q [N, K] int8 * scale [N] bfloat16)^T + bias [N] → [M, N] bfloat16,
    with q as `pack_panels` packed it and N = scale's length; the formula of `linear_int8_ref`,
    each output's float32 sum over input features in ascending order, scaled, rounded once.
    Raises RuntimeError on a shape or dtype it does not take (K must be a multiple of 32)."""
    return module.linear_int8_panels(x.contiguous(), panels, scale, scale.numel(), bias)


def linear_bf16_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The float32 product rounded to bfloat16 once."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def linear_int8_ref(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """(x · q) * scale (+ bias) in float32, rounded to bfloat16 once."""
    y = F.linear(x.float(), qweight.float()) * scale.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


INT4_PAIR = 64  # input features per pair of 32-feature chunks (pack_int4_pairs)


def pack_int4_pairs(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] integers in [0, 15] → [N, K/2] uint8 for `linear_int4`: byte (n, 32 p + b) holds
    q[n, 64 p + b] in its low nibble and q[n, 64 p + 32 + b] in its high one (two 32-feature
    chunks a 32-byte load). Raises ValueError unless K is a multiple of 64."""
    n, k = q.shape
    if k % INT4_PAIR:
        raise ValueError(f"input features {k} are not a multiple of {INT4_PAIR}")
    pairs = q.to(torch.uint8).reshape(n, k // INT4_PAIR, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4_pairs`: [N, K/2] uint8 → q [N, K] uint8 in [0, 15]."""
    n = packed.shape[0]
    pairs = packed.reshape(n, -1, 1, 32)
    return torch.cat([pairs & 15, pairs >> 4], dim=2).reshape(n, -1)


def linear_int4(
    module: ModuleType,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] bfloat16 @ W^T + bias [N] → [M, N] bfloat16, W[n, k] = (q[n, k] - 8) *
    scale[n, k // 32] + zero[n, k // 32], with qweight [N, K/2] = `pack_int4_pairs(q)` and scale,
    zero [N, K/32] bfloat16 (`module` from `available`; K a multiple of 64). Up to 4 rows, each
    output is the float32 sum over 32-feature chunks of scale times the chunk's x · (q - 8),
    plus the zeros times the chunk sums of x (`linear_int4_ref`); from 5 rows W is expanded once
    per call, rounded to bfloat16, and dotted with x in float32 (`linear_int4_ref(...,
    expanded=True)`).
    Either way the output is rounded to bfloat16 once. Raises RuntimeError on a shape or dtype
    the kernel does not take."""
    return module.linear_int4(x.contiguous(), qweight, scale, zero, bias)


def int4_pairs_weight(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """W [N, K] float32 from `linear_int4`'s operands: (q - 8) * scale + zero per 32 features,
    rounded to float32 once (exact in float64 first: a fused multiply-add's result)."""
    q = unpack_int4_pairs(qweight).double()
    n, k = q.shape
    w = (q.view(n, k // 32, 32) - 8) * scale.double()[..., None] + zero.double()[..., None]
    return w.view(n, k).float()


def int4_pairs_to_bf16(
    module: ModuleType, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """`linear_int4`'s operands → W [N, K] bfloat16, each weight bf16((q - 8) * scale + zero)
    from one float32 fused multiply-add (as the kernel expands W from 5 rows), in AVX-512 code
    over all threads (`module` from `available`). Raises RuntimeError on a shape or dtype it does
    not take."""
    return module.int4_pairs_to_bf16(qweight, scale, zero)


def linear_int4_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: torch.Tensor | None,
    expanded: bool = False,
) -> torch.Tensor:
    """x · W^T (+ bias) with W in float32 (`int4_pairs_weight`; with `expanded`, rounded to
    bfloat16 first, as the kernel does from 5 rows), rounded to bfloat16 once."""
    w = int4_pairs_weight(qweight, scale, zero)
    w = w.to(torch.bfloat16).float() if expanded else w
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def linear_f32(
    module: ModuleType, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T + bias [N], all float32 → [M, N] float32 (`module` from
    `available_f32`); `linear_f32_ref` is the formula. Raises RuntimeError on a shape or dtype
    the kernel does not take."""
    return module.linear_f32(x.contiguous(), weight, bias)


def pack_panels16(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] (float32, bfloat16 or int8) → the panels `linear_f32_panels`,
    `linear_bf16_f32_panels` and `linear_int8_f32_panels` read: [ceil(N / 16), K * 16] of the
    weight's dtype,
    panels[p, k * 16 + c] = weight[16 p + c, k] (16 output channels side by side, the lanes of two
    AVX2 vectors), channels past N zero. A copy."""
    n, k = weight.shape
    padded = torch.cat([weight, weight.new_zeros((-n) % 16, k)]) if n % 16 else weight
    return padded.reshape(-1, 16, k).transpose(1, 2).contiguous().view(-1, k * 16)


def pack_int4_panels16(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [N, K] integers in [0, 15] (K even), scale and zero [N, K / g] → what
    `linear_int4_f32_panels` reads: q as panels [ceil(N / 16), K * 8] uint8 (byte (p, i * 16 + c)
    holds channel 16 p + c's feature 2i in its low nibble and 2i + 1 in its high one), scale and
    zero as `pack_panels16` packs them, float32 [ceil(N / 16), K / g * 16]. Copies."""
    k = q.shape[1]
    lanes = pack_panels16(q.to(torch.uint8)).view(-1, k // 2, 2, 16)
    nibbles = lanes[:, :, 0] | (lanes[:, :, 1] << 4)
    return (
        nibbles.reshape(-1, k * 8),
        pack_panels16(scale.float().contiguous()),
        pack_panels16(zero.float().contiguous()),
    )


def linear_int4_f32_panels(
    module: ModuleType,
    x: torch.Tensor,
    panels: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    group: int,
    out_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] float32 or bfloat16 @ W^T + bias [N = out_features] float32 → [M, N] in x's
    dtype, W[n, k] = q[n, k] * scale[n, k // group] + zero[n, k // group] from `panels` =
    `pack_int4_panels16(q, scale, zero)`, each weight expanded in one float32 fused multiply-add
    (as `linear_int4_f32` does), each output one float32 sum over input features in ascending
    order (bfloat16 x widened exactly, each output rounded once). Raises RuntimeError on a shape
    or dtype it does not take (K a multiple of the group size, a power of 2)."""
    q, scale, zero = panels
    return module.linear_int4_f32_panels(x.contiguous(), q, scale, zero, group, out_features, bias)


def unpack_panels16(panels: torch.Tensor, n: int) -> torch.Tensor:
    """The weight [n, K] that `pack_panels16` packed into `panels` (a copy)."""
    blocks, k = panels.shape[0], panels.shape[1] // 16
    return panels.view(blocks, k, 16).transpose(1, 2).reshape(blocks * 16, k)[:n]


def linear_f32_panels(
    module: ModuleType,
    x: torch.Tensor,
    panels: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] float32 @ weight [N = out_features, K]^T + bias [N] → [M, N] float32, with the
    weight as `pack_panels16` packed it (any K); the formula of `linear_f32_ref`. Each output is
    one float32 sum over input features in ascending order, so a row does not depend on the
    others in its batch. Raises RuntimeError on a shape or dtype it does not take."""
    return module.linear_f32_panels(x.contiguous(), panels, out_features, bias)


def linear_bf16_f32_panels(
    module: ModuleType,
    x: torch.Tensor,
    panels: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] bfloat16 @ weight [N = out_features, K]^T + bias [N] → [M, N] bfloat16 on AVX2
    and FMA, with the weight bfloat16 as `pack_panels16` packed it (any K): x, the weight and the
    bias widened to float32 (exact), each output one float32 sum over input features in
    ascending order plus the bias, rounded to bfloat16 once; the formula of `linear_bf16_ref`,
    and a row does not depend on the others in its batch. Raises RuntimeError on a shape or dtype
    it does not take."""
    return module.linear_bf16_f32_panels(x.contiguous(), panels, out_features, bias)


def linear_int8_f32_panels(
    module: ModuleType,
    x: torch.Tensor,
    panels: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] float32 or bfloat16 @ (q [N, K] int8 * scale [N] float32)^T + bias [N] float32
    → [M, N] in x's dtype, with q as `pack_panels16` packed it and N = scale's length (any K);
    the formula of `linear_int8_ref` in float32: each output one float32 sum over input features
    in ascending order, then scaled (bfloat16 x widened exactly, each output rounded once).
    Raises RuntimeError on a shape or dtype it does not take."""
    return module.linear_int8_f32_panels(x.contiguous(), panels, scale, bias)


def linear_f32_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """F.linear in float32."""
    return F.linear(x, weight, bias)


def linear_int8_f32(
    module: ModuleType,
    x: torch.Tensor,
    blocks: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] float32 or bfloat16 @ (q [N, K] int8 * scale [N] float32)^T + bias [N] float32
    → [M, N] in x's dtype, summed in float32 as (x · q) * scale (bfloat16 x widened exactly,
    each output rounded once), q given as `block_int8(q)` (`module` from `available_f32`; the
    formula is `linear_int8_ref`). Raises RuntimeError on a shape or dtype the kernel does not
    take."""
    return module.linear_int8(x.contiguous(), blocks, scale, bias)


def block_int8(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] int8 → the float32 kernel's blocks [ceil(N / 4), K / 32, 4, 32]: block (b, j)
    holds features 32j..32j+31 of channels 4b..4b+3, one after another (channels past N zero).
    A dot-product tile of 4 channels then reads one sequential stream. K must be a multiple of
    32."""
    return _blocks(q, 32)


def unblock_int8(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `block_int8`: q [n, K] int8."""
    return _unblock(blocks, n)


def block_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack_int4`'s bytes [N, K/2] and scale, zero [N, K/g] → the float32 kernel's blocks:
    bytes [ceil(N / 4), K / 32, 4, 16] (see `block_int8`), scale and zero [ceil(N / 4), K/g, 4]
    float32 (channels past N zero)."""
    return _blocks(packed, 16), _blocks(scale.float(), 1), _blocks(zero.float(), 1)


def unblock_int4(
    blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `block_int4`: (bytes [n, K/2], scale [n, K/g], zero [n, K/g])."""
    return _unblock(blocks, n), _unblock(scale, n), _unblock(zero, n)


def _blocks(t: torch.Tensor, width: int) -> torch.Tensor:
    """t [N, C] → [ceil(N / 4), C / width, 4, width] (dropping the last dimension for width 1),
    4 channels' runs of `width` columns together, channels padded to a multiple of 4 with 0."""
    n, c = t.shape
    if c % width:
        raise ValueError(f"{c} columns are not a multiple of {width}")
    padded = -(-n // 4) * 4
    if padded != n:
        t = torch.cat([t, t.new_zeros(padded - n, c)])
    out = t.reshape(padded // 4, 4, c // width, width).permute(0, 2, 1, 3).contiguous()
    return out.squeeze(3) if width == 1 else out


def _unblock(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `_blocks`: [n, C], contiguous."""
    b = blocks.unsqueeze(3) if blocks.dim() == 3 else blocks
    rows, runs, _, width = b.shape
    return b.permute(0, 2, 1, 3).reshape(rows * 4, runs * width)[:n].contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] integers in [0, 15] → [N, K/2] uint8 in the float32 kernel's order: in each block
    of 32 features, byte i holds feature i in its low nibble and feature i + 16 in its high one
    (the order of GGUF's Q4_0/Q4_1 blocks). K must be a multiple of 32. `block_int4` then groups
    the bytes of 4 channels as the kernel reads them."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n, k // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: [N, K/2] uint8 → q [N, K] uint8 in [0, 15]."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // (INT4_BLOCK // 2), 1, INT4_BLOCK // 2)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(n, half * 2)


def linear_int4_f32(
    module: ModuleType,
    x: torch.Tensor,
    blocks: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    out_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] float32 or bfloat16 @ W^T + bias [N] float32 → [M, N] in x's dtype (bfloat16 x
    widened exactly, each output rounded once), N = `out_features`, W[n, k] =
    q[n, k] * scale[n, k // g] + zero[n, k // g] expanded in float32 (one fused multiply-add),
    `blocks`, `scale` and `zero` as `block_int4` gives them for `pack_int4(q)` and scale, zero
    [N, K/g] float32; g = `group_size` (a power of 2, at least 32). `module` from
    `available_f32`; the formula is `linear_int4_f32_ref` (over the unblocked bytes). Raises
    RuntimeError on a shape, dtype or group size the kernel does not take."""
    return module.linear_int4(x.contiguous(), blocks, scale, zero, group_size, out_features, bias)


def int4_weight(
    blocks: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    """W [N, K] float32 = q * scale + zero per group, N = `out_features`, from `block_int4`'s
    blocks (the weight `linear_int4_f32` multiplies by): expanded by the kernel where it is built
    (bit for bit what it multiplies by; it raises RuntimeError for a group size it does not take),
    else by `int4_weight_ref`."""
    if blocks.device.type == "cpu" and (module := f32_module()) is not None:
        return module.dequantize_int4(
            blocks.contiguous(), scale.contiguous(), zero.contiguous(), group_size, out_features
        )
    return int4_weight_ref(*unblock_int4(blocks, scale, zero, out_features), group_size)


def int4_weight_ref(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """`int4_weight` in PyTorch: q * scale + zero, rounded twice where the kernel fuses them."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    groups = q.view(n, k // group_size, group_size)
    return torch.addcmul(zero.float()[..., None], groups, scale.float()[..., None]).view(n, k)


def linear_int4_f32_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """F.linear over `int4_weight_ref`, in float32."""
    return F.linear(x, int4_weight_ref(packed, scale, zero, group_size), bias)
