"""Building one C++ source into a Python extension on first use, once per machine.

The build is cached under torch's extension directory, keyed by the source and by this CPU's
instruction-set flags, so a binary built for one CPU is never loaded on another. A failed build
(no compiler, no headers) is remembered: `load()` then returns None and `error` says why, so
callers can fall back to PyTorch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("radixserve.kernels")


DISABLE_ENV = "RADIXSERVE_DISABLE_CPU_KERNELS"


def disabled_by_env() -> bool:
    """True when RADIXSERVE_DISABLE_CPU_KERNELS is set to anything but "" or "0": every caller
    then runs its PyTorch path. Read on each call, so it can change at run time."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def kernels_enabled() -> bool:
    """The C++ kernels may run here: not disabled by the environment and not inside
    torch.compile (which traces the PyTorch references instead)."""
    return not torch.compiler.is_compiling() and not disabled_by_env()


def cpu_flags() -> str:
    """The `flags` line of /proc/cpuinfo ("unknown" where it cannot be read)."""
    try:
        return next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown"


class Extension:
    """One C++ source file compiled with -O3 -march=native and OpenMP; thread-safe lazy load."""

    def __init__(self, name: str, source: Path, what: str) -> None:
        self.name, self.source, self.what = name, source, what
        self.error: str | None = None
        self._module: ModuleType | None = None
        self._lock = threading.Lock()

    def key(self) -> str:
        """12 hex digits of sha256(CPU flags + source text)."""
        return hashlib.sha256((cpu_flags() + self.source.read_text()).encode()).hexdigest()[:12]

    def load(self) -> ModuleType | None:
        """The compiled module, building it on the first call; None when it cannot be built."""
        if self._module is not None:  # the per-layer fast path: no lock once built
            return self._module
        with self._lock:
            if self._module is not None or self.error is not None:
                return self._module
            try:
                from torch.utils.cpp_extension import load as load_extension

                log.info("building the %s (once per machine)", self.what)
                self._module = load_extension(
                    name=f"{self.name}_{self.key()}",
                    sources=[str(self.source)],
                    extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as exc:  # compiler missing, headers missing, ...
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                self.error = f"{type(exc).__name__}: {first_line}"
                log.warning("%s unavailable, using the PyTorch path (%s)", self.what, self.error)
            return self._module

    def require(self) -> ModuleType:
        """The module; raises RuntimeError naming the build error when it cannot be built."""
        module = self.load()
        if module is None:
            raise RuntimeError(f"{self.what} unavailable: {self.error}")
        return module
