"""Weight-only quantization of a loaded model's linear layers (`--quantization int8 | int4`).

Like packing (packed_linear.py), this is applied to a built, loaded model from outside the model
files: `quantize_linears` swaps every `nn.Linear` for an `Int8Linear` or `Int4Linear` holding
the quantized weight (the LM head at int8 under int4 too: it is the most sensitive layer).
Activations stay in the model dtype (bfloat16, float16 or float32); only the weights are stored
in fewer bits and expanded inside the kernels (on the CPU ours, or torch's where ours are not
built; on CUDA the Triton kernels of kernels/quant_matmul.py):

- int8: one symmetric scale per output channel; our AVX-512 BF16 kernel (kernels/cpu/linear.py)
  for bfloat16 activations over q packed in panels of 16 output channels (measured on a 2-core
  AMD EPYC over this model's layers at one row: 4.1 ms on a day it ran at half speed; torch's
  kernel took 13.1 ms there on an earlier day), our AVX2 FMA kernel for float32 ones and for bfloat16
  ones on CPUs without AVX-512 (the weight stored in its blocks of 4 channels x 32 features,
  `cpu_linear.block_int8`), and `torch._weight_int8pack_mm` where neither is built.
- int4: an asymmetric scale and zero per group of `group_size` input features. For float32
  activations on a CPU with AVX2 and FMA, and bfloat16 ones on such a CPU without AVX-512, our
  kernel over our own packing (`cpu_linear.pack_int4`, in the kernel's blocks: `block_int4`);
  for bfloat16 ones on a CPU with AVX-512 BF16 (input features a multiple of 64), our AVX-512
  BF16 kernel over pairs of 32-feature chunks (`cpu_linear.pack_int4_pairs`); otherwise
  `aten._weight_int4pack_mm_for_cpu`, the weight in the layout of
  `aten._convert_weight_to_int4pack_for_cpu` (which depends on the CPU's vector width, so it is
  packed where it runs).

On a CPU without AVX-512, torch's int8 and int4 kernels run scalar code: measured on an AVX2 host
over this model's 210 linear layers, 65 ms at one row and 3.7 s at 32 for int8, against 7 ms and
98 ms for the FMA kernel; torch's int4 decoded 6 tokens a second. In bfloat16 there (measured
with `bench-executor`, `gguf`), a 32-row decode step took 287 ms and a 512-token prefill 7.4 s
through torch's kernels and its bfloat16 GEMM, against 126 ms and 1.25 s through the FMA kernel
(bfloat16 inputs widened, each output rounded once).

The kernels (no AMX tiles) beat the float GEMMs at decode batch sizes, where reading the weights
is the cost, and fall behind them on prefill-sized inputs. So inputs of many rows run as a float
GEMM over the weight expanded on the fly, a chunk of output channels at a time: from
F32_DEQUANT_ROWS rows on our float32 kernels (dot products over blocks of 4 channels up to 2
rows, tiles of up to 6 rows over panels of 16 channels above), from DEQUANT_ROWS on torch's int8
kernel, from INT4_DEQUANT_ROWS for torch's int4. Our AVX-512 BF16 int8 kernel is the exception:
without AMX it stays ahead of the GEMM at every row count measured (up to 512), so it runs them
all (with AMX, below INT8_PANEL_MAX_ROWS). For torch's int4 that needs its
packed layout, which is private to torch: `int4_layout` finds it by unpacking a probe that torch
packed, and where no known layout matches, int4 layers always run the kernel.

GGUF files bring their own quantized weights; gguf_weights.py maps them onto these modules.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu import linear as cpu_linear
from services.executor.config import INT4_GROUP_SIZES, QUANTIZATION_METHODS
from services.executor.packed_linear import HAS_AMX, Linear2D, can_use_panels16, children_of_type

log = logging.getLogger("radixserve.executor")

INT8_K_ALIGN = 16  # _weight_int8pack_mm reads the input dimension 16 lanes at a time
INT4_N_ALIGN = 16  # _convert_weight_to_int4pack_for_cpu packs output channels in 16s
QUANT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Int8Linear: inputs with at least this many rows run as a float GEMM. On torch's int8 kernel
# (measured on an AVX-512 host: its time grows linearly with rows and crosses the
# convert-then-GEMM time near 32 rows):
DEQUANT_ROWS = 32
# Int8Linear on our AVX-512 BF16 kernel ("panels"): inputs of at least this many rows run the
# float GEMM instead on CPUs with AMX tiles, where oneDNN's bfloat16 GEMM runs on them; without
# AMX the kernel led that GEMM at every row count measured (up to 512, see
# kernels/cpu/linear.cpp), so None.
INT8_PANEL_MAX_ROWS = 80 if HAS_AMX else None
# Int4Linear on torch's kernel: the same from this many rows (expanding int4 costs more: measured
# here, the kernel at 256 rows takes about as long as expanding the weight, and 3x longer at 512).
INT4_DEQUANT_ROWS = 256
# Int4Linear on our AVX-512 BF16 kernel ("pairs"): the same from this many rows. Measured on a
# 2-core AMD EPYC (no AMX) over the model's 120 decoder linears, the kernel against the float
# GEMM over the weight expanded in AVX-512 code: 176 against 203 ms at 256 rows, 217-220 against
# 227-232 at 320, 275-297 against 230 at 384, 350 against 330 at 512.
INT4_PAIRS_DEQUANT_ROWS = 384
# Int8Linear and Int4Linear on our float32 kernel: the same from this many rows. Measured on a
# 2-core AVX2 host over the model's 120 decoder linears, the panels (below) against the float
# GEMM: int8 357 against 520 ms at 256 rows, 854 against 903 at 512, 1,630 against 2,124 at
# 1,024; int4 363 against 477, 806 against 867, and 1,681 against 1,519 at 1,024.
F32_DEQUANT_ROWS = 1024
# From this many rows, below F32_DEQUANT_ROWS, those layers read their weight from panels of 16
# output channels (kernels/cpu/linear_f32.cpp), a second copy, rather than from the blocks. The
# same host and layers, blocks against panels: int8 8.5 against 9.2 ms at 2 rows, 12.5 against
# 10.8 at 3, 27.5 against 22.8 at 8, 76.8 against 67.7 at 32 and 130.9 against 112.9 at 64; int4
# 10.1 against 9.9 at 2, 16.9 against 11.6 at 3, 38.8 against 27.4 at 8 and 76.3 against 66.0 at
# 32. At one row the blocks lead (int8 8.6 against 10.6, int4 10.4 against 11.4).
F32_PANEL_ROWS = 3
DEQUANT_CHUNK = 1 << 22  # weights expanded at once on those paths (4 Mi elements)


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight [N, K] → (q [N, K] int8 in [-127, 127],
    scale [N] `dtype`), weight ≈ q * scale. The scale is max|row| / 127 rounded to `dtype`, and q
    is rounded against that stored scale, so |weight - q * scale| ≤ scale / 2 (plus the rounding
    of the scale to `dtype`, at most 127 * its ulp, for the row's largest element)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(
    weight: torch.Tensor, group_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` input features: weight [N, K] → (q [N, K] uint8
    in [0, 15], scale [N, K/g], zero [N, K/g] both `dtype`), weight ≈ (q - 8) * scale + zero
    (torch's convention; the same grid as GGUF's Q4_1: scale = (max - min) / 15 and
    zero = min + 8 * scale). q is rounded against the stored scale and zero, so each element is
    within scale / 2 of its value (plus the rounding of scale and zero to `dtype`).
    Raises ValueError when K is not a multiple of `group_size`."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"input features {k} are not a multiple of the group size {group_size}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10).to(dtype)
    zero = (lo + 8 * scale.float()).to(dtype)
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.round((w - z) / s + 8).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, zero


def int8_fallback_reason(out_features: int, in_features: int) -> str | None:
    """Why `_weight_int8pack_mm` cannot run a [out, in] weight (None: it can)."""
    if in_features % INT8_K_ALIGN:
        return f"input features {in_features} not a multiple of {INT8_K_ALIGN}"
    return None


def int4_fallback_reason(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why the int4 CPU kernel cannot run a [out, in] weight in groups of `group_size`."""
    if in_features % group_size:
        return f"input features {in_features} not a multiple of the group size {group_size}"
    if out_features % INT4_N_ALIGN:
        return f"output features {out_features} not a multiple of {INT4_N_ALIGN}"
    return None


