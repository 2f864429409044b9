"""From an ExecutorConfig to a running Engine: device, dtype, threads, weights, KV sizing; with
--tp, the follower ranks too."""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from services.common.log import setup_logging
from services.common.model_store import gguf_file, resolve_model_path, served_name
from services.executor.attention import default_backend
from services.executor.config import ExecutorConfig
from services.executor.decode_runner import StaticDecodeConfig
from services.executor.engine import Engine, EngineLimits
from services.executor.grammar import GrammarRuntime, hf_tokenizer_info
from services.executor.kv_pool import KVPool
from services.executor.malloc import release_free_memory, tune_malloc
from services.executor.mirror import Follower, LeaderEngine
from services.executor.model_config import ModelConfig
from services.executor.packed_linear import can_use_panels16
from services.executor.parallel import Rank, head_shard, kv_heads_per_rank, rank_config
from services.executor.quantization import Quantization
from services.executor.ranks import (
    COLLECTIVE_TIMEOUT_S,
    RankGroup,
    all_ranks_min,
    init_process_group,
)
from services.executor.weights import load_model

log = logging.getLogger("radixserve.executor")


@dataclass(frozen=True)
class LoadedModel:
    engine: Engine
    model_path: Path
    served_name: str
    backend: str
    tp_size: int = 1
    kv_bytes_per_token: int = 0  # over every layer and every rank
    ranks: RankGroup | None = None  # the follower ranks, under tensor parallelism

    def close(self) -> None:
        if self.ranks is not None:
            self.ranks.close()


def pick_device(name: str, rank: Rank | None = None, base_gpu_id: int = 0) -> torch.device:
    """The device by name; on CUDA, GPU `base_gpu_id`, and under tensor parallelism rank r takes
    GPU `base_gpu_id + r` (SGLang's --base-gpu-id). Raises ValueError when CUDA is asked for and
    absent, or when the GPUs asked for are more than the machine has."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    if name != "cuda":
        return torch.device(name)
    size, index = (1, 0) if rank is None else (rank.size, rank.index)
    if torch.cuda.device_count() < base_gpu_id + size:
        raise ValueError(
            f"--base-gpu-id {base_gpu_id} with --tp {size} needs GPUs up to "
            f"{base_gpu_id + size - 1}; {torch.cuda.device_count()} seen"
        )
    device = torch.device("cuda", base_gpu_id + index)
    torch.cuda.set_device(device)
    return device


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device, panels: bool = True) -> torch.dtype:
    """`--dtype NAME` as a torch dtype. auto: on CUDA bfloat16 where the GPU has it, else float16;
    on a CPU bfloat16 where it has AVX-512 BF16 or AMX, or, with `panels` (the linears are neither
    quantized nor left plain for torch.compile), where bfloat16 linears run our AVX2 panel kernels
    (`can_use_panels16`: AVX2 and FMA without AVX-512, kernels built and enabled); else float32.
    On such an AVX2 CPU bfloat16 served one stream at 38-42 % less time a token than float32, the
    README's other workloads at throughputs within the rounds' spread, and a median TTFT 5-15 %
    higher (docs/benchmarks.md); quantized layers ran slower in bfloat16, and torch's own
    bfloat16 GEMM runs scalar code there."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if cpu_has_bf16() or (panels and can_use_panels16(torch.bfloat16, device)):
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def panel_linears(cfg: ExecutorConfig) -> bool:
    """Whether the executor's unquantized linears may become panels (pick_dtype's `panels`):
    neither --quantization nor --enable-torch-compile, which keeps torch's layout."""
    return cfg.quantization == "none" and not cfg.enable_torch_compile


def pick_kv_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The KV pool's dtype for `--kv-cache-dtype name` under a model of `dtype`: auto keeps the
    model's; bfloat16 (bf16) and fp8_e5m2 need a float32 or bfloat16 model. Raises ValueError
    otherwise."""
    if name == "auto":
        return dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"--kv-cache-dtype {name} needs a float32 or bfloat16 model (--dtype is "
            f"{str(dtype).removeprefix('torch.')}); "
            "use --kv-cache-dtype auto"
        )
    return torch.float8_e5m2 if name == "fp8_e5m2" else torch.bfloat16


def kv_dtypes(names: list[str], dtype: torch.dtype) -> list[torch.dtype]:
    """A command-line tool's `--kv-cache-dtypes` (bench-executor, perplexity) as the KV pool
    dtypes of a model of `dtype` (`pick_kv_dtype`), each once in the order given. Raises
    SystemExit where the model's dtype cannot take one."""
    picked: list[torch.dtype] = []
    for name in names:
        try:
            kv = pick_kv_dtype(name, dtype)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        if kv not in picked:
            picked.append(kv)
    return picked


