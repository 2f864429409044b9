"""The executor's malloc settings: a decode step's buffers are reused, not faulted in again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from services.executor import malloc

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt",
)

# A decode step's large buffers at 32 rows of a 49,152-token vocabulary: the LM head's logits,
# the sampler's copy of them and their log-softmax (6.3 MB each, float32), on a thread of their own
# as the executor's forward runs, or on the main thread. Prints whether the settings were accepted
# and the page faults of each of 16 such steps.
STEPS = """
import json, resource, sys, threading, torch
from services.executor.malloc import tune_malloc
tuned = tune_malloc()
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def steps(counts):
    x, w = torch.randn(32, 576), torch.randn(49152, 576)
    for _ in range(16):
        before = faults()
        logits = x @ w.T
        copy = logits.clone()
        logprobs = torch.log_softmax(copy.add_(1.0), -1)
        del logits, copy, logprobs
        counts.append(faults() - before)
counts = []
if sys.argv[1] == "thread":
    worker = threading.Thread(target=steps, args=(counts,))
    worker.start()
    worker.join()
else:
    steps(counts)
print(json.dumps({"tuned": tuned, "faults": counts}))
"""


def _run(script: str, *args: str) -> dict:
    """The JSON last printed by `script` run in a fresh interpreter without malloc settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (*malloc.USER_SETTINGS, "GLIBC_TUNABLES", "LD_PRELOAD")
    }
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["thread", "main"])
def test_tuned_steps_reuse_their_buffers(where):
    result = _run(STEPS, where)
    assert result["tuned"] is True
    # The heap grows over the first steps; after that each step's 3 x 1,536 pages are reused.
    assert sum(result["faults"][8:]) < 100, result["faults"]


@pytest.mark.parametrize(
    "name, value",
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ("MALLOC_TOP_PAD_", "131072"),
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072"),
    ],
)
def test_the_environment_s_malloc_settings_win(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert malloc.tune_malloc() is False


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert malloc.tune_malloc() is False


# Frees 64 blocks of 1 MiB (below the tuned mmap threshold, so they come from the heap) while a
# later block keeps the heap's top in use, as a loaded model's layers do with the plain weights
# they let go; prints the RSS change of the free alone and of the release after it.
RELEASE = """
import json
import torch
from services.executor.malloc import release_free_memory, tune_malloc
tuned = tune_malloc()
def rss():
    line = [l for l in open("/proc/self/status") if l.startswith("VmRSS")][0]
    return int(line.split()[1]) * 1024
blocks = [torch.ones(1 << 18) for _ in range(64)]
keep = torch.ones(1 << 18)
before = rss()
del blocks
freed = rss()
released = release_free_memory()
print(json.dumps({"tuned": tuned, "free": before - freed, "release": freed - rss(),
                  "released": released}))
"""


def test_release_gives_freed_heap_memory_back_to_the_system():
    result = _run(RELEASE)
    assert result["tuned"] is True  # the blocks then come from the heap
    assert result["free"] < 8 << 20, result  # freeing alone keeps the pages
    assert result["released"] is True
    assert result["release"] > 56 << 20, result  # of the 64 MiB freed


def test_release_is_a_no_op_on_other_platforms(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert malloc.release_free_memory() is False
