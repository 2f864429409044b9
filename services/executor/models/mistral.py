"""Mistral: the Llama block; its sliding window (ModelConfig.sliding_window) is applied by the
attention backend's mask."""

from __future__ import annotations

from services.executor.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
