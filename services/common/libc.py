"""Functions of the C library this process runs on, through ctypes (Linux only)."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable


def libc_function(name: str, argtypes: tuple, restype: type) -> Callable[..., int] | None:
    """The C library's function `name` with its signature set, for the C library this process
    runs on; None off Linux or where that library has no such function."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function