def f32_kernel(dtype: torch.dtype, in_features: int) -> bool:
    """True when a quantized layer for activations of `dtype` stores its weight in our float32
    kernel's blocks (`cpu_linear.block_int8`, `block_int4`), with float32 scales, zeros and bias:
    float32, or bfloat16 where unquantized bfloat16 linears become panels (`can_use_panels16`: a
    CPU without AVX-512, where torch has no oneDNN bfloat16 GEMM and its int8 and int4 kernels
    run scalar code; the kernel widens bfloat16 inputs and rounds each output once), K a
    multiple of 32, the kernel built on this CPU (AVX2 and FMA) and not
    disabled by RADIXSERVE_DISABLE_CPU_KERNELS."""
    wide = dtype == torch.float32 or can_use_panels16(dtype, torch.device("cpu"))
    return wide and in_features % cpu_linear.K_MULTIPLE == 0 and cpu_linear.f32_module() is not None


def triton_device(t: torch.Tensor) -> bool:
    """True where quantized layers holding `t` run the Triton kernels: on a CUDA device."""
    return t.is_cuda


def _triton() -> ModuleType:
    """kernels/quant_matmul.py, the "triton" layouts' kernels (imported on first use: it loads
    Triton, which CPU-only runs never need)."""
    from kernels import quant_matmul

    return quant_matmul


