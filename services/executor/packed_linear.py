"""Linear layers with weights pre-packed for oneDNN, applied to a loaded model on the CPU.

`F.linear` on a bfloat16 CPU tensor hands the weight to oneDNN in PyTorch's plain row-major layout,
and oneDNN reorders it into its blocked layout on every call: at decode batch sizes that reorder
costs as much as the multiply. Packing once at load time (what vLLM's CPU backend does with its
oneDNN linear) removes it; the bfloat16 products are bit-identical to `F.linear` (same kernel,
same accumulation order), so greedy outputs do not change.

Float32 weights are packed for oneDNN too where torch has it. `F.linear` in float32 runs MKL's
SGEMM, which re-packs the weight on every call as well; over this model's layers on an AVX2 host
oneDNN's packed float32 GEMM takes 84 against 144 ms at 32 rows and 19 against 43 ms for the LM
head (see F32_SMALL_BATCH_ROWS). Its sums run in another order than MKL's, so float32 rows from
oneDNN can differ from `F.linear` by float32 rounding.

Small inputs skip oneDNN and run a kernel of kernels/cpu/linear.py: bfloat16 ones over a copy of
the weight packed once into panels of 16 output channels, on AMX tiles where the CPU has them (up
to AMX_TILE_ROWS rows, and at any row count for a layer that narrows its input twofold, which
oneDNN runs on one thread) and with AVX-512 BF16 dot products up to SMALL_BATCH_ROWS rows
elsewhere; float32 ones the
AVX2 FMA kernel over the plain weight up to F32_SMALL_BATCH_ROWS rows. oneDNN's fixed cost per
call is most of a small layer's time at one row, and at decode batch sizes its blocking leaves
the dot-product units idle. Those kernels sum in another order too. The layer keeps the panels or
the plain weight beside the packed one, which doubles the memory of the linear weights (a tied LM
head's plain weight is the embedding's own).

On CPUs without AVX-512, float32 and bfloat16 layers get `PanelLinear` instead of either: the
weight packed once into panels of 16 output channels and multiplied by a panel kernel at every row
count (bfloat16 widened to float32 as it is read). Measured on a 2-core AVX2 host over this
model's 120 decoder linear layers, float32 ran ahead of both the FMA kernel and oneDNN's packed
GEMM from one row to 1,024 (see PanelLinear), and the layer holds one copy of its weight instead of
two; bfloat16 there has no oneDNN GEMM at all, and torch's own ran many times slower.

Where torch has no oneDNN, other float32 models get `SmallBatchLinear`: the FMA kernel up to
F32_FALLBACK_ROWS rows and `F.linear` above, over the loaded weight alone.

Like quantization, this is applied to a built model from outside the model files: `prepack_linears`
swaps every `nn.Linear` for a `PackedLinear` holding the packed weight, or a `SmallBatchLinear`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu import linear as cpu_linear
from kernels.cpu.build import cpu_flags

log = logging.getLogger("radixserve.executor")

# A linear layer's product for one contiguous [M, in_features] input: → [M, out_features].
Linear2D = Callable[[torch.Tensor], torch.Tensor]

# Batch size oneDNN is told to expect when it picks the packed layout; measured here, the layouts
# chosen for 16..64 rows give bit-identical results at every batch size and run within a few % of
# the best at 1 and at 512 rows.
PACK_BATCH_HINT = 64

HAS_AMX = "amx_bf16" in cpu_flags().split()

# Rows up to which bfloat16 layers run a kernel of ours over their panels instead of oneDNN: with
# AVX-512 BF16 dot products (`linear_bf16_panels`) on CPUs without AMX; where the CPU has AMX the
# tiles (`linear_bf16_amx`) were measured here first, and run up to AMX_TILE_ROWS now (below).
# Over this model's 120 decoder linear layers (distinct weights, so each is read from memory):
# - a 2-vCPU Intel Xeon with AMX, the tiles against oneDNN (also on AMX tiles) and the AVX-512
#   panels, medians of three runs: 7.2 / 13.1 / 7.4 ms at one row, 7.1 / 12.1 / 8.2 at 4, 7.4 /
#   12.2 / 13.5 at 8, 7.7 / 12.3 / 19.3 at 16, 9.5 / 14.7 / 34.2 at 32, 14.5 / 16.6 / 64.3 at
#   64, 19.3 / 23.7 / 125 at 128, behind oneDNN at 256 (32.1 against 30.4);
# - a 2-core AMD EPYC (AVX-512 BF16, no AMX), the panels against oneDNN on the same dot products:
#   12.1-13.1 ms at 16 rows against 14.5-19.5, 16.7-18.0 at 32 and 25.6-27.2 at 64 against
#   19.3-23.8 and 30.0-31.7, behind at 128 (47.5 against 42.2 ms). Once each panel tile fetched
#   its share of the next panel into L2, the panels also led the kernel over the plain row-major
#   weight from one row on (5.2-7.0 against 7.7-7.9 ms at one row), and `radixserve serve` gave
#   69.5 against 64.0 output tok/s one request at a time (TPOT p50 12.1 against 14.2 ms) and
#   279.6 against 266.8 at concurrency 8 (medians of three rounds, alternating). With the fetch
#   ahead, on a later (slower) day, both in one process, medians of seven alternating rounds:
#   10.5 against 15.5 ms at 16 rows, 34.1 against 43.6 at 64, 43.9 against 56.8 at 79 (15 decode
#   rows and a 64-token question), 52.0 against 66.2 at 96, 71.7 against 79.8 at 128, 133.6
#   against 141.1 at 256, within 2% from 288 to 448 and even at 512 (261.3 against 259.5).
#   With tiles of 8 rows x 3 blocks (kernels/cpu/linear.cpp), the same comparison on a host of
#   half that dot-product rate (seven alternating rounds, medians; two runs): 133.8 against
#   142.4 ms at 256, 148.6 against 162.7 at 288, 167.1-168.3 against 179.8-182.8 at 320, 179.8
#   against 191.0 at 352, 199.5-209.9 against 202.9-205.1 at 384 and even from 448 (251.3 against
#   251.1; 262.5 against 264.0 at 512). The rows past 256 are prefill steps with decode rows
#   beside a 256-token prompt.
SMALL_BATCH_ROWS = 352

# Where the CPU has AMX, the tile kernel also runs every layer up to AMX_TILE_ROWS rows, and at
# any row count the layers that narrow their input at least twofold (in_features >= 2 x
# out_features: the MLP's down projection), for which oneDNN's GEMM kept to one of the two
# threads at 256 rows and more. On that 2-vCPU Xeon, 30 layers of each shape of SmolLM2-135M
# (distinct weights), oneDNN against the tiles, ms: at 76 rows 15.5 against 15.1 over the four
# shapes; at 128, 20.7 against 17.5; at 256, 38.2 against 31.7, of which the down projection
# (1,536 -> 576) 11.4 against 6.3 (one thread of oneDNN took 0.30 ms a layer, two 0.31); at 512
# the down projection 22.7 against 13.0 and at 1,024 51.8 against 28.3, while the other shapes
# were even or behind on the tiles (at 512: 45.9 against 49.0).
AMX_TILE_ROWS = 128

# Rows from which a CPU with AMX runs the tile kernel; one row runs the AVX-512 panels there.
# Measured on that Xeon: the two were even over the decoder linears at one row (above), but with
# the LM head 9.1-9.8 ms for the panels against 9.7-10.1 (three runs, alternating), and
# `radixserve serve` one request at a time gave 67.2 output tok/s (TPOT p50 13.8 ms) against
# 62.1 (15.5 ms) with the tiles from one row (medians of three runs).
AMX_MIN_ROWS = 2

# Rows up to which a CPU with AMX runs the AVX-512 panels where the tile kernel is not built;
# oneDNN above, on its own AMX kernels (on that Xeon: 8.8 against 12.1 ms at 6 rows, 13.5 against
# 12.2 at 8). Where Linux refused this process the tiles, oneDNN runs without them too, and the
# panels run up to SMALL_BATCH_ROWS as on CPUs without AMX.
AMX_PANEL_ROWS = 6


def amx_gemm() -> bool:
    """Whether oneDNN's bfloat16 GEMM runs on AMX tiles here: the CPU has them and Linux did not
    refuse this process the tiles."""
    return HAS_AMX and not cpu_linear.amx_refused()


# Rows up to which float32 `PackedLinear`s run the FMA kernel instead of oneDNN's packed GEMM.
# Measured on an AVX2 host over this model's 120 decoder linear layers (distinct weights, read
# from memory): 21.6 against 28.7 ms at one row, 27.3 against 29.1 at 3, 37.0 against 43.0 at 6,
# behind from there (44.7 against 36.5 at 8; at 32 rows 137 against 84, and `F.linear` 144).
F32_SMALL_BATCH_ROWS = 6

# The same for `SmallBatchLinear` (torch without oneDNN), against `F.linear`. Measured on an AVX2
# host over this model's 210 decoder linear layers: 20 against 30 ms at one row, 37 against 51 at
# 8, even at 16, behind from there.
F32_FALLBACK_ROWS = 8


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """True where packing pays: on a CPU whose torch has oneDNN, float32, and bfloat16 where the
    instruction set has oneDNN's bfloat16 GEMM (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; on an
    AVX2-only CPU the reorder raises, and torch's plain bfloat16 linear is used instead)."""
    if not (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    ):
        return False
    return dtype == torch.float32 or (
        hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class PackedLinear(nn.Module):
    """y = x W^T + b with W in oneDNN's blocked layout.

    x: [..., in_features] on the CPU, in the weight's dtype (bfloat16 or float32) →
    [..., out_features] in that dtype. `weight` is an opaque mkldnn tensor: it cannot be sliced,
    copied into or read as a plain tensor. The small-batch kernels of a bfloat16 layer read
    `panels` ([ceil(out_features / 16), in_features * 16] bfloat16, `cpu_linear.pack_panels`, a
    copy), those of a float32 layer `plain`, the row-major weight [out_features, in_features]
    (the loaded tensor itself, shared with a tied embedding); each is None where no kernel reads
    it (not built, disabled at load time, in_features not a multiple of 32, or the other dtype).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        # The small-batch kernels' weight, None where no kernel takes it (the loaded tensor is
        # then left to be freed). `available*` check the weight as they would an input: its
        # dtype on the CPU, in_features a multiple of 32, kernel built and enabled.
        kernel = cpu_linear.available(weight, self.in_features)
        self.panels: torch.Tensor | None = (
            cpu_linear.pack_panels(kernel, weight) if kernel is not None else None
        )
        f32 = cpu_linear.available_f32(weight, self.in_features) is not None
        self.plain: torch.Tensor | None = weight.contiguous() if f32 else None
        self.register_buffer(
            "weight", torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        )
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        return self.direct(flat)(flat).view(*shape[:-1], self.out_features)

    def direct(self, x: torch.Tensor) -> Linear2D:
        """The call `forward` makes for a 2-D input like `x` ([M, in_features]), bound to this
        layer's weights: a kernel of ours where it is available (bfloat16: the AMX tiles' from
        AMX_MIN_ROWS where the CPU has them, up to AMX_TILE_ROWS rows or at any count for a layer
        that narrows twofold; else the AVX-512 panels' up to SMALL_BATCH_ROWS, and only up to
        AMX_PANEL_ROWS where oneDNN runs on AMX tiles (`amx_gemm`); float32 up to
        F32_SMALL_BATCH_ROWS), oneDNN otherwise."""
        plain, panels, packed, bias = self.plain, self.panels, self.weight, self.bias
        rows, out_features = x.shape[0], self.out_features
        if plain is not None and 0 < rows <= F32_SMALL_BATCH_ROWS:
            kernel = cpu_linear.available_f32(x, self.in_features)
            if kernel is not None:
                return lambda flat: cpu_linear.linear_f32(kernel, flat, plain, bias)
        elif panels is not None and rows > 0:
            amx = HAS_AMX and rows >= AMX_MIN_ROWS
            narrowing = self.in_features >= 2 * out_features
            if amx and (rows <= AMX_TILE_ROWS or narrowing):
                tiles = cpu_linear.available_amx(x, self.in_features)
                if tiles is not None:
                    return lambda flat: cpu_linear.linear_bf16_amx(
                        tiles, flat, panels, out_features, bias
                    )
            kernel = cpu_linear.available(x, self.in_features) if rows <= SMALL_BATCH_ROWS else None
            if kernel is not None and (rows <= AMX_PANEL_ROWS or not amx_gemm()):
                return lambda flat: cpu_linear.linear_bf16_panels(
                    kernel, flat, panels, out_features, bias
                )
        return lambda flat: torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=onednn"


class SmallBatchLinear(nn.Module):
    """y = x W^T + b for float32 on the CPU: x [..., in_features] → [..., out_features], through
    the AVX2 FMA kernel for inputs of 1..F32_FALLBACK_ROWS rows (where it is built and not
    disabled), through `F.linear` otherwise. `weight` and `bias` are the loaded parameters
    themselves (shared with a tied embedding). The kernel sums in another order than
    `F.linear`, so its rows can differ from it by float32 rounding."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        call = self._kernel_call(flat)
        if call is None:
            return F.linear(x, self.weight, self.bias)
        return call(flat).view(*shape[:-1], self.out_features)

    def direct(self, x: torch.Tensor) -> Linear2D:
        """The call `forward` makes for a 2-D input like `x` ([M, in_features]), bound to this
        layer's weights: the FMA kernel for 1..F32_FALLBACK_ROWS float32 rows where it is
        available, `F.linear` otherwise."""
        call = self._kernel_call(x)
        if call is not None:
            return call
        weight = self.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        return lambda flat: F.linear(flat, weight, bias)

    def _kernel_call(self, x: torch.Tensor) -> Linear2D | None:
        if not 0 < x.shape[0] <= F32_FALLBACK_ROWS:
            return None
        kernel = cpu_linear.available_f32(x, self.in_features)
        if kernel is None:
            return None
        weight = self.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        return lambda flat: cpu_linear.linear_f32(kernel, flat, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, small-batch"


class PanelLinear(nn.Module):
    """y = x W^T + b for float32 or bfloat16 on a CPU without AVX-512 (AVX2 and FMA):
    x [..., in_features] → [..., out_features] in the weight's dtype, W packed once into `panels`
    ([ceil(out_features / 16), in_features * 16] of that dtype, `cpu_linear.pack_panels16`) and
    multiplied at every row count by `cpu_linear.linear_f32_panels` (float32) or
    `cpu_linear.linear_bf16_f32_panels` (bfloat16: x and W widened to float32, which is exact,
    each output rounded to bfloat16 once). Each output is one float32 sum over input features in
    ascending order, so a row never depends on the rest of its batch; the order differs from
    `F.linear`'s, so rows can differ from it by float32 rounding.

    The panels are the layer's only copy of the weight (the loaded tensor is released, except a
    tied LM head's, which is the embedding's). Where the kernels are disabled at run time
    (RADIXSERVE_DISABLE_CPU_KERNELS) or under torch.compile, `forward` multiplies by the weight
    unpacked from the panels with `F.linear`.

    Over this model's 120 decoder linear layers on a 2-core AVX2 host (distinct weights, read from
    memory; float32: the FMA kernel / oneDNN's packed GEMM / these panels): one row 18.8 / 30.9 /
    17.8 ms, 8 rows 42.5 / 40.9 / 29.1, 16 rows 67.1 / 51.3 / 36.9, 32 rows - / 73.9 / 60.2, 64
    rows - / 132.6 / 111.0, 512 rows - / 808 / 806, 1,024 rows - / 1,540 / 1,484. The LM head
    ([49,152, 576]) was even with oneDNN up to 256 rows and 4-8 % behind at 512-1,024. Bfloat16
    there has no oneDNN GEMM (torch's `F.linear` ran a whole decode step of 32 rows in 676 ms).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("panels", cpu_linear.pack_panels16(linear.weight.detach()))
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        return self.direct(flat)(flat).view(*shape[:-1], self.out_features)

    def direct(self, x: torch.Tensor) -> Linear2D:
        """The call `forward` makes for a 2-D input like `x` ([M, in_features]), bound to this
        layer's panels: the panel kernel for x in the panels' dtype on the CPU, `F.linear` over
        the unpacked weight where the kernels are disabled (or for another input)."""
        panels, bias, out_features = self.panels, self.bias, self.out_features
        kernel = cpu_linear.available_panels16(x)
        if kernel is not None and x.dtype == panels.dtype:
            run = (
                cpu_linear.linear_f32_panels
                if panels.dtype == torch.float32
                else cpu_linear.linear_bf16_f32_panels
            )
            return lambda flat: run(kernel, flat, panels, out_features, bias)
        return lambda flat: F.linear(flat, self.unpacked_weight(), bias)

    def unpacked_weight(self) -> torch.Tensor:
        """The weight [out_features, in_features] in the panels' dtype, rebuilt from the panels
        (a copy)."""
        return cpu_linear.unpack_panels16(self.panels, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, panels=16"


def can_use_panels16(dtype: torch.dtype, device: torch.device) -> bool:
    """True where linear layers become `PanelLinear`s: float32 or bfloat16 on a CPU with AVX2 and
    FMA but without AVX-512 (float32: the panel kernel was measured ahead of oneDNN at every row
    count; bfloat16: torch has no oneDNN bfloat16 GEMM there), the kernel built (which this may
    do) and not disabled by RADIXSERVE_DISABLE_CPU_KERNELS."""
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and "avx512f" not in cpu_flags().split()
        and cpu_linear.f32_module() is not None
    )


FLOAT_LINEARS = (nn.Linear, PackedLinear, SmallBatchLinear, PanelLinear)


def can_use_small_batch_f32(dtype: torch.dtype, device: torch.device) -> bool:
    """True where `SmallBatchLinear` runs its kernel: float32 on a CPU with AVX2 and FMA (the
    kernel built, which this may do), kernels not disabled by RADIXSERVE_DISABLE_CPU_KERNELS."""
    return device.type == "cpu" and dtype == torch.float32 and cpu_linear.f32_module() is not None


def children_of_type(
    model: nn.Module, types: type | tuple[type, ...], skip: type | tuple[type, ...] = ()
) -> list[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, full name, child) for every submodule of `model` that is a `types`,
    except inside a `skip`; listed before any is swapped, so callers may `setattr` as they go."""
    return [
        (parent, name, f"{prefix}.{name}" if prefix else name, child)
        for prefix, parent in model.named_modules()
        if not isinstance(parent, skip)
        for name, child in parent.named_children()
        if isinstance(child, types)
    ]


def prepack_linears(model: nn.Module) -> int:
    """Replaces every `nn.Linear` of `model` (lm_head included, even when it is tied to the
    embedding: the embedding keeps its plain weight) by a `PanelLinear` where `can_use_panels16`
    (float32 or bfloat16 on a CPU without AVX-512), else by a `PackedLinear` where `can_prepack`
    (bfloat16 or float32 with oneDNN), or else by a `SmallBatchLinear` where
    `can_use_small_batch_f32` (float32 without oneDNN), in place.
    Returns how many were replaced; 0 when neither holds for the model's weights."""
    first = next(model.parameters())
    kind: type[nn.Module]
    if can_use_panels16(first.dtype, first.device):
        kind, what = PanelLinear, "packed %d linear layers into panels of 16 channels"
    elif can_prepack(first.dtype, first.device):
        kind, what = PackedLinear, "packed %d linear layers for oneDNN"
    elif can_use_small_batch_f32(first.dtype, first.device):
        kind, what = SmallBatchLinear, "%d float32 linear layers run the FMA kernel at small batch"
    else:
        return 0
    targets = children_of_type(model, nn.Linear)
    for parent, name, _, child in targets:
        setattr(parent, name, kind(child))
    log.info(what, len(targets))
    return len(targets)
