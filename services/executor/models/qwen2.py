"""Qwen2 / Qwen2.5: the Llama block with biases on q, k and v (set by ModelConfig.qkv_bias)."""

from __future__ import annotations

from services.executor.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
