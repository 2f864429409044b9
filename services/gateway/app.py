"""The HTTP routes: parse the body, ask the backend, render the answer.

Every exception of every route goes through one handler (`errors.error_response`); bodies past
--max-request-bytes are refused by `BodyLimit` before they are read. Which key each route takes is
in `auth`; the operator routes (tokenize, server info, cache flush, ...) are in `operator_routes`.
With --allowed-origins, CORS headers are added (and preflights answered) before anything else.
`RequestLog` gives each request to the generation routes its id (X-Request-Id) and its request log
line.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway import operator_routes
from services.gateway.auth import ApiKeys, authenticated, probe
from services.gateway.backend import Backend
from services.gateway.body_limit import BodyLimit
from services.gateway.config import GatewayConfig
from services.gateway.errors import (
    GatewayError,
    InvalidRequest,
    Overloaded,
    Unavailable,
    error_body,
    error_response,
)
from services.gateway.fields import CHAT, COMPLETIONS, GENERATE
from services.gateway.json_body import decode_object
from services.gateway.metrics import HttpMetrics
from services.gateway.openai_responses import (
    RESPONSES,
    ResponsesFormat,
    ResponsesRequest,
    chat_request,
)
from services.gateway.openapi import openapi_document
from services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    SamplingFields,
    parse_body,
)
from services.gateway.rate_limits import RateLimiter, load_keys_file
from services.gateway.request_log import HEADER, RequestLog, request_id
from services.gateway.respond import Run, collect, respond
from services.gateway.responses import (
    ChatFormat,
    CompletionFormat,
    Meta,
    NativeFormat,
    NativePrompt,
    ResponseOptions,
    model_card,
    model_list,
)
from services.gateway.sampling import GenerationInput
from services.gateway.score import (
    SCORE,
    ScoreRequest,
    joined_ids,
    joined_texts,
    score_body,
    scores_of,
)
from services.gateway.score import check_request as check_score_request
from services.gateway.score import generation_inputs as score_inputs

# The generation routes, and the prefix of the ids they make for requests without X-Request-Id.
ID_PREFIXES = {
    "/v1/chat/completions": "chatcmpl",
    "/v1/completions": "cmpl",
    "/generate": "gen",
    "/v1/responses": "resp",
    "/invocations": "inv",
    "/v1/score": "score",
}


def _backend(request: Request) -> Backend:
    return request.app.state.backend


def _options(
    req: SamplingFields,
    inputs: list[GenerationInput],
    echo: list[str] | None,
    pieces: list[list[str]] | None = None,
) -> ResponseOptions:
    """What the request asked of its answer besides the choices."""
    stream = req.stream_options if req.stream else None
    include = bool(stream and stream.include_usage)
    return ResponseOptions(
        include_usage=include,
        continuous_usage=include and bool(stream and stream.continuous_usage_stats),
        prompt_ids=tuple(inp.input_ids for inp in inputs) if req.return_token_ids else None,
        echo=tuple(echo) if echo else None,
        prompt_pieces=tuple(pieces) if pieces else None,
    )


@authenticated
async def chat_completions(request: Request) -> Response:
    return await _chat_completions(request)


async def _chat_completions(request: Request) -> Response:
    backend = _backend(request)
    req = parse_body(ChatCompletionRequest, await request.body(), CHAT)
    rid = request_id(request)
    inp, plan = await backend.chat_input(req, rid)
    options = _options(req, [inp], [req.echo_text()] if req.echo else None)
    fmt = ChatFormat(Meta(rid, backend.model.name), req.n, req.logprobs, options)
    fmt.answers(plan, backend.cfg.reasoning_parser)
    return await respond(request, Run([backend.generation(inp)], req.n), fmt, req.stream)


@authenticated
async def completions(request: Request) -> Response:
    return await _completions(request)


async def _completions(request: Request) -> Response:
    backend = _backend(request)
    req = parse_body(CompletionRequest, await request.body(), COMPLETIONS)
    rid = request_id(request)
    inputs = await backend.completion_inputs(req, rid)
    echo = await backend.prompt_texts(req, inputs) if req.echo else None
    pieces = None
    if req.echo and req.logprobs is not None:  # prompt logprobs: each prompt token's text
        pieces = list(await asyncio.gather(*(backend.prompt_pieces(i.input_ids) for i in inputs)))
    meta = Meta(rid, backend.model.name)
    options = _options(req, inputs, echo, pieces)
    fmt = CompletionFormat(meta, req.n, req.logprobs is not None, options)
    run = Run([backend.generation(inp) for inp in inputs], req.n)
    return await respond(request, run, fmt, req.stream)


@authenticated
async def generate(request: Request) -> Response:
    backend = _backend(request)
    req = parse_body(GenerateRequest, await request.body(), GENERATE)
    # A batch's own ids (`rid` as a list) stay per prompt; the request keeps its header id.
    rid = request_id(request, req.rid if isinstance(req.rid, str) else None)
    inputs = await backend.native_inputs(req, rid)
    n = inputs[0].sampling.n
    pieces: list[list[str]] = [[] for _ in inputs]
    if inputs[0].logprob_start_len is not None and req.return_text_in_logprobs:
        pieces = list(await asyncio.gather(*(backend.prompt_pieces(i.input_ids) for i in inputs)))
    run = Run([backend.generation(inp) for inp in inputs], n)
    fmt = NativeFormat(
        Meta(rid, backend.model.name),
        n,
        logprobs=req.return_logprob,
        text_in_logprobs=req.return_text_in_logprobs,
        logprob_start=max(req.logprob_start_len, 0),
        prompts=[
            NativePrompt(i.request_id, i.input_ids, p, g)
            for i, p, g in zip(inputs, pieces, run.generations, strict=True)
        ],
        batched=req.batched,
    )
    return await respond(request, run, fmt, req.stream)


@authenticated
async def create_response(request: Request) -> Response:
    backend = _backend(request)
    req = parse_body(ResponsesRequest, await request.body(), RESPONSES)
    rid = request_id(request)
    chat, history = chat_request(req, backend.responses)
    inp, plan = await backend.chat_input(chat, rid)
    response_id = "resp_" + rid.removeprefix("resp-").removeprefix("resp_")
    fmt = ResponsesFormat(response_id, backend.model.name, req, history, backend.responses, plan)
    return await respond(request, Run([backend.generation(inp)], 1), fmt, req.stream)


@authenticated
async def get_response(request: Request) -> Response:
    stored = _backend(request).responses.get(request.path_params["response_id"])
    return JSONResponse(stored.body)


@authenticated
async def invocations(request: Request) -> Response:
    """vLLM's SageMaker route: a body with `messages` is a chat completion, one with `prompt` a
    completion."""
    body = decode_object(await request.body())
    if "messages" in body:
        return await _chat_completions(request)
    if "prompt" in body:
        return await _completions(request)
    raise InvalidRequest(
        "an /invocations body needs 'messages' (chat) or 'prompt' (completion)", param="messages"
    )


@authenticated
async def score(request: Request) -> Response:
    """SGLang's /v1/score (services/gateway/score.py)."""
    backend = _backend(request)
    req = parse_body(ScoreRequest, await request.body(), SCORE)
    model = backend.check_model(req.model)
    check_score_request(req, model)
    if isinstance(req.query, str):
        texts = joined_texts(req)
        prompts = list(await asyncio.gather(*(backend.tokenizer.encode(t) for t in texts)))
    else:
        prompts = joined_ids(req)
    inputs = score_inputs(request_id(request), prompts, req.label_token_ids, model)
    run = Run([backend.generation(inp) for inp in inputs], 1)
    outputs = await collect(request, run)
    logprobs = [math.nan] * len(inputs)
    for out in outputs:
        if out.prompt_logprobs:
            entry = out.prompt_logprobs[-1]
            logprobs[out.index] = entry.logprob if entry is not None else math.nan
    labels = len(req.label_token_ids)
    body = score_body(
        model.name, scores_of(logprobs, labels, req.apply_softmax), sum(map(len, prompts))
    )
    return JSONResponse(body)


