"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

TTFT runs from sending the request to the first chunk carrying generated text; ITL is the gap
between consecutive text-bearing chunks. A chunk carrying several tokens (servers that batch their
stream output) contributes one gap, not one per token: ITL then measures what a client sees, and
TPOT (in the summary) the per-token rate. Output tokens are the generated text re-tokenized locally.

The transport is aiohttp: the client shares the server's cores when both run on one machine, and
reading a stream through aiohttp took 41 µs of client CPU per chunk against 108 µs through httpx
(`radixserve serve` on a 2-core EPYC, 32 streamed completions of 64 tokens, 16 at a time).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from services.bench.datasets import Request
from services.bench.record import RequestError, RequestRecord
from services.bench.tokens import TokenCounter

PATHS = {"chat": "/chat/completions", "completions": "/completions"}


@dataclass(frozen=True)
class ClientConfig:
    base_url: str  # with or without the trailing /v1
    model: str
    endpoint: str  # chat | completions
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True


class StreamError(Exception):
    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error


def api_url(base_url: str, path: str) -> str:
    base = base_url.rstrip("/")
    return base + path if base.endswith("/v1") else base + "/v1" + path


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def make_http(max_connections: int | None) -> aiohttp.ClientSession:
    """No read timeout: the run's deadline bounds every request; no pool limit but the run's."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0)
    connector = aiohttp.TCPConnector(limit=max_connections or 0)
    return aiohttp.ClientSession(timeout=timeout, connector=connector)


async def first_model(http: aiohttp.ClientSession, base_url: str, api_key: str | None) -> str:
    """The first model id of GET /v1/models; raises aiohttp.ClientError for a failed request
    and ValueError when the list is empty."""
    async with http.get(api_url(base_url, "/models"), headers=auth_headers(api_key)) as resp:
        resp.raise_for_status()
        models = (await resp.json(content_type=None)).get("data") or []
    if not models:
        raise ValueError(f"{base_url} serves no model (GET /v1/models is empty)")
    return models[0]["id"]


class BenchClient:
    """Sends requests and returns their records; never raises for a failed request."""

    def __init__(
        self, config: ClientConfig, counter: TokenCounter, http: aiohttp.ClientSession
    ) -> None:
        self.config, self.counter, self.http = config, counter, http
        self.url = api_url(config.base_url, PATHS[config.endpoint])
        self.headers = {"Accept": "text/event-stream", **auth_headers(config.api_key)}

    async def send(self, request: Request) -> RequestRecord:
        record = RequestRecord(
            request.group_id, request.conversation_id, request.turn, request.output_len
        )
        record.input_tokens = await asyncio.to_thread(self.count_input, request)
        record.start_s = time.perf_counter()
        try:
            await self._stream(request, record)
        except StreamError as exc:
            record.error = exc.error
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            record.error = RequestError("timeout", _describe(exc))
        except aiohttp.ClientConnectorError as exc:
            record.error = RequestError("connect", _describe(exc))
        except aiohttp.ClientError as exc:
            record.error = RequestError("disconnect", _describe(exc), 200)
        except Exception as exc:  # a benchmark reports a broken request; it never dies of one
            record.error = RequestError("client", _describe(exc))
        record.latency_s = time.perf_counter() - record.start_s
        if record.text:
            record.output_tokens = await asyncio.to_thread(self.counter.count_text, record.text)
        return record

    def count_input(self, request: Request) -> int:
        if self.config.endpoint == "chat":
            return self.counter.count_messages(request.messages)
        return self.counter.count_prompt(request.prompt())

    def body(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "max_tokens": request.output_len,
            "temperature": self.config.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.config.endpoint == "chat":
            body["messages"] = [m.to_json() for m in request.messages]
        else:
            body["prompt"] = request.prompt()
        if self.config.ignore_eos:
            body["ignore_eos"] = True
        if request.response_format:
            body["response_format"] = json.loads(request.response_format)
        return body

    async def _stream(self, request: Request, record: RequestRecord) -> None:
        async with self.http.post(self.url, json=self.body(request), headers=self.headers) as resp:
            if resp.status != 200:
                message = _error_message(await resp.read())
                raise StreamError(RequestError("http", message, resp.status))
            parts: list[str] = []
            last, pending = 0.0, b""
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    payload = _sse_data(line.decode())
                    if payload is None:
                        continue
                    if payload == "[DONE]":
                        record.text = "".join(parts)
                        return
                    text = _apply_chunk(_parse_chunk(payload), record)
                    if text:
                        parts.append(text)
                        last = _mark_text(record, now, last)
            record.text = "".join(parts)
            raise StreamError(RequestError("incomplete", "stream ended without data: [DONE]", 200))


def _sse_data(line: str) -> str | None:
    """The payload of a `data:` line; None for blank lines, comments and other fields."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def _parse_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError as exc:
        raise StreamError(
            RequestError("protocol", f"unparsable chunk {data[:200]!r}", 200)
        ) from exc
    if not isinstance(chunk, dict):
        raise StreamError(RequestError("protocol", f"chunk is not an object: {data[:200]!r}", 200))
    if "error" in chunk:
        raise StreamError(RequestError("server", _message_of(chunk) or data[:500], 200))
    return chunk


def _apply_chunk(chunk: dict[str, Any], record: RequestRecord) -> str:
    """Notes usage and finish reason into `record`; returns the generated text the chunk carries."""
    usage = chunk.get("usage")
    if usage:
        record.server_output_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details") or {}
        record.server_cached_tokens = details.get("cached_tokens")
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    record.finish_reason = choice.get("finish_reason") or record.finish_reason
    if "delta" in choice:
        delta = choice["delta"] or {}
        return (delta.get("reasoning_content") or "") + (delta.get("content") or "")
    return choice.get("text") or ""


def _mark_text(record: RequestRecord, now: float, last: float) -> float:
    if record.ttft_s is None:
        record.ttft_s = now - record.start_s
    else:
        record.itl_s.append(now - last)
    return now


def _message_of(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    error = obj.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    for key in ("error", "message", "detail"):
        if isinstance(obj.get(key), str):
            return obj[key]
    return None


def _error_message(body: bytes) -> str:
    text = body.decode(errors="replace")
    try:
        return _message_of(json.loads(text)) or text[:500]
    except json.JSONDecodeError:
        return text[:500]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
