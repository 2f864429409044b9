"""Every Triton kernel compiles for an H100 (sm_90) through Triton's compiler and ptxas, with no
GPU (`python -m kernels.compile_check`): what Triton's interpreter, which runs the kernels in the
other tests here, cannot check. Each run is a subprocess without TRITON_INTERPRET, which this
package's conftest sets for its own process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="Triton without its bundled ptxas")


def _run(args: list[str], cache: Path, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_every_kernel_compiles_for_sm90(tmp_path: Path) -> None:
    # A cache of its own, so every kernel is compiled here rather than found compiled.
    run = _run(["-m", "kernels.compile_check", "--dtypes", "bfloat16"], tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    done = re.search(r"compiled (\d+) of (\d+) for sm_90", run.stdout)
    assert done is not None and done[1] == done[2], run.stdout[-2000:]
    # Attention (decode, its own-keys and split stages, extend, span, merge, KV store) and the
    # layers' kernels, over two model shapes and each KV cache dtype of a bfloat16 model.
    assert int(done[1]) >= 50
    names = set(re.findall(r"\] (_\w+_kernel) \(", run.stdout))
    assert len(names) == 10, names


def test_a_kernel_the_gpu_refuses_fails_the_check(tmp_path: Path) -> None:
    """A tl.dot of 8 × 8 blocks runs under the interpreter, but the GPU compiler needs 16."""
    script = textwrap.dedent(
        """
        import torch, triton, triton.language as tl
        from kernels.compile_check import Launch, compile_launch

        @triton.jit
        def small_dot(a_ptr, out_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
            tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a))

        a = torch.zeros(8, 8, dtype=torch.bfloat16)
        compile_launch(Launch(small_dot, (a, a), {"BLOCK": 16}, "test"), 90)
        print("16 compiled")
        compile_launch(Launch(small_dot, (a, a), {"BLOCK": 8}, "test"), 90)
        print("8 compiled")
        """
    )
    path = tmp_path / "small_dot.py"  # Triton reads a kernel's source from its file
    path.write_text(script)
    run = _run([str(path)], tmp_path)
    assert "16 compiled" in run.stdout and "8 compiled" not in run.stdout
    assert run.returncode != 0 and "CompilationError" in run.stderr


def test_the_check_refuses_interpreted_kernels(tmp_path: Path) -> None:
    run = _run(["-m", "kernels.compile_check"], tmp_path, interpret=True)
    assert run.returncode == 2 and "TRITON_INTERPRET" in run.stderr
