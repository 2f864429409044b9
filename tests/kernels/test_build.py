"""Building the C++ kernels: a build killed midway does not block the next one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernels.cpu import build
from kernels.cpu.build import build_lock


def test_a_lock_file_left_by_a_killed_build_is_removed(tmp_path: Path) -> None:
    directory = tmp_path / "radixserve_cpu_x_0123456789ab"
    directory.mkdir()
    (directory / "lock").write_text("")  # what torch's FileBaton leaves when its build is killed
    with build_lock(directory):
        assert not (directory / "lock").exists()
    assert (directory / "build.lock").exists()


def test_builds_take_turns_and_a_dead_holder_lets_the_next_in(tmp_path: Path) -> None:
    """A second process waits while one holds the build lock, and gets it as soon as the first
    is killed (the kernel drops a dead process's flock)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path; from kernels.cpu.build import build_lock\n"
            f"with build_lock(Path({str(tmp_path)!r})):\n"
            "    print('held', flush=True); time.sleep(60)\n"
        )],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waiter = subprocess.Popen(
            [sys.executable, "-c", (
                "from pathlib import Path; from kernels.cpu.build import build_lock\n"
                f"with build_lock(Path({str(tmp_path)!r})):\n    print('got it')\n"
            )],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        time.sleep(1.0)
        assert waiter.poll() is None, "the second build did not wait for the first"
        holder.kill()
        out, _ = waiter.communicate(timeout=30)
        assert out.strip() == "got it"
    finally:
        holder.kill()
        holder.wait()


def test_the_build_directory_follows_torch_extensions_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build.build_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert build.build_root().name == "torch_extensions"


def test_a_cpu_without_the_required_flags_skips_the_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An extension needing an instruction set this CPU lacks is refused at once (no compiler
    run, which would fail after a minute), naming the missing flag."""
    monkeypatch.setattr(build, "cpu_flags", lambda: "flags\t\t: fpu sse2 avx avx2 fma")
    source = tmp_path / "x.cpp"
    source.write_text("#error the compiler must not run\\n")
    ext = build.Extension("radixserve_test_x", source, "test kernel", requires=("avx2", "avx512f"))
    assert ext.load() is None
    assert ext.error == "this CPU lacks avx512f"
    assert not any(build.build_root().glob("radixserve_test_x_*"))


def test_the_build_key_covers_the_headers_a_source_includes(tmp_path: Path) -> None:
    """A kernel rebuilds when a header it includes from its own directory changes (those the
    headers include too); system headers and names that are not files there are left out."""
    source = tmp_path / "kernel.cpp"
    source.write_text('#include <vector>\n#include "a.h"\n#include "missing.h"\nint f();\n')
    (tmp_path / "a.h").write_text('#pragma once\n#include "b.h"\n')
    (tmp_path / "b.h").write_text("inline int g() { return 1; }\n")
    assert build.local_headers(source) == [tmp_path / "a.h", tmp_path / "b.h"]
    extension = build.Extension("kernel", source, "test kernel")
    before = extension.key()
    (tmp_path / "b.h").write_text("inline int g() { return 2; }\n")
    assert extension.key() != before