def setup_cpu_process(num_threads: int | None, ranks: int = 1) -> int:
    """Sets up a process that runs the model on the CPU: `num_threads` torch threads, by default
    this process's share of the cores it may use (the ranks of a tensor-parallel executor share
    them), and glibc's malloc settings (`tune_malloc`). Returns the threads."""
    n = num_threads or max(1, len(os.sched_getaffinity(0)) // ranks)
    torch.set_num_threads(n)
    tune_malloc()
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
    sharing: int = 1,
) -> int:
    """KV slots: --max-total-tokens, or as many as --mem-fraction-static of the free memory holds
    at `model_cfg`'s KV heads (a tensor-parallel rank's own). `sharing` ranks take their pools
    out of the same memory (a CPU's ranks share its RAM)."""
    if cfg.max_total_tokens:
        return cfg.max_total_tokens
    per_token = KVPool.bytes_per_token(
        model_cfg.num_layers, model_cfg.num_kv_heads, model_cfg.head_dim, dtype
    )
    budget = int(available_memory(device) * cfg.mem_fraction_static) // sharing
    return min(budget // per_token, cfg.max_running_requests * context)


def check_kv_pool(slots: int, context: int) -> None:
    if slots < context:
        raise ValueError(
            f"the KV pool would hold {slots} tokens, less than the context length {context}; "
            "raise --mem-fraction-static or lower --context-length"
        )


def static_decode_config(cfg: ExecutorConfig, device: torch.device) -> StaticDecodeConfig | None:
    """Static-shape decode where it pays: CUDA graphs on CUDA (unless disabled, or under tensor
    parallelism, whose collectives are not captured), and wherever --enable-torch-compile asks
    for it. Eager decode on the CPU otherwise: padding only costs there."""
    graphs = device.type == "cuda" and not cfg.disable_cuda_graph and cfg.tp == 1
    if not (graphs or cfg.enable_torch_compile):
        return None
    return StaticDecodeConfig(
        cfg.cuda_graph_max_bs, cuda_graph=graphs, torch_compile=cfg.enable_torch_compile
    )


def create_engine(cfg: ExecutorConfig) -> LoadedModel:
    """The engine of rank 0, the process serving gRPC; with --tp N, the follower ranks are
    started first and run along (ranks.py, mirror.py)."""
    path = resolve_model_path(cfg.model_path)
    model_cfg = ModelConfig.from_dir(path)
    if cfg.tp == 1:
        return _create_leader(
            cfg, path, model_cfg, pick_device(cfg.device, base_gpu_id=cfg.base_gpu_id), None
        )
    # an impossible split or too few GPUs fail here, before any process is started
    head_shard(model_cfg.num_heads, model_cfg.num_kv_heads, Rank(0, cfg.tp))
    device = pick_device(cfg.device, Rank(0, cfg.tp), cfg.base_gpu_id)
    ranks = RankGroup.start(cfg.tp, follower_main, (cfg, path))
    try:
        return _create_leader(cfg, path, model_cfg, device, ranks)
    except BaseException:
        ranks.close()
        raise


def _create_leader(
    cfg: ExecutorConfig,
    path: Path,
    model_cfg: ModelConfig,
    device: torch.device,
    ranks: RankGroup | None,
) -> LoadedModel:
    rank = Rank(0, cfg.tp) if ranks is not None else None
    dtype = pick_dtype(cfg.dtype, device, panel_linears(cfg))
    threads = setup_cpu_process(cfg.num_threads, cfg.tp) if device.type == "cpu" else 0
    context = cfg.context_length or model_cfg.max_position_embeddings
    if model_cfg.sliding_window is None and context > model_cfg.max_position_embeddings:
        log.warning(
            "context length %d exceeds the model's %d", context, model_cfg.max_position_embeddings
        )
    if ranks is not None:
        init_process_group(Rank(0, cfg.tp), ranks.port, device, COLLECTIVE_TIMEOUT_S)
    model, rank_cfg, limits = _load(cfg, path, model_cfg, context, dtype, device, rank)
    check_kv_pool(limits.num_slots, context)
    backend = cfg.attention_backend or default_backend(device.type)
    grammar = GrammarRuntime(
        lambda: hf_tokenizer_info(path, model_cfg.vocab_size, model_cfg.eos_token_ids),
        model_cfg.vocab_size,
        cfg.max_running_requests,
        device,
        threads=max(threads, 1),
    )
    parts = (model, rank_cfg, limits, device, backend, static_decode_config(cfg, device), grammar)
    if ranks is None:
        engine = Engine(*parts, deterministic=cfg.enable_deterministic_inference)
    else:
        engine = LeaderEngine(*parts, ranks=ranks)
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
        "engine ready: %s, %s%s on %s (%d threads), %d KV slots%s, context %d, backend %s, "
        "decode %s%s%s",
        model_cfg.architecture,
        dtype,
        f" ({cfg.quantization} weights)" if cfg.quantization != "none" else "",
        device,
        threads,
        limits.num_slots,
        f" ({limits.kv_dtype})" if limits.kv_dtype not in (None, dtype) else "",
        context,
        backend,
        runner.mode if runner else "eager",
        f", tensor parallel over {cfg.tp} ranks" if ranks is not None else "",
        ", deterministic inference" if cfg.enable_deterministic_inference else "",
    )
    kv_heads = sum(kv_heads_per_rank(model_cfg.num_heads, model_cfg.num_kv_heads, cfg.tp))
    kv_dtype = limits.kv_dtype or dtype
    kv_bytes = KVPool.bytes_per_token(model_cfg.num_layers, kv_heads, model_cfg.head_dim, kv_dtype)
    name = cfg.served_model_name or served_name(cfg.model_path, path)
    return LoadedModel(engine, path, name, backend, cfg.tp, kv_bytes, ranks)


