"""`python -m kernels.cpu.bench`: the CPU attention kernels and float32 and bfloat16 panel linears
timed alone, and against a revision."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.cpu as cpu_kernels
from kernels.cpu import bench
from kernels.cpu import linear as cpu_linear
from kernels.cpu.cascade import reads_spans_once

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None, reason=f"kernel not built: {cpu_kernels.load_error()}"
)
REPO = Path(__file__).resolve().parents[2]
SMALL = ["--batch", "3", "--context", "45", "--layers", "2", "--rounds", "3"]


def head_has_these_kernel_sources() -> bool:
    shown = subprocess.run(
        ["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "kernels/cpu"],
        capture_output=True,
    )
    return shown.returncode == 0


@pytest.mark.parametrize("kernel", ["decode", "extend"])
def test_times_every_round_and_reports_the_bytes_read(kernel: str) -> None:
    lines: list[str] = []
    args = bench.parse_args([*SMALL, "--kernel", kernel, "--kv-dtype", "bfloat16", "--scatter"])
    times = bench.run(args, out=lines.append)
    assert list(times) == ["this tree"] and len(times["this tree"]) == 3
    assert all(t > 0 for t in times["this tree"])
    assert lines[0].startswith(f"{kernel}: 3 requests x ")
    assert "bfloat16 pools, 2 layers, scattered slots" in lines[0]
    assert f"GB/s of {'distinct ' if kernel == 'extend' else ''}K and V" in lines[1]
    # 3 requests x (45 positions + 64 new in extend) x 3 kv heads x 64 dims x 2 bytes, K and V,
    # over 2 layers
    positions = 45 + (64 if kernel == "extend" else 0)
    assert bench.make_case(args)[1] == 2 * 2 * 3 * positions * 3 * 64 * 2


def test_decode_groups_are_timed_against_the_plain_kernel_with_the_same_outputs() -> None:
    lines: list[str] = []
    argv = ["--batch", "4", "--context", "45", "--layers", "2", "--rounds", "3"]
    args = bench.parse_args([*argv, "--shared-prefix-groups", "2", "--shared-prefix-len", "30"])
    times = bench.run(args, out=lines.append)
    assert list(times) == ["grouped", "plain"] and all(len(t) == 3 for t in times.values())
    # Where the grouped form attends row by row (AVX-512 CPUs), a note comes first.
    note = "(on this CPU, or at this head dim, the grouped form attends row by row)"
    assert (lines[0] == note) == (not reads_spans_once(64))
    first = 1 if lines[0] == note else 0
    assert "2 groups sharing 30 positions" in lines[first]
    assert "GB/s of K and V as the rows see them" in lines[first + 1]
    assert lines[-1].startswith("  grouped takes ") and lines[-1].endswith("max |diff| 0")


@pytest.mark.slow  # builds attention.cpp a second time
@pytest.mark.skipif(not head_has_these_kernel_sources(), reason="kernels/cpu differs from HEAD")
def test_the_same_source_at_head_gives_the_same_outputs() -> None:
    lines: list[str] = []
    times = bench.run(bench.parse_args([*SMALL, "--against", "HEAD"]), out=lines.append)
    assert list(times) == ["this tree", "HEAD"]
    assert all(len(t) == 3 for t in times.values())
    assert lines[-1].endswith("max |diff| 0"), lines[-1]


LINEAR = [
    *["--kernel", "linear", "--batch", "3", "--layers", "2", "--rounds", "3"],
    *["--hidden", "64", "--intermediate", "96", "--heads", "2", "--kv-heads", "1"],
    *["--head-dim", "32"],
]
needs_f32 = pytest.mark.skipif(
    cpu_linear.f32_module() is None, reason=f"not built: {cpu_linear.f32_load_error()}"
)


@needs_f32
def test_linear_times_every_round_and_reports_the_weight_bytes() -> None:
    lines: list[str] = []
    args = bench.parse_args(LINEAR)
    times = bench.run(args, out=lines.append)
    assert list(times) == ["this tree"] and len(times["this tree"]) == 3
    assert lines[0].startswith("linear: 3 rows x 7 float32 panel linears (hidden 64, ")
    assert "GB/s of weights" in lines[1]
    # q and o 64 x 64, k and v 32 x 64, gate and up 96 x 64, down 64 x 96; float32, 2 layers
    assert bench.make_linear_case(args)[1] == 4 * 2 * (2 * 4096 + 2 * 2048 + 3 * 6144)
    call, _ = bench.make_linear_case(args)
    outs = call(cpu_linear.f32_module(), 1)
    shapes = [(3, 64), (3, 32), (3, 32), (3, 64), (3, 96), (3, 96), (3, 64)]
    assert [tuple(o.shape) for o in outs] == shapes


@needs_f32
def test_linear_in_bfloat16_reads_half_the_bytes_through_the_bfloat16_kernel() -> None:
    lines: list[str] = []
    args = bench.parse_args([*LINEAR, "--linear-dtype", "bfloat16"])
    times = bench.run(args, out=lines.append)
    assert len(times["this tree"]) == 3
    assert lines[0].startswith("linear: 3 rows x 7 bfloat16 panel linears (hidden 64, ")
    assert bench.make_linear_case(args)[1] == 2 * 2 * (2 * 4096 + 2 * 2048 + 3 * 6144)
    call, _ = bench.make_linear_case(args)
    outs = call(cpu_linear.f32_module(), 0)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    assert [o.shape[1] for o in outs] == [64, 32, 32, 64, 96, 96, 64]


@pytest.mark.slow  # builds linear_f32.cpp a second time (once for both dtypes)
@needs_f32
@pytest.mark.skipif(not head_has_these_kernel_sources(), reason="kernels/cpu differs from HEAD")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_at_head_gives_the_same_outputs(dtype: str) -> None:
    lines: list[str] = []
    argv = [*LINEAR, "--linear-dtype", dtype, "--against", "HEAD"]
    times = bench.run(bench.parse_args(argv), out=lines.append)
    assert list(times) == ["this tree", "HEAD"]
    assert "median of the rounds' ratios" in lines[-1]
    assert lines[-1].endswith("max |diff| 0"), lines[-1]


def test_an_unknown_revision_is_an_error_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kernels.cpu.bench", *SMALL, "--against", "no-such-revision"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "error: git show no-such-revision:kernels/cpu/attention.cpp" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch", "0"],
        ["--heads", "8"],  # not a multiple of the 3 kv heads
        ["--kernel", "extend", "--head-dim", "32"],
        ["--q-dtype", "bfloat16"],  # over the default float32 pools
        ["--against", "this tree"],
        ["--shared-prefix-groups", "3"],  # 16 rows are not 3 groups
        ["--shared-prefix-groups", "4", "--shared-prefix-len", "1001"],  # past the context
        ["--shared-prefix-groups", "4", "--kernel", "extend"],
        ["--shared-prefix-groups", "4", "--against", "HEAD"],
        ["--shared-prefix-groups", "-2"],
        ["--shared-prefix-len", "100"],  # without groups
        ["--kernel", "linear", "--scatter"],
        ["--kernel", "linear", "--kv-dtype", "bfloat16"],
        ["--kernel", "linear", "--intermediate", "0"],
        ["--linear-dtype", "bfloat16"],  # decode attention has no linears
    ],
)
def test_arguments_the_kernels_cannot_take_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    if any(a.startswith("--shared-prefix") for a in argv):
        assert "--shared-prefix" in err.split("error:")[1]
