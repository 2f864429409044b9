"""The HTTP client of a running server's native routes: /generate, /tokenize, /detokenize,
/get_model_info. Thread-safe: programs run on many threads and share one endpoint."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx

from radixserve.lang.template import ChatTemplate, derive_template


class ServerError(RuntimeError):
    """The server refused or failed a request.

    `status` is the HTTP status (None for an error event inside a stream that had started),
    `message` the server's own message, `route` the path asked for, `body` the decoded answer.
    """

    def __init__(self, route: str, status: int | None, message: str, body: Any = None) -> None:
        where = f"HTTP {status}" if status is not None else "error in stream"
        super().__init__(f"{route}: {where}: {message}")
        self.route, self.status, self.message, self.body = route, status, message, body


class RuntimeEndpoint:
    """A radixserve (or SGLang) server at `base_url` (e.g. "http://127.0.0.1:8000"; a trailing
    "/v1" is dropped), with an optional API key sent as a bearer token.

    Constructing it checks the server with GET /get_model_info (raises ServerError or
    httpx.HTTPError). `timeout` bounds connecting and each read, in seconds (None: no limit).
    """

    def __init__(
        self, base_url: str, api_key: str | None = None, timeout: float | None = 600.0
    ) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self.http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, limits=limits
        )
        self.model_info = self._call("GET", "/get_model_info")
        self._template: ChatTemplate | None = None
        self._template_lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    @property
    def chat_template(self) -> ChatTemplate:
        """Role prefixes and suffixes, derived from the server's chat template on first use."""
        with self._template_lock:
            if self._template is None:
                self._template = derive_template(self.render, self.added_tokens())
            return self._template

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /generate (one prompt, n 1): the answer's `text`, `output_ids`, `meta_info`."""
        return self._call("POST", "/generate", body)

    def generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST /generate with stream: each SSE event's object, with `text` turned into the new
        text only (the server's events are cumulative, as SGLang's are)."""
        sofar = ""
        with self.http.stream("POST", "/generate", json={**body, "stream": True}) as resp:
            if resp.status_code != 200:
                resp.read()
                raise _error("/generate", resp)
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ServerError("/generate", None, _message(event), event)
                whole = event["text"]
                yield {**event, "text": whole[len(sofar) :]}
                sofar = whole

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        """The ids /generate gives each text (special tokens added as it adds them)."""
        return self._call("POST", "/tokenize", {"prompt": prompts})["tokens"]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The chat template's text for `messages`, special tokens included."""
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        ids = self._call("POST", "/tokenize", body)["tokens"]
        return self.detokenize(ids)

    def detokenize(self, ids: list[int]) -> str:
        body = {"tokens": ids, "skip_special_tokens": False}
        return self._call("POST", "/detokenize", body)["text"]

    def added_tokens(self) -> str:
        """The text of the tokens the tokenizer puts before every prompt itself (a BOS), which
        /generate adds to a text prompt: the template's copy of it is left out of programs."""
        with_special, plain = (
            self._call("POST", "/tokenize", {"prompt": "x", "add_special_tokens": flag})["tokens"]
            for flag in (True, False)
        )
        # Where the prompt's own ids start: what comes before them was added.
        starts = range(len(with_special) - len(plain) + 1)
        n = next((k for k in starts if with_special[k : k + len(plain)] == plain), 0)
        return self.detokenize(with_special[:n]) if n else ""

    def _call(self, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
        resp = self.http.request(method, route, json=body)
        if resp.status_code != 200:
            raise _error(route, resp)
        return resp.json()


def _error(route: str, resp: httpx.Response) -> ServerError:
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    return ServerError(route, resp.status_code, _message(body), body)


def _message(body: Any) -> str:
    """The message of an OpenAI-shaped error body ({"error": {"message": ...}}), else the body."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if isinstance(error, str):
            return error
    return str(body)
