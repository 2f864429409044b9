"""The executor's malloc settings: a decode step's buffers are reused, not faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from services.executor import malloc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# A decode step's large buffers at 32 rows of a 49,152-token vocabulary: the LM head's logits,
# the sampler's copy of them and their log-softmax (6.3 MB each, float32). Prints whether the
# thresholds were set and the page faults of each of 12 such steps.
STEPS = """
import json, resource, sys, torch
from services.executor.malloc import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tune" else None
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x, w = torch.randn(32, 576), torch.randn(49152, 576)
counts = []
for _ in range(12):
    before = faults()
    logits = x @ w.T
    copy = logits.clone()
    logprobs = torch.log_softmax(copy.add_(1.0), -1)
    del logits, copy, logprobs
    counts.append(faults() - before)
print(json.dumps({"tuned": tuned, "faults": counts}))
"""


def _steps(mode: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_steps_reuse_their_buffers():
    result = _steps("tune")
    assert result["tuned"] is True
    # The heap grows over the first steps; after that each step's 3 x 1,536 pages are reused.
    assert sum(result["faults"][4:]) < 100, result["faults"]


@pytest.mark.parametrize(
    "name, value",
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072"),
    ],
)
def test_the_environment_s_malloc_settings_win(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert malloc.tune_malloc() is False


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(malloc.sys, "platform", "darwin")
    assert malloc.tune_malloc() is False
