"""Every Triton kernel of kernels/ compiled for an NVIDIA GPU, on a machine without one.

    python -m kernels.compile_check                    # compute capability 9.0 (H100, H200)
    python -m kernels.compile_check --arch 80          # 8.0 (A100)
    python -m kernels.compile_check --dtypes bfloat16  # only the bfloat16 configurations

Triton's interpreter, which runs the kernels on the CPU in CI, executes them as NumPy and accepts
code that the GPU compiler refuses (a `tl.dot` of fewer than 16 rows, a value whose type differs
between the branches of an `if`). This runs each launcher of kernels/ on CPU tensors in the
configurations the executor launches (SmolLM2-135M's and a Llama-3-8B's attention shapes, each
dtype pair the KV cache options allow), records every kernel launch instead of launching it, and
compiles each distinct one through Triton's compiler and its bundled ptxas to GPU machine code
(a cubin) for the given compute capability: what the first launch on such a GPU compiles. Each
launch is specialized by Triton's own binder, as a real launch is (16-byte aligned pointers and
integers divisible by 16 marked so, integers equal to 1 made constants), so the software
pipeliner's asynchronous copies and the vector loads are compiled too. A kernel whose shared
memory exceeds the GPU's (a failure Triton itself reports only when it loads the kernel on one)
counts as failed.

Needs no GPU, only Triton's NVIDIA backend. TRITON_INTERPRET must be unset: with it, Triton builds
interpreted kernels when kernels/ is imported, which its compiler cannot take (`main` refuses).
Exit status 1 when any kernel fails to compile, or when a kernel (a `@triton.jit` function of
kernels/ whose name ends in `_kernel`; others are helpers inlined into them) is never launched.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import kernels

# Shared memory per block a kernel may use (bytes), by compute capability (CUDA's tables).
SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def kernel_modules() -> list[str]:
    """The Triton modules of kernels/ (not cpu/, nor this one, kernels.bench, kv_cache_dtype)."""
    skip = {"bench", "compile_check", "kv_cache_dtype"}
    found = pkgutil.iter_modules(kernels.__path__)
    return sorted(m.name for m in found if not m.ispkg and m.name not in skip)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# KV cache dtypes per model dtype, as --kv-cache-dtype allows them: the model's; bfloat16 and
# fp8_e5m2 under a float32 or bfloat16 model.
KV_DTYPES = {
    "float32": [torch.float32, torch.bfloat16, torch.float8_e5m2],
    "bfloat16": [torch.bfloat16, torch.float8_e5m2],
    "float16": [torch.float16],
}
# (num_heads, num_kv_heads, head_dim, hidden, intermediate): SmolLM2-135M and Llama-3-8B.
SHAPES = [(9, 3, 64, 576, 1536), (32, 8, 128, 4096, 14336)]


@dataclass
class Launch:
    """One recorded `kernel[grid](*args, **kwargs)` call."""

    kernel: JITFunction
    args: tuple[object, ...]
    kwargs: dict[str, object]
    where: str  # the configuration that launched it

    def pack(self, arch: int) -> tuple[ASTSource, dict[str, object]]:
        """The kernel specialized as Triton's launcher specializes it for this launch's
        arguments (types, alignment and divisibility by 16, integers equal to 1), with its
        compile options (num_warps, num_stages, ...), for compute capability `arch`."""
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binder = create_function_from_signature(self.kernel.signature, self.kernel.params, backend)
        bound, specialization, options = binder(*self.args, **self.kwargs)
        options, signature, constexprs, attrs = self.kernel._pack_args(
            backend, self.kwargs, bound, specialization, options
        )
        return ASTSource(self.kernel, signature, constexprs, attrs), options.__dict__

    def key(self, arch: int) -> str:
        src, options = self.pack(arch)
        return repr((self.kernel.__name__, src.hash(), sorted(options.items())))


@dataclass
class _Recorder:
    """Stands in for a JITFunction in its module: `kernel[grid](...)` records the launch."""

    kernel: JITFunction
    launches: list[Launch]
    where: Callable[[], str]

    def __getitem__(self, grid: object) -> Callable[..., None]:
        def record(*args: object, **kwargs: object) -> None:
            self.launches.append(Launch(self.kernel, args, kwargs, self.where()))

        return record


@dataclass
class Recording:
    launches: list[Launch] = field(default_factory=list)
    where: str = ""


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    """Within it, every kernel of kernels/ records its launches into the yielded Recording (its
    `where` labels them) instead of running."""
    rec = Recording()
    patched: list[tuple[object, str, JITFunction]] = []
    for name in kernel_modules():
        module = importlib.import_module(f"kernels.{name}")
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                patched.append((module, attr, value))
                setattr(module, attr, _Recorder(value, rec.launches, lambda: rec.where))
    try:
        yield rec
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _attention(rec: Recording, dtype: torch.dtype, kv_dtype: torch.dtype, shape: tuple) -> None:
    from kernels.decode_attention import decode_attention, decode_attention_lse
    from kernels.extend_attention import extend_attention, extend_attention_lse
    from kernels.kv_store import store_kv
    from kernels.merge_attention_states import merge_attention_states_
    from kernels.shared_prefix_attention import shared_prefix_attention

    heads, kv_heads, head_dim = shape[:3]
    rec.where = (
        f"attention q {_name(dtype)} kv {_name(kv_dtype)} heads {heads}/{kv_heads} dim {head_dim}"
    )
    i64 = torch.int64

    def index(*values: int) -> torch.Tensor:
        return torch.tensor(values, dtype=i64)

    q = torch.zeros(4, heads, head_dim, dtype=dtype)
    k_pool, v_pool = (torch.zeros(64, kv_heads, head_dim, dtype=kv_dtype) for _ in range(2))
    table = torch.zeros(4, 32, dtype=i64)
    rows, starts, lens = index(0, 1, 2, 3), index(1, 1, 1, 1), index(9, 9, 9, 9)
    k_new = torch.zeros(4, kv_heads, head_dim, dtype=dtype)
    store_kv(k_new, k_new, k_pool, v_pool, rows)
    decode_attention(q, k_pool, v_pool, table, rows, lens, 0.125)
    out, lse = decode_attention_lse(q, k_pool, v_pool, table, rows, starts, lens, 0.125)
    qo_start = index(0, 1, 2, 3)
    extend_attention(q, k_pool, v_pool, table, rows, starts, starts, qo_start, 0.125)
    extend_attention_lse(q, k_pool, v_pool, table, rows, starts, starts, starts, qo_start, 0.125)
    part_out, part_lse = shared_prefix_attention(
        q, k_pool, v_pool, table, rows[:2], index(0, 2, 4), starts[:2], 0.125
    )
    merge_attention_states_(out, lse, part_out, part_lse, rows)


def _layers(rec: Recording, dtype: torch.dtype, shape: tuple) -> None:
    from kernels.cpu.linear import pack_int4
    from kernels.quant_matmul import int4_linear, int8_linear
    from kernels.rmsnorm import rmsnorm
    from kernels.rope import apply_rope, rope_cos_sin
    from kernels.silu_and_mul import silu_and_mul

    heads, kv_heads, head_dim, hidden, intermediate = shape
    rec.where = f"layers {_name(dtype)} hidden {hidden}"
    x = torch.zeros(4, hidden, dtype=dtype)
    weight = torch.ones(hidden, dtype=dtype)
    rmsnorm(x, weight, 1e-6)
    rmsnorm(x, weight, 1e-6, torch.zeros_like(x))
    silu_and_mul(torch.zeros(4, 2 * intermediate, dtype=dtype))
    cos, sin = rope_cos_sin(torch.ones(head_dim // 2), 16)
    q, k = (
        torch.zeros(4, heads, head_dim, dtype=dtype),
        torch.zeros(4, kv_heads, head_dim, dtype=dtype),
    )
    apply_rope(q, k, torch.zeros(4, dtype=torch.int64), cos, sin)
    q8 = torch.zeros(intermediate, hidden, dtype=torch.int8)
    packed = pack_int4(torch.zeros(intermediate, hidden, dtype=torch.uint8))
    scale = torch.ones(intermediate, dtype=dtype)
    for rows in (1, 32, 64):  # each row tile: a decode step's rows up to a prefill's
        x = torch.zeros(rows, hidden, dtype=dtype)
        for bias in (None, scale):  # Qwen2's q/k/v projections have biases
            int8_linear(x, q8, scale, bias)
        for group, bias in ((32, None), (64, scale)):  # 32: --quantization-group-size's default
            groups = torch.ones(intermediate, hidden // group, dtype=dtype)
            int4_linear(x, packed, groups, groups, group, bias)


def record_launches(dtype_names: list[str], arch: int) -> tuple[list[Launch], list[str]]:
    """The distinct kernel launches of every configuration of `dtype_names` (model dtypes), as
    specialized for compute capability `arch`, and the kernels (names ending in `_kernel`) that
    none of them launched."""
    with recording() as rec:
        for name in dtype_names:
            dtype = DTYPES[name]
            for shape in SHAPES:
                for kv_dtype in KV_DTYPES[name]:
                    _attention(rec, dtype, kv_dtype, shape)
                _layers(rec, dtype, shape)
        kernels_seen = {
            f"{module}.{attr}"
            for module in kernel_modules()
            for attr, value in vars(importlib.import_module(f"kernels.{module}")).items()
            if isinstance(value, _Recorder) and attr.endswith("_kernel")
        }
    distinct: dict[str, Launch] = {}
    for launch in rec.launches:
        distinct.setdefault(launch.key(arch), launch)
    launched = {f"{launch.kernel.__module__.removeprefix('kernels.')}.{launch.kernel.__name__}"
                for launch in rec.launches}  # fmt: skip
    return list(distinct.values()), sorted(kernels_seen - launched)


def compile_launch(launch: Launch, arch: int) -> tuple[int, int]:
    """Compiles one launch for compute capability `arch` (e.g. 90); returns the cubin's size and
    the shared memory a block of it takes, in bytes. Raises whatever Triton's compiler or ptxas
    raises, and ValueError when that shared memory exceeds the GPU's (SHARED_MEMORY)."""
    src, options = launch.pack(arch)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    shared = int(compiled.metadata.shared)
    limit = SHARED_MEMORY.get(arch)
    if limit is not None and shared > limit:
        raise ValueError(f"{shared} bytes of shared memory, over sm_{arch}'s {limit}")
    return len(compiled.asm["cubin"]), shared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.compile_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100)")
    parser.add_argument(
        "--dtypes", nargs="+", choices=sorted(DTYPES), default=sorted(DTYPES), help="model dtypes"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    launches, never_launched = record_launches(args.dtypes, args.arch)
    print(f"{len(launches)} distinct kernel launches to compile for sm_{args.arch}", flush=True)
    failed = 0
    for i, launch in enumerate(launches, 1):
        started = time.perf_counter()
        try:
            size, shared = compile_launch(launch, args.arch)
        except Exception as exc:  # report every kernel, then fail
            failed += 1
            print(f"[{i}/{len(launches)}] FAILED {launch.kernel.__name__} ({launch.where}): {exc}")
            continue
        seconds = time.perf_counter() - started
        print(
            f"[{i}/{len(launches)}] {launch.kernel.__name__} ({launch.where}): "
            f"{size / 1024:.0f} KiB cubin, {shared / 1024:.0f} KiB shared memory, {seconds:.1f} s",
            flush=True,
        )
    print(f"compiled {len(launches) - failed} of {len(launches)} for sm_{args.arch}")
    if never_launched:
        print(f"FAILED: no configuration launches {', '.join(never_launched)}")
    return 1 if failed or never_launched else 0


if __name__ == "__main__":
    sys.exit(main())
