from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.bench import NO_CUDA

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmarks really run")
def test_refuses_to_time_the_interpreter():
    result = subprocess.run(
        [sys.executable, "-m", "kernels.bench"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert NO_CUDA in result.stderr
    assert result.stdout == ""
