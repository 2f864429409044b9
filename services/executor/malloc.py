"""glibc malloc settings that keep a CPU executor's per-step buffers out of fresh page faults.

Every step allocates and frees buffers of the same sizes: the logits, [rows, vocab] float32 (6.3 MB
at 32 rows of SmolLM2's 49,152-token vocabulary), their copy for the sampler, and a prefill's
activations. With glibc's defaults, the memory such a step frees at the top of a heap is given
back to the system and faulted in again, page by page, by the next step: glibc raises its mmap
threshold to the largest mmapped block freed so far and its trim threshold to twice that (about
12.6 MB here), below the 19 MB a 32-row step frees; and in a thread's own arena (the executor's
forward thread has one) a heap left empty is unmapped whatever the trim threshold, unless the top
pad covers it. Measured on a 2-core AVX2 host, float32, the engine's decode steps in process:
3,040 page faults per step at 32 rows (a median step of 160-200 ms against 142 ms without them),
and 40,000-100,000 per 2,048-token prefill chunk.

`tune_malloc` fixes the mmap threshold at 32 MiB (the most the dynamic threshold reaches), raises
the trim threshold to 512 MiB and keeps a 64 MiB top pad (a thread arena's whole heap), so freed
blocks stay in the process's heaps and the next step reuses them: the effect of the TCMalloc
preload vLLM's CPU backend recommends, without a library to install. The cost is that up to
`TRIM_THRESHOLD` of memory freed after a peak (a long prefill) stays with the process for the next
one. Setting glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_
environment variables (or its glibc.malloc tunables) leaves glibc as they say.
`release_free_memory` gives the heaps' free pages back once, after the model is loaded (the
load-time tensors the layers let go would otherwise stay in them). A C library without
mallopt (musl) is left alone; a malloc preloaded in glibc's place (TCMalloc, jemalloc) does not
read these settings.
"""

from __future__ import annotations

import ctypes
import logging
import os

from services.common.libc import libc_function

log = logging.getLogger("radixserve.executor")

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# Bytes. Blocks at least this large get an mmap of their own: DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
# systems, the most the dynamic threshold reaches (and the most glibc before 2.35 accepts).
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of a heap beyond this is returned to the system.
TRIM_THRESHOLD = 512 << 20
# Extra memory a heap keeps when it grows or trims: HEAP_MAX_SIZE on 64-bit systems, so a thread
# arena's heap that empties is kept rather than unmapped.
TOP_PAD = 64 << 20

SETTINGS = (
    (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    (M_TOP_PAD, TOP_PAD),
)
# glibc's own environment settings, which tune_malloc leaves in place.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_malloc() -> bool:
    """Sets glibc's mmap threshold, trim threshold and top pad to MMAP_THRESHOLD, TRIM_THRESHOLD
    and TOP_PAD for this process (the module doc says why). True when all three were accepted;
    False off Linux, where the C library has no mallopt or refuses a value, or when the
    environment already configures glibc's malloc (then nothing is changed)."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = libc_function("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    if mallopt is None:
        return False
    refused = [param for param, value in SETTINGS if not mallopt(param, value)]
    if refused:
        log.warning("the C library refused mallopt parameters %s", refused)
    return not refused


def release_free_memory() -> bool:
    """Gives the C library's free heap pages back to the system (glibc's `malloc_trim(0)`), for
    once a model is loaded: under `tune_malloc`'s thresholds the load-time tensors the layers let
    go (a bfloat16 layer's loaded weight once packed into its panels, a quantized
    layer's float weight) stay in the heaps and in the process's RSS, and the KV pool, sized from
    the memory still available, would be that much smaller. True when glibc released something;
    False otherwise, off Linux, or where the C library has no malloc_trim."""
    malloc_trim = libc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    return malloc_trim is not None and bool(malloc_trim(0))
