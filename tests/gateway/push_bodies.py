"""`python -m tests.gateway.push_bodies BASE_URL API_KEY`: two clients pushing 10 MB completions
bodies without pause, one with Content-Length and one chunked, each body sent 64 KiB at a time
until the server answers (as a client reading its socket would). They push until standard input
closes (at most 60 s), then the status lines they got are printed as JSON, {line: count}.

The hostile-input test runs this at the lowest CPU priority: on a 2-core machine, clients pushing
at full speed take a core from the services they test, which real clients on other machines
would not do."""

from __future__ import annotations

import collections
import contextlib
import json
import select
import socket
import sys
import threading
import time
from urllib.parse import urlparse

BODY_BYTES = 10_000_000
PIECE_BYTES = 65536


def push_ten_megabytes(base_url: str, api_key: str, chunked: bool) -> str:
    """One 10 MB body; returns the status line of the answer."""
    url = urlparse(base_url)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BODY_BYTES + 12}"
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {api_key}\r\n"
        f"{framing}\r\n\r\n"
    ).encode()
    piece = b"x" * PIECE_BYTES
    if chunked:
        piece = b"10000\r\n" + piece + b"\r\n"
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(
            head + (b"c\r\n" if chunked else b"") + b'{"prompt": "' + (b"\r\n" if chunked else b"")
        )
        for _ in range(BODY_BYTES // PIECE_BYTES):
            if select.select([sock], [], [], 0)[0]:
                break
            with contextlib.suppress(OSError):
                sock.sendall(piece)
        return sock.recv(65536).split(b"\r\n", 1)[0].decode(errors="replace")


def main(base_url: str, api_key: str) -> None:
    stop = threading.Event()
    answers: collections.Counter[str] = collections.Counter()

    def push(chunked: bool) -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            answers[push_ten_megabytes(base_url, api_key, chunked)] += 1

    pushers = [threading.Thread(target=push, args=(chunked,)) for chunked in (False, True)]
    for t in pushers:
        t.start()
    sys.stdin.read()
    stop.set()
    for t in pushers:
        t.join(timeout=70)
    print(json.dumps(answers))


if __name__ == "__main__":
    main(*sys.argv[1:3])