def pairs_kernel(dtype: torch.dtype, in_features: int) -> bool:
    """True when an int4 layer for activations of `dtype` stores its weight for our AVX-512 BF16
    int4 kernel (`cpu_linear.linear_int4`): bfloat16 activations, K a multiple of 64, the kernel
    built on this CPU (AVX-512 BF16) and not disabled by RADIXSERVE_DISABLE_CPU_KERNELS."""
    if dtype != torch.bfloat16 or in_features % cpu_linear.INT4_PAIR:
        return False
    return cpu_linear.available(torch.empty(0, dtype=dtype), in_features) is not None


class Int8Linear(nn.Module):
    """y = (x q^T) * scale + bias, q int8 per output channel.

    x: [..., K] in the activation dtype the layer was built for (bfloat16, float16 or float32;
    the dtype of the scale given) → y: [..., N] in that dtype. Buffers: `qweight` (q int8, in one
    of three layouts), `scale` [N], `bias` [N] or None.
    The layout (`layout`) is chosen at construction:

    - "panels" (bfloat16 activations on a CPU with AVX-512 BF16, K a multiple of 32): q only as
      panels of 16 output channels, [ceil(N / 16), K * 16] (`cpu_linear.pack_panels`), which our
      AVX-512 BF16 kernel (`cpu_linear.linear_int8_panels`) reads at every row count (on CPUs
      with AMX, below INT8_PANEL_MAX_ROWS; from there the float GEMM over the panels converted
      by `cpu_linear.int8_panels_to_bf16`).
    - "blocks" (float32 activations, or bfloat16 without AVX-512, where `f32_kernel`): q in our
      float32 kernel's blocks (`cpu_linear.block_int8`) and, as `panels`, in panels of 16 output
      channels (`cpu_linear.pack_panels16`), the scale and bias float32; that kernel below
      F32_DEQUANT_ROWS rows, over the panels from F32_PANEL_ROWS. Other rows, and bfloat16
      inputs, compute in float32 and round the output to the input's dtype once.
    - "rows": q [N, K]; torch._weight_int8pack_mm below DEQUANT_ROWS rows (float32
      accumulation).
    - "triton" (on a CUDA device): q [N, K]; the Triton kernel `kernels.quant_matmul.int8_linear`
      at every row count.

    From there, and where a kernel is disabled after construction (RADIXSERVE_DISABLE_CPU_KERNELS,
    torch.compile), a float GEMM over q converted to the activation dtype (float32 for "blocks";
    exact: |q| ≤ 127), scaled per output channel afterwards.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        traceable: bool = False,
    ) -> None:
        """qweight [N, K] int8, scale [N] in the activation dtype; with `traceable`, never the
        "panels" layout (torch.compile traces torch's kernel, not ours). Raises ValueError for a
        K the kernel cannot run."""
        super().__init__()
        assert qweight.dtype == torch.int8 and qweight.dim() == 2, qweight.dtype
        self.out_features, self.in_features = qweight.shape
        reason = int8_fallback_reason(self.out_features, self.in_features)
        if reason:
            raise ValueError(f"int8 kernel cannot run this weight: {reason}")
        kernel = None
        if scale.dtype == torch.bfloat16 and not traceable and not triton_device(qweight):
            kernel = cpu_linear.available(scale.new_empty(0), self.in_features)
        if triton_device(qweight):
            self.layout = "triton"
        elif kernel is not None:
            self.layout = "panels"
        else:
            self.layout = "blocks" if f32_kernel(scale.dtype, self.in_features) else "rows"
        wide = torch.float32 if self.layout == "blocks" else scale.dtype
        # "blocks" also keeps q packed into panels of 16 output channels for its kernel's larger
        # row counts (`cpu_linear.pack_panels16`), beside the blocks for fewer rows
        self.panels: torch.Tensor | None = None
        if self.layout == "panels":
            qweight = cpu_linear.pack_panels(kernel, qweight)
        elif self.layout == "blocks":
            self.panels = cpu_linear.pack_panels16(qweight)
            qweight = cpu_linear.block_int8(qweight)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.to(wide).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(wide))

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> Int8Linear:
        """Quantizes weight [N, K] (see `quantize_int8`) for activations of `dtype`."""
        q, scale = quantize_int8(weight, dtype)
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if self.layout == "triton":
            y = _triton().int8_linear(flat.contiguous(), self.qweight, self.scale, self.bias)
            return y.view(*shape[:-1], self.out_features)
        if (call := self.direct(flat)) is not None:
            return call(flat).view(*shape[:-1], self.out_features)
        if self.layout == "blocks" and flat.dtype != torch.float32:
            return self.forward(flat.float()).to(x.dtype).view(*shape[:-1], self.out_features)
        if flat.shape[0] == 0:
            y = flat.new_zeros(0, self.out_features)
        elif flat.shape[0] >= DEQUANT_ROWS or self.layout != "rows":
            y = self._float_gemm(flat)
        else:
            y = torch._weight_int8pack_mm(flat.contiguous(), self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def direct(self, x: torch.Tensor) -> Linear2D | None:
        """The kernel call `forward` makes for a 2-D input like `x` ([M, in_features]), bound to
        this layer's weights: one of kernels/cpu/linear.py's where it is available, for any
        number of rows of the scale's dtype on a "panels" layer (with AMX, fewer than
        INT8_PANEL_MAX_ROWS) and 1..F32_DEQUANT_ROWS-1 float32
        or bfloat16 rows of a "blocks" layer; None where `forward` runs torch's kernel or the
        float GEMM."""
        rows = x.shape[0]
        if rows == 0:
            return None
        q, scale, bias, panels = self.qweight, self.scale, self.bias, self.panels
        if self.layout == "panels":
            if INT8_PANEL_MAX_ROWS is not None and rows >= INT8_PANEL_MAX_ROWS:
                return None
            if scale.dtype == x.dtype and (kernel := cpu_linear.available(x, self.in_features)):
                return lambda flat: cpu_linear.linear_int8_panels(kernel, flat, q, scale, bias)
            return None
        if (
            self.layout == "blocks"
            and rows < F32_DEQUANT_ROWS
            and (kernel := cpu_linear.available_f32(x, self.in_features, bfloat16=True))
        ):
            if panels is not None and rows >= F32_PANEL_ROWS:
                return lambda flat: cpu_linear.linear_int8_f32_panels(
                    kernel, flat, panels, scale, bias
                )
            return lambda flat: cpu_linear.linear_int8_f32(kernel, flat, q, scale, bias)
        return None

    def _rows(self, start: int, end: int) -> torch.Tensor:
        """q[start:end] [end - start, K] int8, whatever the layout."""
        if self.layout in ("rows", "triton"):
            return self.qweight[start:end]
        width = cpu_linear.PANEL_CHANNELS if self.layout == "panels" else 4
        first = start // width
        packed = self.qweight[first : -(-end // width)]
        if self.layout == "panels":
            unpacked = cpu_linear.unpack_panels(packed, end - first * width)
        else:
            unpacked = cpu_linear.unblock_int8(packed, end - first * width)
        return unpacked[start - first * width :]

    def _float_gemm(self, x: torch.Tensor) -> torch.Tensor:
        # a chunk of output channels at a time (a multiple of 16: whole panels), so the
        # converted weight stays small
        width = cpu_linear.PANEL_CHANNELS
        step = max(width, DEQUANT_CHUNK // self.in_features // width * width)
        kernel = None
        if self.layout == "panels" and x.dtype == torch.bfloat16:
            kernel = cpu_linear.available(x, self.in_features)

        def expand(start: int, end: int) -> torch.Tensor:
            if kernel is None:
                return self._rows(start, end).to(x.dtype)
            blocks = self.qweight[start // width : -(-end // width)]
            return cpu_linear.int8_panels_to_bf16(kernel, blocks, end - start)

        parts = [
            F.linear(x, expand(a, min(a + step, self.out_features))) * self.scale[a : a + step]
            for a in range(0, self.out_features, step)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def dequantize(self) -> torch.Tensor:
        """The weight this layer applies: q * scale, [N, K] float32 (exact)."""
        return self._rows(0, self.out_features).float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int8, "
            f"layout={self.layout}"
        )


# Candidate layouts of _convert_weight_to_int4pack_for_cpu: (block rows, split). The output
# channels go in blocks of `block` rows, each stored as [K, block / 2] bytes; with `split`, byte j
# of a full block holds rows j (low nibble) and j + block / 2 (high), otherwise rows 2j and 2j + 1
# (as a partial last block always does). AVX-512 builds use (64, split), AVX2 (32, split), others
# (32, pairs).
INT4_LAYOUTS = ((64, True), (32, True), (32, False))


def _unpack(packed: torch.Tensor, n: int, k: int, layout: tuple[int, bool]) -> torch.Tensor:
    """q [n, k] uint8 in [0, 15] from the packed bytes of n rows (starting at a block)."""
    block, split = layout
    flat = packed.reshape(-1)
    full = n // block
    head = flat[: full * k * block // 2].view(full, k, block // 2)
    lo, hi = head & 15, head >> 4
    if split:
        rows = torch.cat([lo, hi], dim=2)
    else:
        rows = torch.stack([lo, hi], dim=3).reshape(full, k, block)
    parts = [rows.transpose(1, 2).reshape(full * block, k)]
    if n > full * block:
        tail = flat[full * k * block // 2 :].view(k, (n - full * block) // 2)
        parts.append(torch.stack([tail & 15, tail >> 4], dim=2).reshape(k, -1).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@functools.cache
def int4_layout() -> tuple[int, bool] | None:
    """The layout of INT4_LAYOUTS in which this machine's torch packs int4 weights, found by
    unpacking a probe torch packed (full blocks and a partial one); None when none matches."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (176, 64), dtype=torch.int32, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for layout in INT4_LAYOUTS:
        if torch.equal(_unpack(packed, 176, 64, layout).to(torch.int32), probe):
            return layout
    log.warning("unknown int4 packing of this torch build: int4 layers always run the kernel")
    return None


