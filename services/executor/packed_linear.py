"""Linear layers with weights pre-packed for oneDNN, applied to a loaded model on the CPU.

`F.linear` on a bfloat16 CPU tensor hands the weight to oneDNN in PyTorch's plain row-major layout,
and oneDNN reorders it into its blocked layout on every call: at decode batch sizes that reorder
costs as much as the multiply. Packing once at load time (what vLLM's CPU backend does with its
oneDNN linear) removes it; the products are bit-identical to `F.linear` (same kernel, same
accumulation order), so greedy outputs do not change.

Inputs of up to SMALL_BATCH_ROWS rows (decode at small batch sizes) skip oneDNN and run the
AVX-512 BF16 kernel of kernels/cpu/linear.py over the plain weight, which the layer keeps beside
the packed one: oneDNN's fixed cost per call is most of a small layer's time at one row. That
kernel sums in another order, so those rows can differ from `F.linear` in the last bfloat16 bit.

Like quantization, this is applied to a built model from outside the model files: `prepack_linears`
swaps every `nn.Linear` for a `PackedLinear` holding the packed weight.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kernels.cpu import linear as cpu_linear

log = logging.getLogger("radixserve.executor")

# Batch size oneDNN is told to expect when it picks the packed layout; measured here, the layouts
# chosen for 16..64 rows give bit-identical results at every batch size and run within a few % of
# the best at 1 and at 512 rows.
PACK_BATCH_HINT = 64

# Rows up to which the small-batch kernel runs instead of oneDNN. Measured here over this model's
# 121 linear layers (distinct weights, so each is read from memory): 12.6 against 19.8 ms at one
# row, 15.9 against 18.8 ms at 4; oneDNN (with AMX) is ahead from 6 rows on.
SMALL_BATCH_ROWS = 4


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """True where packing pays and is exact: bfloat16 on a CPU whose torch has oneDNN and whose
    instruction set oneDNN's bfloat16 GEMM runs on (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; on an
    AVX2-only CPU the reorder raises, and torch's plain bfloat16 linear is used instead)."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class PackedLinear(nn.Module):
    """y = x W^T + b with W in oneDNN's blocked layout.

    x: [..., in_features] bfloat16 on the CPU → [..., out_features] bfloat16. `weight` is an opaque
    mkldnn tensor: it cannot be sliced, copied into or read as a plain tensor. `plain` is the
    row-major weight [out_features, in_features] the small-batch kernel reads (not a buffer: it is
    the loaded tensor itself, shared with a tied embedding).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.plain = weight.contiguous()
        self.register_buffer(
            "weight", torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        )
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        kernel = (
            cpu_linear.available(flat, self.in_features)
            if 0 < flat.shape[0] <= SMALL_BATCH_ROWS
            else None
        )
        if kernel is not None:
            y = cpu_linear.linear_bf16(kernel, flat, self.plain, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=onednn"


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
    embedding: the embedding keeps its plain weight) by a `PackedLinear`, in place.
    Returns how many were packed; 0 when `can_prepack` is false for the model's weights."""
    first = next(model.parameters())
    if not can_prepack(first.dtype, first.device):
        return 0
    targets = children_of_type(model, nn.Linear)
    for parent, name, _, child in targets:
        setattr(parent, name, PackedLinear(child))
    log.info("packed %d linear layers for oneDNN", len(targets))
    return len(targets)
