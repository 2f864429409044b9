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
(a cubin) for the given compute capability: what the first launch on such a GPU compiles. Pointer
alignment and integer divisibility hints, which a real launch adds, are left out; they change
how the code is scheduled, not whether it compiles.

Needs no GPU, only Triton's NVIDIA backend. TRITON_INTERPRET must be unset: with it, Triton builds
interpreted kernels when kernels/ is imported, which its compiler cannot take (`main` refuses).
Exit status 1 when any kernel fails to compile.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

KERNEL_MODULES = [
    "decode_attention",
    "extend_attention",
    "kv_store",
    "merge_attention_states",
    "quant_matmul",
    "rmsnorm",
    "rope",
    "shared_prefix_attention",
    "silu_and_mul",
]
# Triton's names of the element types a launcher passes pointers to.
POINTER_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float8_e5m2: "fp8e5",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (query dtype, KV cache dtype) per model dtype: the cache in the model's dtype, a float32 model
# over a bfloat16 cache, and fp8_e5m2 under 16-bit models (--kv-cache-dtype).
KV_DTYPES = {
    "float32": [torch.float32, torch.bfloat16],
    "bfloat16": [torch.bfloat16, torch.float8_e5m2],
    "float16": [torch.float16, torch.float8_e5m2],
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

    def parts(self) -> tuple[dict[str, str], dict[str, object], dict[str, object]]:
        """The kernel's argument types ("*bf16", "i32", "constexpr", ...), its constexpr values
        and the compile options (num_warps, num_stages) given at the launch. Raises TypeError on
        an argument whose Triton type is unknown here."""
        names = self.kernel.arg_names
        bound = dict(zip(names, self.args, strict=False))
        bound.update({k: v for k, v in self.kwargs.items() if k in names})
        options = {k: v for k, v in self.kwargs.items() if k not in names}
        signature: dict[str, str] = {}
        constexprs: dict[str, object] = {}
        for param, name in zip(self.kernel.params, names, strict=True):
            value = bound[name]
            if param.is_constexpr:
                signature[name] = "constexpr"
                constexprs[name] = value
            else:
                signature[name] = _triton_type(name, value)
        return signature, constexprs, options

    def key(self) -> str:
        signature, constexprs, options = self.parts()
        values = sorted((k, str(v)) for k, v in constexprs.items())
        return repr((self.kernel.__name__, sorted(signature.items()), values, sorted(options)))


def _triton_type(name: str, value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: no Triton type for {type(value).__name__}")


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
    for name in KERNEL_MODULES:
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
    for rows in (1, 64):  # a decode step and a prefill's tile sizes
        x = torch.zeros(rows, hidden, dtype=dtype)
        scale = torch.ones(intermediate, dtype=dtype)
        int8_linear(x, torch.zeros(intermediate, hidden, dtype=torch.int8), scale, None)
        groups = torch.ones(intermediate, hidden // 64, dtype=dtype)
        packed = pack_int4(torch.zeros(intermediate, hidden, dtype=torch.uint8))
        int4_linear(x, packed, groups, groups, 64, scale)


def record_launches(dtype_names: list[str]) -> list[Launch]:
    """The distinct kernel launches of every configuration of `dtype_names` (model dtypes)."""
    with recording() as rec:
        for name in dtype_names:
            dtype = DTYPES[name]
            for shape in SHAPES:
                for kv_dtype in KV_DTYPES[name]:
                    _attention(rec, dtype, kv_dtype, shape)
                _layers(rec, dtype, shape)
    distinct: dict[str, Launch] = {}
    for launch in rec.launches:
        distinct.setdefault(launch.key(), launch)
    return list(distinct.values())


def compile_launch(launch: Launch, arch: int) -> int:
    """Compiles one launch for compute capability `arch` (e.g. 90); returns the cubin's size in
    bytes. Raises whatever Triton's compiler or ptxas raises."""
    signature, constexprs, options = launch.parts()
    src = ASTSource(launch.kernel, signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return len(compiled.asm["cubin"])


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
    launches = record_launches(args.dtypes)
    print(f"{len(launches)} distinct kernel launches to compile for sm_{args.arch}", flush=True)
    failed = 0
    for i, launch in enumerate(launches, 1):
        started = time.perf_counter()
        try:
            size = compile_launch(launch, args.arch)
        except Exception as exc:  # report every kernel, then fail
            failed += 1
            print(f"[{i}/{len(launches)}] FAILED {launch.kernel.__name__} ({launch.where}): {exc}")
            continue
        seconds = time.perf_counter() - started
        print(
            f"[{i}/{len(launches)}] {launch.kernel.__name__} ({launch.where}): "
            f"{size / 1024:.0f} KiB cubin in {seconds:.1f} s",
            flush=True,
        )
    print(f"compiled {len(launches) - failed} of {len(launches)} for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
