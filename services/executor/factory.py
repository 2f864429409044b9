"""From an ExecutorConfig to a running Engine: device, dtype, threads, weights, KV sizing."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.model_store import resolve_model_path, served_name
from services.executor.attention import default_backend
from services.executor.config import ExecutorConfig
from services.executor.decode_runner import StaticDecodeConfig
from services.executor.engine import Engine, EngineLimits
from services.executor.grammar import GrammarRuntime, hf_tokenizer_info
from services.executor.kv_pool import KVPool
from services.executor.model_config import ModelConfig
from services.executor.weights import load_model

log = logging.getLogger("radixserve.executor")


@dataclass(frozen=True)
class LoadedModel:
    engine: Engine
    model_path: Path
    served_name: str
    backend: str


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return getattr(torch, name)


def set_threads(num_threads: int | None) -> int:
    n = num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def size_kv_pool(
    cfg: ExecutorConfig,
    model_cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    context: int,
) -> int:
    if cfg.max_total_tokens:
        return cfg.max_total_tokens
    per_token = KVPool.bytes_per_token(
        model_cfg.num_layers, model_cfg.num_kv_heads, model_cfg.head_dim, dtype
    )
    budget = int(available_memory(device) * cfg.mem_fraction_static)
    slots = min(budget // per_token, cfg.max_running_requests * context)
    if slots < context:
        raise ValueError(
            f"the KV pool would hold {slots} tokens, less than the context length {context}; "
            "raise --mem-fraction-static or lower --context-length"
        )
    return slots


def static_decode_config(cfg: ExecutorConfig, device: torch.device) -> StaticDecodeConfig | None:
    """Static-shape decode where it pays: CUDA graphs on CUDA (unless disabled), and wherever
    --enable-torch-compile asks for it. Eager decode on the CPU otherwise: padding only costs there."""
    graphs = device.type == "cuda" and not cfg.disable_cuda_graph
    if not (graphs or cfg.enable_torch_compile):
        return None
    return StaticDecodeConfig(
        cfg.cuda_graph_max_bs, cuda_graph=graphs, torch_compile=cfg.enable_torch_compile
    )


def create_engine(cfg: ExecutorConfig) -> LoadedModel:
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    threads = set_threads(cfg.num_threads) if device.type == "cpu" else 0
    path = resolve_model_path(cfg.model_path)
    model_cfg = ModelConfig.from_dir(path)
    context = cfg.context_length or model_cfg.max_position_embeddings
    if model_cfg.sliding_window is None and context > model_cfg.max_position_embeddings:
        log.warning(
            "context length %d exceeds the model's %d", context, model_cfg.max_position_embeddings
        )
    # torch.compile cannot trace oneDNN's opaque packed weights.
    model = load_model(path, model_cfg, context, dtype, device, not cfg.enable_torch_compile)
    slots = size_kv_pool(cfg, model_cfg, dtype, device, context)
    limits = EngineLimits(slots, cfg.max_running_requests, context, cfg.max_top_logprobs)
    backend = cfg.attention_backend or default_backend(device.type)
    grammar = GrammarRuntime(
        lambda: hf_tokenizer_info(path, model_cfg.vocab_size, model_cfg.eos_token_ids),
        model_cfg.vocab_size,
        cfg.max_running_requests,
        device,
        threads=max(threads, 1),
    )
    engine = Engine(
        model, model_cfg, limits, device, backend, static_decode_config(cfg, device), grammar
    )
    engine.fault_request_id = cfg.fault_injection_request_id
    engine.fault_stage = cfg.fault_injection_stage
    if cfg.fault_injection_request_id:
        log.warning(
            "fault injection on: requests whose id contains %r fail in %s",
            cfg.fault_injection_request_id,
            "every forward pass" if cfg.fault_injection_stage == "forward" else "sampling",
        )
    runner = engine.decode_runner
    log.info(
        "engine ready: %s, %s on %s (%d threads), %d KV slots, context %d, backend %s, decode %s",
        model_cfg.architecture,
        dtype,
        device,
        threads,
        slots,
        context,
        backend,
        runner.mode if runner else "eager",
    )
    name = cfg.served_model_name or served_name(cfg.model_path, path)
    return LoadedModel(engine, path, name, backend)