def _load(
    cfg: ExecutorConfig,
    path: Path,
    model_cfg: ModelConfig,
    context: int,
    dtype: torch.dtype,
    device: torch.device,
    rank: Rank | None,
) -> tuple[nn.Module, ModelConfig, EngineLimits]:
    """A rank's model (its shard under tensor parallelism), the model config as the rank sees it,
    and the limits, with the KV slots every rank can hold (a collective under --tp)."""
    # torch.compile cannot trace oneDNN's opaque packed weights.
    prepack = not cfg.enable_torch_compile
    quant = quantization(cfg)
    kv_dtype = pick_kv_dtype(cfg.kv_cache_dtype, dtype)  # before the load: a bad pair fails fast
    model = load_model(path, model_cfg, context, dtype, device, prepack, rank, quant)
    if device.type == "cpu":
        release_free_memory()  # before the KV pool is sized from the memory available
    rank_cfg = model_cfg if rank is None else rank_config(model_cfg, rank)
    # The CPU's ranks take their pools out of the same RAM; GPUs each have their own.
    sharing = rank.size if rank is not None and device.type == "cpu" else 1
    slots = size_kv_pool(cfg, rank_cfg, kv_dtype, device, context, sharing)
    if rank is not None:
        slots = all_ranks_min(slots)
    limits = EngineLimits(slots, cfg.max_running_requests, context, cfg.max_top_logprobs, kv_dtype)
    return model, rank_cfg, limits


def quantization(cfg: ExecutorConfig) -> Quantization:
    """--quantization and its group size; for gguf, the GGUF file --model-path names."""
    gguf = gguf_file(cfg.model_path) if cfg.quantization == "gguf" else None
    return Quantization(cfg.quantization, cfg.quantization_group_size, gguf)


def follower_main(rank: Rank, port: int, conn: Connection, cfg: ExecutorConfig, path: Path) -> None:
    """A follower rank's process, spawned by rank 0: loads its shard, then runs the forwards rank
    0 sends until rank 0 closes the pipe. Signals are left to rank 0, which ends it that way."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(f"executor-rank{rank.index}", cfg)
    try:
        device = pick_device(cfg.device, rank, cfg.base_gpu_id)
        dtype = pick_dtype(cfg.dtype, device, panel_linears(cfg))
        if device.type == "cpu":
            setup_cpu_process(cfg.num_threads, cfg.tp)
        init_process_group(rank, port, device, COLLECTIVE_TIMEOUT_S)
        model_cfg = ModelConfig.from_dir(path)
        context = cfg.context_length or model_cfg.max_position_embeddings
        model, rank_cfg, limits = _load(cfg, path, model_cfg, context, dtype, device, rank)
        backend = cfg.attention_backend or default_backend(device.type)
        engine = Engine(model, rank_cfg, limits, device, backend, static_decode_config(cfg, device))
        log.info("rank %d of %d ready on %s", rank.index, rank.size, device)
        Follower(engine, conn).run()
    except Exception:
        log.exception("tensor-parallel rank %d failed", rank.index)
        sys.exit(1)
    dist.destroy_process_group()  # rank 0 closed the pipe: the executor is stopping
