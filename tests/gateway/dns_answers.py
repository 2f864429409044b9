"""`python -m tests.gateway.dns_answers gateway ...`: the gateway as `radixserve gateway` runs it,
except that names under `.radixserve.test` resolve to the addresses listed, one per line, in the
file RADIXSERVE_TEST_DNS_ANSWERS names, read again at every lookup. A test changes the file to
change the answer, as a headless Service's records change when engines come and go."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from services.cli import main

SUFFIX = ".radixserve.test"
_system_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list:
    """The file's addresses for a test name (a gaierror when it lists none, as a resolver
    answers a name without records); the system's answer for any other."""
    if not (isinstance(host, str) and host.endswith(SUFFIX)):
        return _system_getaddrinfo(host, port, *args, **kwargs)
    ips = Path(os.environ["RADIXSERVE_TEST_DNS_ANSWERS"]).read_text().split()
    if not ips:
        raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
    return [info for ip in ips for info in _system_getaddrinfo(ip, port, *args, **kwargs)]


if __name__ == "__main__":
    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    main(sys.argv[1:])