async def load(request: Request) -> Response:
    """vLLM's server load: generation requests in flight at this gateway."""
    return JSONResponse({"server_load": getattr(request.app.state, "server_load", 0)})


@authenticated
async def list_models(request: Request) -> Response:
    backend = _backend(request)
    model = backend.model
    card = model_card(model.name, backend.created, model.context_length, model.model_path)
    return JSONResponse(model_list([card]))


@authenticated
async def get_model(request: Request) -> Response:
    backend = _backend(request)
    model = backend.check_model(request.path_params["model_id"])
    card = model_card(model.name, backend.created, model.context_length, model.model_path)
    return JSONResponse(card)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    backend = _backend(request)
    reason = await backend.not_ready_reason()
    if reason is not None:
        # Probes poll this while the services start: answer 503 without logging each poll (the
        # backend logs each new reason once).
        err = Unavailable(f"not ready: {reason}")
        body = error_body(err.message, err.type, err.param, err.code)
        return JSONResponse(body, status_code=err.status)
    return JSONResponse({"status": "ready", "model": backend.model.name})


@probe
async def health_generate(request: Request) -> Response:
    await _backend(request).health_generate()
    return JSONResponse({"status": "ok"})


@probe
async def metrics(request: Request) -> Response:
    text = _backend(request).metrics_text()
    return Response(text, media_type=CONTENT_TYPE_LATEST)


