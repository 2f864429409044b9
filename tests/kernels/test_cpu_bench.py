"""`python -m kernels.cpu.bench`: the CPU attention kernels timed alone, and against a revision."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import kernels.cpu as cpu_kernels
from kernels.cpu import bench

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None, reason=f"kernel not built: {cpu_kernels.load_error()}"
)
REPO = Path(__file__).resolve().parents[2]
SMALL = ["--batch", "3", "--context", "45", "--layers", "2", "--rounds", "3"]


def head_has_this_attention_source() -> bool:
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
    assert "GB/s of K and V" in lines[1]


@pytest.mark.slow  # builds attention.cpp a second time
@pytest.mark.skipif(not head_has_this_attention_source(), reason="kernels/cpu differs from HEAD")
def test_the_same_source_at_head_gives_the_same_outputs() -> None:
    lines: list[str] = []
    times = bench.run(bench.parse_args([*SMALL, "--against", "HEAD"]), out=lines.append)
    assert list(times) == ["this tree", "HEAD"]
    assert all(len(t) == 3 for t in times.values())
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


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="--heads 8 is not a multiple of --kv-heads 3"):
        bench.run(bench.parse_args([*SMALL, "--heads", "8"]), out=lambda line: None)
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch", "0"])
