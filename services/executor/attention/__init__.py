"""Attention backends, chosen by `--attention-backend` through a small registry."""

from __future__ import annotations

from services.executor.attention import (
    torch_backend,  # noqa: F401  (registers "torch")
    triton_backend,  # noqa: F401  (registers "triton")
)
from services.executor.attention.base import ATTENTION_BACKENDS, AttentionBackend, create_backend

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "create_backend", "default_backend"]


def default_backend(device: str) -> str:
    return "triton" if device.startswith("cuda") and "triton" in ATTENTION_BACKENDS else "torch"