def build_app(
    cfg: GatewayConfig, backend_factory: Callable[[GatewayConfig], Backend] = Backend
) -> Starlette:
    """The Starlette app; the backend is made at startup (its gRPC channels need the server's loop)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        backend = app.state.backend = backend_factory(cfg)
        await backend.start()
        yield
        await backend.close()

    def on_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, Overloaded):
            _backend(request).metrics.rejected()
        return error_response(exc, cfg.retry_after_s)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/invocations", invocations, methods=["POST"]),
        Route("/load", load, methods=["GET"]),
        Route("/v1/score", score, methods=["POST"]),
        Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/health_generate", health_generate, methods=["GET"]),
        *operator_routes.ROUTES,
    ]
    if cfg.metrics:
        routes.append(Route("/metrics", metrics, methods=["GET"]))
    handlers = {GatewayError: on_error, HTTPException: on_error, Exception: on_error}
    limit = Middleware(BodyLimit, max_bytes=cfg.max_request_bytes)
    app = Starlette(
        routes=routes,
        middleware=[limit],
        exception_handlers=handlers,  # type: ignore[arg-type]
        lifespan=lifespan,
    )
    app.add_middleware(RequestLog, id_prefixes=ID_PREFIXES, log_requests=cfg.log_requests)
    if cfg.metrics:
        app.add_middleware(HttpMetrics)
    for cors in _cors(cfg):  # outermost: a preflight is answered before anything else
        app.add_middleware(cors.cls, *cors.args, **cors.kwargs)
    limits = load_keys_file(cfg.api_key_file) if cfg.api_key_file else []
    app.state.api_keys = ApiKeys.from_config(cfg, tuple(k.key for k in limits))
    app.state.rate_limiter = RateLimiter(limits)
    return app


def _cors(cfg: GatewayConfig) -> list[Middleware]:
    """Starlette's CORS middleware when --allowed-origins is set (none otherwise: no CORS headers,
    and a preflight OPTIONS is a 405)."""
    if not cfg.allowed_origins:
        return []
    cors = Middleware(
        CORSMiddleware,
        allow_origins=cfg.allowed_origins,
        allow_methods=cfg.allowed_methods,
        allow_headers=cfg.allowed_headers,
        allow_credentials=cfg.allow_credentials,
        expose_headers=[HEADER],  # browsers may read X-Request-Id
    )
    return [cors]
