"""Executor configuration: flags, their RADIXSERVE_* twins, and validation.

Every service's command line is built from these flags (`radixserve serve` passes each child its
share), so this module imports no torch: the gateway, tokenizer and scheduler processes never
load it. The choices that the executor's own modules implement are named here and checked
against them there (the attention backend registry, quantization.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import option
from services.common.metrics import ServiceConfig

# `--attention-backend` choices; services/executor/attention registers one class under each.
ATTENTION_BACKEND_NAMES = ("torch", "triton")
QUANTIZATION_METHODS = ("none", "int8", "int4", "gguf")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
DTYPES = ("auto", "float32", "bfloat16", "float16")
# `--kv-cache-dtype` choices, SGLang's spelling (bf16 and bfloat16 are the same)
KV_CACHE_DTYPES = ("auto", "bfloat16", "bf16", "fp8_e5m2")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ExecutorConfig(ServiceConfig):
    model_path: str = option(
        "default", "HF directory, .gguf file or Hub id ('default': SmolLM2-135M-Instruct)"
    )
    served_model_name: str | None = option(
        None, "model name reported to clients (default: from the path)"
    )
    dtype: str = option(
        "auto",
        "weight and KV dtype; auto = bfloat16 where the GPU or CPU has it or our AVX2 kernels "
        "run it, else float32 (float16 on GPUs without bfloat16)",
        DTYPES,
    )
    kv_cache_dtype: str = option(
        "auto",
        "KV cache dtype; auto = --dtype; bfloat16 (or bf16) under a float32 model halves the KV "
        "bytes per token (twice the tokens in the same memory, half the reads of a decode step's "
        "attention), its keys and values rounded to bfloat16 as they are stored; fp8_e5m2 "
        "(float32 or bfloat16 models) stores them as 8-bit floats (E5M2: 2 mantissa bits, "
        "saturating at 57344), a quarter of float32's bytes and half of bfloat16's",
        KV_CACHE_DTYPES,
    )
    device: str = option("auto", "cpu or cuda; auto = cuda when available", DEVICES)
    quantization: str = option(
        "none",
        "weight-only quantization of the linear layers (CPU, or CUDA through Triton): int8 (per "
        "output channel) or int4 "
        "(groups of --quantization-group-size inputs; the LM head int8) quantize the float "
        "checkpoint at load; "
        "gguf loads the GGUF file's own quantized blocks (Q4_0/Q4_1 as int4, other types as "
        "int8; needs --model-path default or a .gguf file); activations stay in --dtype",
        QUANTIZATION_METHODS,
    )
    quantization_group_size: int = option(
        32, "input features per int4 scale and zero (32, 64, 128 or 256)"
    )
    max_total_tokens: int | None = option(
        None, "KV slots in the pool (overrides --mem-fraction-static)"
    )
    mem_fraction_static: float = option(
        0.3,
        "fraction of free memory after loading weights given to the KV pool (CPU: of available RAM)",
    )
    max_running_requests: int = option(
        256, "rows of the request table: most requests active at once"
    )
    context_length: int | None = option(None, "longest prompt + output (default: the model's)")
    attention_backend: str | None = option(
        None,
        "attention implementation (default: triton on CUDA, torch on CPU)",
        ATTENTION_BACKEND_NAMES,
    )
    cuda_graph_max_bs: int = option(
        32, "largest decode batch run on static shapes (CUDA graphs, --enable-torch-compile)"
    )
    disable_cuda_graph: bool = option(
        False, "on CUDA, run decode eagerly instead of replaying graphs"
    )
    enable_torch_compile: bool = option(
        False,
        "torch.compile the static-shape decode step (CPU too; each batch bucket compiles once)",
    )
    enable_deterministic_inference: bool = option(
        False,
        "the same request (prompt, sampling parameters, seed) gives the same tokens whatever else "
        "is in its batch, however its prefill is chunked and whether its prefix was cached: "
        "batch-invariant matmuls, one attention kernel for every token, sampling row by row "
        "(CPU attention kernels only; not with --tp or --enable-torch-compile)",
    )
    max_top_logprobs: int = option(20, "most top_logprobs alternatives a request may ask for")
    num_threads: int | None = option(
        None,
        "torch intra-op threads per rank (default: the cores this process may use, shared "
        "evenly by the --tp ranks)",
    )
    tp: int = option(
        1,
        "tensor-parallel ranks: the model's heads, MLP and vocabulary are split over this many "
        "processes (GPUs on CUDA), which this one starts and serves for",
    )
    base_gpu_id: int = option(
        0,
        "on CUDA, the first GPU this executor uses (rank r of --tp takes GPU base + r); "
        "`radixserve serve --dp-size D --tp N` gives engine i the GPUs from i*N",
    )
    watchdog_timeout_s: float = option(
        600.0,
        "exit the process when one step has executed this many seconds (a wedged forward), "
        "so it is restarted; idle time, loading and warm-up never count; 0 disables it",
    )
    fault_injection_request_id: str | None = option(
        None,
        "for tests only: a request whose id contains this string fails (see "
        "--fault-injection-stage), to show that one failing row leaves the others of its step "
        "running",
    )
    fault_injection_stage: str = option(
        "sample",
        "for tests only: where --fault-injection-request-id fails: `sample` (choosing its token "
        "raises) or `forward` (every forward pass that includes its slice raises)",
    )
    host: str = option("127.0.0.1", "address the gRPC server binds")
    port: int = option(30002, "gRPC port")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mem_fraction_static <= 1.0:
            raise ValueError("--mem-fraction-static must be in (0, 1]")
        if self.max_total_tokens is not None and self.max_total_tokens < 16:
            raise ValueError("--max-total-tokens must be at least 16")
        if self.max_running_requests < 1:
            raise ValueError("--max-running-requests must be at least 1")
        if self.cuda_graph_max_bs < 1:
            raise ValueError("--cuda-graph-max-bs must be at least 1")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError("--context-length must be at least 2")
        if self.fault_injection_stage not in ("sample", "forward"):
            raise ValueError("--fault-injection-stage must be `sample` or `forward`")
        if self.tp < 1:
            raise ValueError("--tp must be at least 1")
        if self.base_gpu_id < 0:
            raise ValueError("--base-gpu-id must be at least 0")
        if self.enable_deterministic_inference and self.tp > 1:
            raise ValueError("--enable-deterministic-inference does not support --tp above 1")
        if self.enable_deterministic_inference and self.enable_torch_compile:
            raise ValueError(
                "--enable-deterministic-inference runs decode eagerly: drop --enable-torch-compile"
            )
        if self.quantization_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"--quantization-group-size must be one of {INT4_GROUP_SIZES}")
        if self.quantization != "none" and self.tp > 1:
            raise ValueError("--quantization does not support --tp above 1")
        if self.watchdog_timeout_s < 0:
            raise ValueError("--watchdog-timeout-s must be >= 0 (0 disables it)")