class Int4Linear(nn.Module):
    """y = x W^T + bias with W[n, k] = (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g].

    x: [..., K] in the activation dtype the layer was built for (bfloat16, float16 or float32;
    the dtype of the scales given) → y: [..., N] in that dtype. Three layouts, chosen at
    construction (`layout`):

    - "fma" (float32 activations, or bfloat16 without AVX-512, where `f32_kernel`): `qweight`,
      `scale` and `zero` in our float32 kernel's blocks (`cpu_linear.block_int4` of
      `pack_int4(q)`, the scale and the zero float32 with the 8 folded into the zero: W = q *
      scale + (zero - 8 * scale)), and the same in panels of 16 output channels as `panels`
      (`cpu_linear.pack_int4_panels16`); the bias float32. Below F32_DEQUANT_ROWS rows, our AVX2
      FMA kernel, over the panels from F32_PANEL_ROWS. bfloat16 inputs compute in float32 and
      round the output once.
    - "pairs" (bfloat16 activations where `pairs_kernel`: AVX-512 BF16, K a multiple of 64):
      `qweight` [N, K/2] uint8 as `cpu_linear.pack_int4_pairs(q)`, `scale` and `zero` [N, K/32]
      bfloat16 (a group wider than 32 repeats its scale and zero, so groups of 64-256 store more
      scale and zero bytes than torch's layout); the bias bfloat16. Below
      INT4_PAIRS_DEQUANT_ROWS rows, our kernel (`cpu_linear.linear_int4`): up to 4 rows it scales each
      32-feature chunk's float32 dot product, from 5 it expands W to bfloat16 once per call.
      Measured on a 2-core AMD EPYC (AVX-512 BF16, no AMX) over the 120 decoder linears of
      SmolLM2-135M against torch's kernel: 3.1-4.0 against 3.9-4.1 ms at one row, 4.1-4.6
      against 4.6-5.2 at 2, 6.9 against 6.2-6.9 at 4, 17-18 against 22-25 at 16, 27 against
      43-45 at 32, 49 against 85-89 at 64. From INT4_PAIRS_DEQUANT_ROWS, the float GEMM over W
      expanded to bfloat16 by `cpu_linear.int4_pairs_to_bf16`; where the kernel is disabled
      after construction (RADIXSERVE_DISABLE_CPU_KERNELS), that GEMM at every row count, over
      W expanded by PyTorch (correct, but slow: it expands the whole weight every call).
    - "torch": `qweight` [N, K/2] uint8 in the layout of `_convert_weight_to_int4pack_for_cpu`
      (machine-specific), `scales_and_zeros` [K/g, N, 2] (scale, zero). Below INT4_DEQUANT_ROWS
      rows, torch's kernel.
    - "triton" (on a CUDA device): `qweight` [N, K/2] uint8 as `cpu_linear.pack_int4(q)`,
      `scale` and `zero` [N, K/g] in the activation dtype; the Triton kernel
      `kernels.quant_matmul.int4_linear` at every row count.

    The kernels expand each weight in float32 and accumulate in float32 (the "pairs" kernel from
    5 rows rounds the expanded weight to bfloat16); from their row limit a float GEMM runs over
    W expanded in float32 and rounded to the activation dtype ("fma": kept float32, over x
    widened). `bias` [N] or None. Needs N % 16 == 0 and K % g == 0, g in INT4_GROUP_SIZES.
    """

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
        traceable: bool = False,
    ) -> None:
        """q [N, K] integers in [0, 15] (any integer dtype), scale and zero [N, K/g]; with
        `traceable`, never the "pairs" layout (torch.compile traces torch's kernel, not ours).
        Raises ValueError for a group size or shape the kernel cannot run."""
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, not {group_size}")
        self.out_features, self.in_features = q.shape
        reason = int4_fallback_reason(self.out_features, self.in_features, group_size)
        if reason:
            raise ValueError(f"int4 kernel cannot run this weight: {reason}")
        assert scale.shape == zero.shape == (self.out_features, self.in_features // group_size)
        self.group_size = group_size
        if triton_device(q):
            self.layout = "triton"
        elif f32_kernel(scale.dtype, self.in_features):
            self.layout = "fma"
        elif not traceable and pairs_kernel(scale.dtype, self.in_features):
            self.layout = "pairs"
        else:
            self.layout = "torch"
        self.panels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if self.layout == "pairs":  # a scale and a zero per 32 features, whatever the group
            chunks = group_size // 32
            self.register_buffer("qweight", cpu_linear.pack_int4_pairs(q))
            self.register_buffer("scale", scale.repeat_interleave(chunks, dim=1).contiguous())
            zero = zero.to(scale.dtype).repeat_interleave(chunks, dim=1).contiguous()
            self.register_buffer("zero", zero)
        elif self.layout == "triton":
            self.register_buffer("qweight", cpu_linear.pack_int4(q))
            self.register_buffer("scale", scale.contiguous())
            self.register_buffer("zero", zero.to(scale.dtype).contiguous())
        elif self.layout == "fma":
            scale32 = scale.float()
            zero32 = zero.float() - 8 * scale32
            blocks = cpu_linear.block_int4(cpu_linear.pack_int4(q), scale32, zero32)
            for name, value in zip(("qweight", "scale", "zero"), blocks, strict=True):
                self.register_buffer(name, value)
            # and in panels of 16 output channels, which the kernel reads from F32_PANEL_ROWS rows
            self.panels = cpu_linear.pack_int4_panels16(q, scale32, zero32)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            self.register_buffer("qweight", packed)
            pairs = torch.stack([scale, zero.to(scale.dtype)], dim=-1)  # [N, K/g, 2]
            self.register_buffer("scales_and_zeros", pairs.transpose(0, 1).contiguous())
        wide = torch.float32 if self.layout == "fma" else scale.dtype
        self.register_buffer("bias", None if bias is None else bias.detach().to(wide))

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int, dtype: torch.dtype
    ) -> Int4Linear:
        """Quantizes weight [N, K] (see `quantize_int4`) for activations of `dtype`."""
        q, scale, zero = quantize_int4(weight, group_size, dtype)
        return cls(q, scale, zero, group_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if self.layout == "triton":
            y = _triton().int4_linear(
                flat.contiguous(), self.qweight, self.scale, self.zero, self.group_size, self.bias
            )
            return y.view(*shape[:-1], self.out_features)
        if (call := self.direct(flat)) is not None:
            return call(flat).view(*shape[:-1], self.out_features)
        if self.layout == "fma" and flat.dtype != torch.float32:
            return self.forward(flat.float()).to(x.dtype).view(*shape[:-1], self.out_features)
        if flat.shape[0] == 0:
            y = flat.new_zeros(0, self.out_features)
        elif self.layout in ("fma", "pairs") or (
            flat.shape[0] >= INT4_DEQUANT_ROWS and int4_layout() is not None
        ):
            y = self._float_gemm(flat)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.contiguous(), self.qweight, self.group_size, self.scales_and_zeros
            )
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def direct(self, x: torch.Tensor) -> Linear2D | None:
        """The kernel call `forward` makes for a 2-D input like `x` ([M, in_features]), bound to
        this layer's weights: the FMA kernel of kernels/cpu/linear.py for 1..F32_DEQUANT_ROWS-1
        float32 or bfloat16 rows of an "fma" layer where it is available; our AVX-512 BF16
        kernel (`cpu_linear.linear_int4`, the bias included) for 1..INT4_PAIRS_DEQUANT_ROWS-1
        bfloat16 rows of a "pairs" layer where it is available; torch's kernel for 1..
        INT4_DEQUANT_ROWS-1 rows of a "torch" layer without a bias (a bound call saves the
        module's checks, about 8 us of a 20-45 us call at one row); None where `forward` runs
        the float GEMM or adds a bias."""
        if self.layout == "torch":
            return self._direct_torch(x)
        if self.layout == "pairs":
            return self._direct_pairs(x)
        if self.layout == "triton":
            return None
        if not 0 < x.shape[0] < F32_DEQUANT_ROWS:
            return None
        kernel = cpu_linear.available_f32(x, self.in_features, bfloat16=True)
        if kernel is None:
            return None
        q, scale, zero, group, n, bias = (
            self.qweight,
            self.scale,
            self.zero,
            self.group_size,
            self.out_features,
            self.bias,
        )
        if (panels := self.panels) is not None and x.shape[0] >= F32_PANEL_ROWS:
            return lambda flat: cpu_linear.linear_int4_f32_panels(
                kernel, flat, panels, group, n, bias
            )
        return lambda flat: cpu_linear.linear_int4_f32(kernel, flat, q, scale, zero, group, n, bias)

    def _direct_pairs(self, x: torch.Tensor) -> Linear2D | None:
        if not 0 < x.shape[0] < INT4_PAIRS_DEQUANT_ROWS:
            return None
        kernel = cpu_linear.available(x, self.in_features)
        if kernel is None:
            return None
        q, scale, zero, bias = self.qweight, self.scale, self.zero, self.bias
        return lambda flat: cpu_linear.linear_int4(kernel, flat, q, scale, zero, bias)

    def _direct_torch(self, x: torch.Tensor) -> Linear2D | None:
        rows = x.shape[0]
        if self.bias is not None or rows == 0:
            return None
        if rows >= INT4_DEQUANT_ROWS and int4_layout() is not None:
            return None
        qweight, group, pairs = self.qweight, self.group_size, self.scales_and_zeros
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        return lambda flat: mm(flat.contiguous(), qweight, group, pairs)

    def _float_gemm(self, x: torch.Tensor) -> torch.Tensor:
        block = {"fma": 4, "pairs": 1}.get(self.layout) or int4_layout()[0]  # type: ignore[index]
        step = max(block, DEQUANT_CHUNK // self.in_features // block * block)
        kernel = cpu_linear.available(x, self.in_features) if self.layout == "pairs" else None

        def expand(start: int, end: int) -> torch.Tensor:
            if kernel is None:
                return self._expand(start, end).to(x.dtype)
            rows = slice(start, end)
            return cpu_linear.int4_pairs_to_bf16(
                kernel, self.qweight[rows], self.scale[rows], self.zero[rows]
            )

        parts = [
            F.linear(x, expand(a, min(a + step, self.out_features)))
            for a in range(0, self.out_features, step)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _expand(self, start: int, end: int) -> torch.Tensor:
        """W[start:end] in float32 (start a multiple of the layout's block)."""
        if self.layout == "triton":
            rows = slice(start, end)
            return _triton().int4_weight(
                self.qweight[rows], self.scale[rows], self.zero[rows], self.group_size
            )
        if self.layout == "pairs":
            rows = slice(start, end)
            return cpu_linear.int4_pairs_weight(
                self.qweight[rows], self.scale[rows], self.zero[rows]
            )
        if self.layout == "fma":  # blocks of 4 channels (N is a multiple of 16)
            part = slice(start // 4, end // 4)
            return cpu_linear.int4_weight(
                self.qweight[part], self.scale[part], self.zero[part], self.group_size, end - start
            )
        n, k, g = end - start, self.in_features, self.group_size
        q = _unpack(self.qweight[start:end], n, k, int4_layout())  # type: ignore[arg-type]
        sz = self.scales_and_zeros[:, start:end].float()  # [K/g, n, 2]
        scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # [n, K/g, 1]
        w = torch.addcmul(zero, q.view(n, k // g, g).float() - 8, scale)
        return w.reshape(n, k)

    def dequantize(self) -> torch.Tensor:
        """The weight this layer applies, [N, K] float32: (q - 8) * scale + zero (where the
        packed layout is unknown, the kernel run in float32 on the identity, which expands
        each weight exactly as it does in a product)."""
        if self.layout in ("fma", "pairs", "triton") or int4_layout() is not None:
            return self._expand(0, self.out_features)
        eye = torch.eye(self.in_features, dtype=torch.float32)
        sz = self.scales_and_zeros.float()
        cols = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, sz)
        return cols.t().contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4, group_size={self.group_size}, layout={self.layout}"
        )


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


def traceable_quantized(model: nn.Module) -> int:
    """Re-packs, in place, every quantized layer of `model` laid out for our AVX-512 BF16
    kernels in torch's layout, for torch.compile: it cannot trace our kernels, so those layers
    would run their PyTorch path, expanding the weight on every call (measured: a one-row
    bfloat16 `gguf` decode step took 190 ms instead of 9.6-10.5), while it traces torch's int4
    and int8 kernels. int4 layers ("pairs") go to torch's int4 layout, int8 ones ("panels") to
    plain rows. The same weights; returns how many layers were re-packed."""
    count = 0
    for parent, name, _, child in children_of_type(model, Int4Linear):
        if child.layout != "pairs":
            continue
        every = child.group_size // 32  # the layout repeats a group's scale and zero per 32
        scale, zero = child.scale[:, ::every], child.zero[:, ::every]
        q = cpu_linear.unpack_int4_pairs(child.qweight)
        twin = Int4Linear(q, scale, zero, child.group_size, child.bias, traceable=True)
        setattr(parent, name, twin)
        count += 1
    for parent, name, _, child in children_of_type(model, Int8Linear):
        if child.layout != "panels":
            continue
        q = cpu_linear.unpack_panels(child.qweight, child.out_features)
        setattr(parent, name, Int8Linear(q, child.scale, child.bias, traceable=True))
        count += 1
    return count


@dataclass(frozen=True)
class Quantization:
    """How a model's linear layers are stored: `method` none, int8, int4 (quantize a float
    checkpoint; int4 in groups of `group_size` input features) or gguf (the quantized blocks of
    the GGUF file at `gguf_path`)."""

    method: str = "none"
    group_size: int = 32
    gguf_path: Path | None = None

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATION_METHODS:
            raise ValueError(f"--quantization must be one of {QUANTIZATION_METHODS}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"--quantization-group-size must be one of {INT4_GROUP_SIZES}")
        if self.method == "gguf" and self.gguf_path is None:
            raise ValueError("--quantization gguf needs a GGUF model file")

    @property
    def label(self) -> str:
        return _label(self.method, self.group_size)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of a quantized layer's weight buffers (quantized values, scales, zeros)."""
    return sum(b.numel() * b.element_size() for n, b in module.named_buffers() if n != "bias")


def check_quantizable(dtype: torch.dtype, device: torch.device) -> None:
    """Raises ValueError where the quantized kernels cannot run: off the CPU and CUDA (the
    Triton kernels of kernels/quant_matmul.py) or in a dtype other than bfloat16, float16 or
    float32."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--quantization runs on the CPU or CUDA, not {device}")
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"--quantization needs a bfloat16, float16 or float32 model, not {dtype}")


def quantize_linear(linear: nn.Linear, method: str, group_size: int) -> nn.Module | str:
    """The quantized twin of `linear` (`method` int8 or int4), in the dtype of its weight; or,
    where the kernel cannot run its shape, a string saying why."""
    n, k = linear.out_features, linear.in_features
    weight, bias, dtype = linear.weight, linear.bias, linear.weight.dtype
    if method == "int8":
        reason = int8_fallback_reason(n, k)
        return reason or Int8Linear.from_float(weight, bias, dtype)
    if method == "int4":
        reason = int4_fallback_reason(n, k, group_size)
        return reason or Int4Linear.from_float(weight, bias, group_size, dtype)
    raise ValueError(f"cannot quantize a float checkpoint with method {method!r} (int8, int4)")


def quantize_linears(
    model: nn.Module, method: str, group_size: int = 32, head_method: str | None = "int8"
) -> list[str]:
    """Replaces every `nn.Linear` of `model` by its `method` (int8 or int4) twin, in place; the
    LM head (`model.lm_head`) by its `head_method` twin (default int8; None: `method`). The head
    is the layer most sensitive to 4 bits (on SmolLM2-135M an int4 head alone costs 5% of
    perplexity, its 120 other layers in int4 0.3%), so int4 keeps it at int8, as llama.cpp's Q4
    mixes keep it at 6 or 8 bits. A head tied to the embedding gets a quantized copy and the
    embedding keeps its float table. Layers whose shape the kernel cannot run stay float (one
    warning per reason). Returns the names of the layers left float. Raises ValueError for an
    unknown method, a group size the int4 kernel lacks, or a model off the CPU and CUDA or in
    a dtype other than bfloat16, float16 or float32."""
    if method == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, not {group_size}")
    first = next(model.parameters())
    check_quantizable(first.dtype, first.device)
    targets = children_of_type(model, nn.Linear)
    kept: dict[str, list[str]] = {}  # reason -> layers
    with torch.no_grad():
        for parent, name, full, child in targets:
            how = (head_method or method) if full == "lm_head" else method
            twin = quantize_linear(child, how, group_size)
            if isinstance(twin, str):
                kept.setdefault(twin, []).append(full)
            else:
                setattr(parent, name, twin)
    for reason, names in kept.items():
        listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        log.warning("%d linear layers stay %s (%s): %s", len(names), first.dtype, reason, listed)
    left = [n for names in kept.values() for n in names]
    head = f"; lm_head {head_method}" if head_method and head_method != method else ""
    label = _label(method, group_size)
    log.info("quantized %d linear layers to %s%s", len(targets) - len(left), label, head)
    return left


def _label(method: str, group_size: int) -> str:
    return f"int4 (groups of {group_size})" if method == "int4" else method
