"""Tiny random-weight models built in memory, and an engine over them."""

from __future__ import annotations

import torch
import transformers

from services.executor.engine import Engine, EngineLimits
from services.executor.model_config import ModelConfig
from services.executor.weights import build_model, load_weights

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)

VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "llama31": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    # head_dim 64 with three query heads per KV head, the shape of SmolLM2's attention (and the
    # one the CPU extend kernel takes)
    "gqa3-hd64": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1},
    ),
    "untied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"tie_word_embeddings": False, "num_key_value_heads": 4},
    ),
}


def hf_model(variant: str = "llama", seed: int = 0) -> transformers.PreTrainedModel:
    config_cls, model_cls, extra = VARIANTS[variant]
    config = getattr(transformers, config_cls)(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # random biases so Qwen2's q/k/v bias path is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def engine_for(
    hf: transformers.PreTrainedModel,
    num_slots: int = 4096,
    max_rows: int = 64,
    dtype: torch.dtype = torch.float32,
    kv_dtype: torch.dtype | None = None,
) -> Engine:
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    ctx = cfg.max_position_embeddings
    model = build_model(cfg, ctx, dtype, torch.device("cpu"))
    load_weights(model, hf.state_dict().items())
    limits = EngineLimits(num_slots, max_rows, ctx, kv_dtype=kv_dtype)
    return Engine(model, cfg, limits, torch.device("cpu"))
