"""Small-batch linear layers on the CPU (kernels/cpu/linear.cpp), with references.

At decode batch sizes a linear layer's time is reading its weights; oneDNN's bfloat16 GEMM adds
20-30 us per call to that and torch's int8 kernel reads at about half the memory bandwidth. The
C++ kernels here stream the weights into AVX-512 BF16 dot products instead, for inputs of a few
rows (the callers pick the row limit from measurements, see packed_linear.py and
quantization.py). Each `*_ref` is the PyTorch formula the kernel computes; results agree with it
to float32 summation order, rounded to bfloat16 once.

The kernels need a CPU with AVX-512 BF16 (elsewhere they are not built and callers fall back to
PyTorch), bfloat16 activations, and an input width that is a multiple of 32.
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
K_MULTIPLE = 32  # input features per AVX-512 BF16 dot product


def available(x: torch.Tensor, in_features: int) -> ModuleType | None:
    """The compiled module when an input like `x` ([M, in_features]) can use it: bfloat16 on
    the CPU, `in_features` a multiple of 32, kernels not disabled by
    RADIXSERVE_DISABLE_CPU_KERNELS=1, not inside torch.compile; None otherwise."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or in_features % K_MULTIPLE:
        return None
    return _linear.load() if kernels_enabled() else None


def load_error() -> str | None:
    """Why the kernels could not be built (None: built, or not tried yet)."""
    return _linear.error


def linear_bf16(
    module: ModuleType, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T + bias [N], all bfloat16 → [M, N] bfloat16 (`module` from
    `available`). Raises RuntimeError on a shape or dtype the kernel does not take."""
    return module.linear_bf16(x.contiguous(), weight, bias)


def linear_bf16_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The float32 product rounded to bfloat16 once."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def linear_int8(
    module: ModuleType,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] bfloat16 @ (qweight [N, K] int8 * scale [N] bfloat16)^T + bias [N] → [M, N]
    bfloat16, summed as (x · q) * scale in float32 (`module` from `available`). Raises
    RuntimeError on a shape or dtype the kernel does not take."""
    return module.linear_int8(x.contiguous(), qweight, scale, bias)


def linear_int8_ref(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """(x · q) * scale (+ bias) in float32, rounded to bfloat16 once."""
    y = F.linear(x.float(), qweight.float()) * scale.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)
