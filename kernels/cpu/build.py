"""Building one C++ source into a Python extension on first use, once per machine.

The build is cached under torch's extension directory ($TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions), keyed by the source and the headers it includes from its directory,
by this CPU's instruction-set flags and by the Python and torch versions, so a binary built for
one CPU or torch is never loaded with another.
A failed build (no compiler, no headers) is remembered: `load()` then returns None and `error`
says why, so callers can fall back to PyTorch.

Processes building the same extension at once take turns under an flock on `build.lock` in its
directory, which the kernel releases when its holder dies. torch's own `lock` file, which a build
killed midway leaves behind and which would make every later build wait for ever, is therefore
stale whenever the flock is held, and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
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


INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def included_names(text: str, read: Callable[[str], str | None]) -> list[str]:
    """The names a source of text `text` includes with `#include "name"`, and those they include
    in turn, each once, in the order first met. `read(name)` gives an included file's text, or
    None for a name that is not one of the local files (skipped); what it raises propagates."""
    found: list[str] = []
    pending = [text]
    while pending:
        for name in INCLUDE.findall(pending.pop(0)):
            if name in found:
                continue
            included = read(name)
            if included is not None:
                found.append(name)
                pending.append(included)
    return found


def local_headers(source: Path) -> list[Path]:
    """The headers `source` includes with `#include "name"` from its own directory, and those
    they include in turn, each once, in the order first met (a quoted include that is not a file
    there is skipped: the compiler reports it)."""

    def read(name: str) -> str | None:
        header = source.parent / name
        return header.read_text() if header.is_file() else None

    return [source.parent / name for name in included_names(source.read_text(), read)]


def build_root() -> Path:
    """Where extensions are built: $TORCH_EXTENSIONS_DIR, else torch's default root."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Holds the flock on `directory`/build.lock (created with the directory) while the block
    runs, waiting for another process's build to end first; removes torch's stale `lock` file
    (see the module docstring). Raises OSError when the directory cannot be created."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                log.warning("removing %s, left by a build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Extension:
    """One C++ source file compiled with -O3 -march=native and OpenMP; thread-safe lazy load.

    `requires`: the /proc/cpuinfo flags the source cannot be compiled without (e.g.
    "avx512_bf16"); on a CPU lacking one, `load()` returns None at once, without running the
    compiler, and `error` names the missing flags. `cflags`: compiler flags added to those (e.g.
    "-mamx-tile", for a compiler whose -march=native does not enable an extension the CPU
    has)."""

    def __init__(
        self,
        name: str,
        source: Path,
        what: str,
        requires: tuple[str, ...] = (),
        cflags: tuple[str, ...] = (),
    ) -> None:
        self.name, self.source, self.what = name, source, what
        self.requires, self.cflags = requires, cflags
        self.error: str | None = None
        self._module: ModuleType | None = None
        self._lock = threading.Lock()

    def key(self) -> str:
        """12 hex digits of sha256(CPU flags + Python and torch versions + extra compiler flags
        + source text + the text of the headers it includes from its own directory)."""
        versions = f"{sys.version_info[:2]} {torch.__version__}"
        text = cpu_flags() + versions + " ".join(self.cflags) + self.source.read_text()
        for header in local_headers(self.source):
            text += header.read_text()
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def load(self) -> ModuleType | None:
        """The compiled module, building it on the first call; None when it cannot be built."""
        if self._module is not None:  # the per-layer fast path: no lock once built
            return self._module
        with self._lock:
            if self._module is not None or self.error is not None:
                return self._module
            flags = cpu_flags().split()
            missing = [flag for flag in self.requires if flag not in flags]
            if missing:
                self.error = f"this CPU lacks {', '.join(missing)}"
                log.info("%s not built: %s; using the PyTorch path", self.what, self.error)
                return None
            try:
                from torch.utils.cpp_extension import load as load_extension

                name = f"{self.name}_{self.key()}"
                directory = build_root() / name
                log.info("building the %s (once per machine)", self.what)
                with build_lock(directory):
                    self._module = load_extension(
                        name=name,
                        sources=[str(self.source)],
                        extra_cflags=[
                            "-O3",
                            "-march=native",
                            "-ffast-math",
                            "-fopenmp",
                            *self.cflags,
                        ],
                        extra_ldflags=["-fopenmp"],
                        build_directory=str(directory),
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
