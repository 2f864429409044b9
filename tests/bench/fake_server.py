"""A scripted OpenAI-compatible peer (Starlette + uvicorn on a free port, in a thread).

The requested `model` picks the behaviour; "ok" streams `max_tokens` chunks of WORD, the first
after FIRST_DELAY_S and each next one GAP_S later.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.procs import free_port

FIRST_DELAY_S = 0.15
GAP_S = 0.04
WORD = " hello"
MODELS = ("ok", "pairs", "busy", "drop", "error-event", "no-done")


def _chunk(body: dict[str, Any], text: str | None, finish: str | None = None) -> str:
    if "messages" in body:
        delta = {"content": text} if text is not None else {}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    return "data: " + json.dumps({"choices": [choice]}) + "\n\n"


async def _events(body: dict[str, Any]) -> AsyncIterator[str]:
    model, n = body["model"], body["max_tokens"]
    per_chunk = 2 if model == "pairs" else 1
    if "messages" in body:  # the role chunk carries no text: it must not count as the first token
        yield _chunk(body, None)
    await asyncio.sleep(FIRST_DELAY_S)
    for i in range(0, n, per_chunk):
        if i:
            await asyncio.sleep(GAP_S)
        if model == "drop" and i == n // 2:
            raise ConnectionResetError("the peer went away")
        if model == "error-event" and i == n // 2:
            yield 'data: {"error": {"message": "out of KV slots", "code": 500}}\n\n'
            return
        yield _chunk(body, WORD * min(per_chunk, n - i))
    yield _chunk(body, None, "length")
    usage = {"completion_tokens": n, "prompt_tokens_details": {"cached_tokens": 3}}
    yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
    if model != "no-done":
        yield "data: [DONE]\n\n"


class FakeServer:
    """Records every request body and Authorization header; `url` is the base URL."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        routes = [
            Route("/v1/models", self.models),
            Route("/v1/completions", self.generate, methods=["POST"]),
            Route("/v1/chat/completions", self.generate, methods=["POST"]),
        ]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            Starlette(routes=routes), host="127.0.0.1", port=self.port, log_level="critical"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def models(self, request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]}
        )

    async def generate(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("authorization"))
        if body["model"] == "busy":
            error = {"message": "server overloaded", "type": "overloaded", "code": 503}
            return JSONResponse({"error": error}, status_code=503)
        return StreamingResponse(_events(body), media_type="text/event-stream")

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
