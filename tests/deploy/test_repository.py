"""What the repository itself holds: sources, not build artefacts."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.deploy.compose import ROOT


def git(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("git")
    if exe is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def test_no_wheel_or_archive_is_committed() -> None:
    assert git("ls-files", "*.whl", "*.tar.gz").stdout.split() == []


def test_built_packages_are_ignored() -> None:
    assert git("check-ignore", "-q", "some-package-1.0-py3-none-any.whl").returncode == 0
