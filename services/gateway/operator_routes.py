"""Operator routes with SGLang's names and shapes (vLLM's where SGLang has none): tokenize and
detokenize, version, model and server info, and flushing the prefix cache.

/version is open; /tokenize, /detokenize and /get_model_info take an --api-key; /get_server_info
and /flush_cache are admin routes (see `auth`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from services.gateway.auth import admin, authenticated
from services.gateway.backend import Backend
from services.gateway.config import GatewayConfig
from services.gateway.protocol import DetokenizeRequest, TokenizeRequest, parse_body

VERSION = importlib.metadata.version("radixserve")
SECRETS = frozenset({"api_key", "admin_api_key"})  # config fields /get_server_info leaves out


def _one_or_batch(values: list[Any], batched: bool) -> Any:
    """A batch's answers as sent: the list for a batch, its one item otherwise."""
    return values if batched else values[0]


@authenticated
async def tokenize(request: Request) -> Response:
    """{"prompt": str | [str]} or {"messages": [...]} → {"tokens", "count", "max_model_len"}
    (for a batch of prompts, `tokens` and `count` are lists, one item per prompt)."""
    backend: Backend = request.app.state.backend
    req = parse_body(TokenizeRequest, await request.body())
    batch = await backend.tokenize(req)
    return JSONResponse(
        {
            "tokens": _one_or_batch(batch, req.batched),
            "count": _one_or_batch([len(ids) for ids in batch], req.batched),
            "max_model_len": backend.model.context_length,
        }
    )


@authenticated
async def detokenize(request: Request) -> Response:
    """{"tokens": [int] | [[int]]} → {"text", "prompt"}: the same text under SGLang's name and
    vLLM's (a list for a batch)."""
    backend: Backend = request.app.state.backend
    req = parse_body(DetokenizeRequest, await request.body())
    text = _one_or_batch(await backend.detokenize(req), req.batched)
    return JSONResponse({"text": text, "prompt": text})


async def version(request: Request) -> Response:
    return JSONResponse({"version": VERSION})


@authenticated
async def get_model_info(request: Request) -> Response:
    """SGLang's model info: where the weights and the tokenizer come from, and what the model
    does (generation only: no image or audio input)."""
    backend: Backend = request.app.state.backend
    model = backend.model
    return JSONResponse(
        {
            "model_path": model.model_path,
            "tokenizer_path": await backend.tokenizer.model_path(),
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "architectures": [model.architecture],
        }
    )


@admin
async def get_server_info(request: Request) -> Response:
    """The gateway's flags (keys left out), the version, and per scheduler (`internal_states`,
    as SGLang has one per data-parallel rank) its settings and load."""
    backend: Backend = request.app.state.backend
    return JSONResponse(
        {
            **server_args(backend.cfg),
            "version": VERSION,
            "internal_states": await backend.scheduler_states(),
        }
    )


@admin
async def flush_cache(request: Request) -> Response:
    """Empties every scheduler's prefix cache: 200 and a line of text (as SGLang), or 400
    `server_busy` while requests are in flight."""
    backend: Backend = request.app.state.backend
    freed = await backend.flush_cache()
    return PlainTextResponse(f"Cache flushed: {freed} cached tokens freed.\n")


def server_args(cfg: GatewayConfig) -> dict[str, Any]:
    """The flags as /get_server_info shows them: every one but the keys."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SECRETS}


ROUTES = [
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
    Route("/version", version, methods=["GET"]),
    Route("/get_model_info", get_model_info, methods=["GET"]),
    Route("/get_server_info", get_server_info, methods=["GET"]),
    Route("/flush_cache", flush_cache, methods=["GET", "POST"]),
]
