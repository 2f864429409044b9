"""Building blocks shared by the model files: norms, rotary embedding, fused linears.

The element-wise steps run as one fused kernel each: the C++ ones of kernels/cpu/fused.py on the
CPU (which fall back to their PyTorch references where the build is unavailable), the Triton ones
of kernels/ on CUDA.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kernels.cpu import fused


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm, optionally fusing the residual add: (x, residual) → (normed, x+residual)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [T, hidden]
        if x.is_cuda:
            from kernels.rmsnorm import rmsnorm  # Triton: imported where CUDA runs it

            if residual is not None:
                residual = residual.clone()  # the kernel writes x + residual into it
            out = rmsnorm(x, self.weight, self.eps, residual)
        else:
            out, residual = fused.add_rmsnorm(x, residual, self.weight, self.eps)
        return out if residual is None else (out, residual)


class MergedLinear(nn.Linear):
    """A linear layer whose output is several HF weights stacked (q|k|v, gate|up).

    `output_sizes` tells the weight loader where each source weight goes.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)

    def shard_offset(self, index: int) -> tuple[int, int]:
        return sum(self.output_sizes[:index]), self.output_sizes[index]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, 2 * intermediate] = gate | up → [num_tokens, intermediate]
    if x.is_cuda:
        from kernels.silu_and_mul import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(x)
    return fused.silu_and_mul(x)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with llama3 or linear scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])  # type: ignore[index]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)  # type: ignore[arg-type]
    raise ValueError(f"unsupported rope scaling type {rope_type!r} (default, linear, llama3)")


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE over a precomputed cos/sin table [max_positions, head_dim // 2]."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.scaling = theta, scaling
        self.init_table(None)

    def init_table(self, device: torch.device | None) -> None:
        """(Re)computes cos/sin in float32 (also after building on the meta device)."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq).to(device or torch.get_default_device())
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated q [T, H, D] and k [T, Hkv, D] of a fused projection qkv [T, (H + 2 Hkv) D]
        at positions [T]. On the CPU in the activation dtype with cos/sin cast to it, as HF does;
        on CUDA in float32 (the Triton kernel), rounded once."""
        if qkv.is_cuda:
            from kernels.rope import apply_rope  # Triton: imported where CUDA runs it

            q_size, kv_size = num_heads * self.head_dim, num_kv_heads * self.head_dim
            q = qkv[:, :q_size].view(-1, num_heads, self.head_dim)
            k = qkv[:, q_size : q_size + kv_size].view(-1, num_kv_heads, self.head_dim)
            return apply_rope(q, k, positions, self.cos, self.sin)
        return fused.rope(
            qkv, positions, self.cos, self.sin, num_heads, num_kv_heads, self.head_dim
        )
