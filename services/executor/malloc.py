"""glibc malloc settings that keep a CPU executor's per-step buffers out of fresh page faults.

Every step allocates and frees buffers of the same sizes: the logits, [rows, vocab] float32 (6.3 MB
at 32 rows of SmolLM2's 49,152-token vocabulary), their copy for the sampler, and a prefill's
activations. glibc serves a request at or above its mmap threshold with a new mmap, which the
kernel backs page by page on first write, and unmaps it again on free. The threshold starts at
128 KiB and rises to the size of the largest mmapped block freed so far (at most 32 MiB), but a
block exactly at the threshold is still mmapped: the logits of every decode step at one batch size
are. Measured on a 2-core AVX2 host, float32, `radixserve bench-executor`-shaped steps: 3,040 page
faults per decode step at 32 rows (a median step of 160-200 ms against 142 ms without them), and
40,000-100,000 per 2,048-token prefill chunk.

`tune_malloc` fixes the mmap threshold at glibc's largest (32 MiB) and raises the trim threshold, so
freed blocks stay in the process's heaps and the next step reuses them: the effect of the TCMalloc
preload vLLM's CPU backend recommends, without a library to install. The cost is that up to
`TRIM_THRESHOLD` of memory freed after a peak (a long prefill) stays mapped to the process for the
next one. Setting glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment variables
(or its glibc.malloc tunables) leaves glibc as they say; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("radixserve.executor")

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Bytes. glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of a heap beyond this is returned to the system.
TRIM_THRESHOLD = 512 << 20

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_malloc() -> bool:
    """Sets glibc's mmap threshold to MMAP_THRESHOLD and its trim threshold to TRIM_THRESHOLD for
    this process (the module doc says why). True when both were set; False off Linux, where the C
    library has no mallopt or refuses a value (musl's does nothing and answers 0), or when the
    environment already configures glibc's malloc (then nothing is changed)."""
    if not sys.platform.startswith("linux"):
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    log.debug("malloc thresholds %s", "set" if tuned else "left as they were")
    return tuned
