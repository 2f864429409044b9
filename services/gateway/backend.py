"""The services behind the gateway: clients, routing, the served model, readiness, and prompts.

The gateway becomes ready once a scheduler answers GetModelInfo, every tokenizer reports SERVING
and a one-token warm-up generation went through the whole path; until then `not_ready_reason`
says what is missing. Requests that arrive before the model is known get 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import replace
from typing import Any

from services.common.tracing import tracer
from services.gateway.chat_tools import ToolPlan, after_reasoning, plan_tools
from services.gateway.clients import SchedulerClient, TokenizerClient
from services.gateway.config import GatewayConfig
from services.gateway.errors import GatewayError, InvalidRequest, ModelNotFound, Unavailable
from services.gateway.generation import Generation
from services.gateway.metrics import GatewayMetrics, RequestMetrics
from services.gateway.openai_responses import ResponseStore
from services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    NativeSamplingParams,
    TokenizeRequest,
)
from services.gateway.request_log import new_request_id
from services.gateway.router import SchedulerRouter
from services.gateway.sampling import (
    MAX_CHARS_PER_TOKEN,
    GenerationInput,
    ModelInfo,
    SamplingParams,
    TextOptions,
    chat_sampling,
    chat_texts,
    check_prompt_chars,
    check_token_ids,
    completion_sampling,
    fit_context,
    native_sampling,
    text_options,
    truncate_prompt,
)
from services.gateway.tools.parsers import default_tool_parser

log = logging.getLogger("radixserve.gateway")
STARTUP_RETRY_S = 0.5
PROBE_TEXT = "Hello"
# The tokenizer's answer to a role its chat template does not render, naming the message.
ROLE_NOT_RENDERED = re.compile(r"does not render role .*? \(messages\[(\d+)\]\)")


class Backend:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.tracer = tracer("radixserve.gateway")  # None: tracing is off
        self.tokenizer = TokenizerClient(cfg.tokenizer, self.tracer)
        self.router = SchedulerRouter(
            cfg.scheduler,
            cfg.load_refresh_s,
            SchedulerClient,
            cfg.routing(),
            cfg.discovery_refresh_s,
        )
        self.metrics = GatewayMetrics()
        self.responses = ResponseStore(cfg.max_stored_responses)  # for /v1/responses
        self.created = int(time.time())
        self._model: ModelInfo | None = None
        self._warmed_up = False
        self._startup_reason = "starting"
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.router.run()),
            asyncio.create_task(self._become_ready()),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.tokenizer.close()
        await self.router.close()

    @property
    def schedulers(self) -> list[SchedulerClient]:
        """The engines listed now (static --scheduler addresses, or found by DNS)."""
        return self.router.clients

    @property
    def model(self) -> ModelInfo:
        if self._model is None:
            raise Unavailable(f"the model is not available yet: {self._startup_reason}")
        return self._model

    def check_model(self, name: str | None) -> ModelInfo:
        """The served model, if `name` (when given) names it."""
        model = self.model
        if name is not None and name != model.name:
            raise ModelNotFound(f"The model `{name}` does not exist.", param="model")
        return model

    async def not_ready_reason(self) -> str | None:
        """None when ready; otherwise why not (startup, or a service gone since). The router's
        snapshot is refreshed too, so a request right after a ready answer is routed by what
        this check saw, not by a poll from before a scheduler came back."""
        if not self._warmed_up:
            return self._startup_reason
        try:
            await self.tokenizer.check()
            await self._check_schedulers()
        except GatewayError as exc:
            return exc.message
        await self.router.refresh()
        if not self.router.loads():
            return f"no scheduler is reachable: {self.router.unreachable_reason()}"
        return None

    async def health_generate(self) -> None:
        """Generates one token through the whole path; raises Unavailable if it fails."""
        try:
            ids = await self.tokenizer.encode(PROBE_TEXT)
            sampling = SamplingParams(temperature=0.0, max_tokens=1)
            inp = GenerationInput(new_request_id("health"), ids, sampling, TextOptions())
            async for _ in self.generation(inp, RequestMetrics.disabled()).outputs():
                pass
        except GatewayError as exc:
            raise Unavailable(f"generation failed: {exc.message}") from None

    def metrics_text(self) -> bytes:
        """The gateway's series in Prometheus' text format."""
        return self.metrics.render()

    def generation(self, inp: GenerationInput, metrics: RequestMetrics | None = None) -> Generation:
        scheduler = self.router.pick(inp.sampling.n, inp.input_ids)
        metrics = metrics or self.metrics.request()
        model = self._model.name if self._model is not None else ""
        return Generation(
            inp, scheduler, self.tokenizer, metrics, self.cfg.request_timeout_s, self.tracer, model
        )

    async def chat_input(
        self, req: ChatCompletionRequest, request_id: str
    ) -> tuple[GenerationInput, ToolPlan | None]:
        """The generation of a chat request, and how its tools are used (None: no tools)."""
        model = self.check_model(req.model)
        check_prompt_chars(chat_texts(req), model, "messages")
        sampling, plan = chat_tools_sampling(
            req, model, self.cfg.tool_call_parser, self.cfg.reasoning_parser
        )
        ids = truncate_prompt(await self._chat_ids(req), req, model)
        sampling = fit_context(sampling, len(ids), model, "messages")
        return GenerationInput(request_id, ids, sampling, text_options(req)), plan

    async def completion_inputs(
        self, req: CompletionRequest, request_id: str
    ) -> list[GenerationInput]:
        model = self.check_model(req.model)
        _check_prompts(req.prompts(), model, "prompt", "prompt")
        sampling = completion_sampling(req, model)
        encoded = await asyncio.gather(*(self._ids(p) for p in req.prompts()))
        prompts = [truncate_prompt(ids, req, model) for ids in encoded]
        text = text_options(req)
        prompt_logprobs = 0 if req.echo and req.logprobs is not None else None
        return [
            GenerationInput(
                request_id if len(prompts) == 1 else f"{request_id}-{k}",
                ids,
                fit_context(sampling, len(ids), model, "prompt"),
                text,
                logprob_start_len=prompt_logprobs,
                hide_output=req.max_tokens == 0,
            )
            for k, ids in enumerate(prompts)
        ]

    async def native_inputs(self, req: GenerateRequest, request_id: str) -> list[GenerationInput]:
        """The generation of each prompt of a /generate request (one unless a batch was sent),
        with the request ids of `req.request_ids(request_id, ...)`. Raises InvalidRequest for a
        bad prompt, sampling parameters or rid."""
        model = self.model
        prompts = req.prompts()
        params = req.params_per_prompt(len(prompts))
        rids = req.request_ids(request_id, len(prompts))
        _check_prompts(prompts, model, "text", "input_ids")
        encoded = await asyncio.gather(*(self._ids(p) for p in prompts))
        return [
            self._native_input(req, rid, ids, p)
            for rid, ids, p in zip(rids, encoded, params, strict=True)
        ]

    def _native_input(
        self, req: GenerateRequest, request_id: str, ids: list[int], p: NativeSamplingParams
    ) -> GenerationInput:
        model = self.model
        sampling = replace(native_sampling(p, model), priority=req.priority)
        sampling = fit_context(sampling, len(ids), model, "input_ids")
        start = None
        if req.return_logprob:
            sampling = replace(sampling, logprobs=True, top_logprobs=req.top_logprobs_num)
            if req.logprob_start_len >= len(ids):
                raise InvalidRequest(
                    f"'logprob_start_len' {req.logprob_start_len} is not below the prompt's "
                    f"{len(ids)} tokens",
                    param="logprob_start_len",
                )
            start = req.logprob_start_len if req.logprob_start_len >= 0 else None
        return GenerationInput(
            request_id,
            ids,
            sampling,
            text_options(p),
            logprob_start_len=start,
            hide_output=p.max_new_tokens == 0,
        )

    async def tokenize(self, req: TokenizeRequest) -> list[list[int]]:
        """The ids of each prompt, or of the `messages` as the chat route renders them (one)."""
        model = self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequest("set exactly one of 'prompt' and 'messages'", param="prompt")
        if req.messages is not None:
            chat = req.chat_request()
            check_prompt_chars(chat_texts(chat), model, "messages")
            return [await self._chat_ids(chat)]
        for prompt in req.prompts():
            check_prompt_chars([prompt], model, "prompt")
        encodes = (self.tokenizer.encode(p, req.add_special_tokens) for p in req.prompts())
        return list(await asyncio.gather(*encodes))

    async def detokenize(self, req: DetokenizeRequest) -> list[str]:
        """The text of each sequence of ids. Ids must be in the vocabulary, and a sequence no
        longer than the longest prompt /tokenize takes (MAX_CHARS_PER_TOKEN × the context)."""
        model = self.check_model(req.model)
        batch = req.batch()
        longest = model.context_length * MAX_CHARS_PER_TOKEN
        for ids in batch:
            if any(i >= model.vocab_size for i in ids):
                raise InvalidRequest(
                    f"'tokens' must be token ids in [0, {model.vocab_size})", param="tokens"
                )
            if len(ids) > longest:
                raise InvalidRequest(
                    f"'tokens' holds {len(ids)} ids, more than the {longest} accepted",
                    param="tokens",
                )
        decodes = (self.tokenizer.decode(ids, req.skip_special_tokens) for ids in batch)
        return list(await asyncio.gather(*decodes))

    async def flush_cache(self) -> int:
        """Empties the prefix cache of every scheduler; returns the cached tokens freed. A
        scheduler with requests in flight refuses (Busy) and an unreachable one fails
        (Unavailable); the others are flushed all the same."""
        results = await asyncio.gather(
            *(s.flush_cache() for s in self.schedulers), return_exceptions=True
        )
        freed = 0
        for result in results:
            if isinstance(result, BaseException):
                raise result
            freed += result
        return freed

    async def scheduler_states(self) -> list[dict[str, Any]]:
        """Each scheduler's settings and load (`address` and `error` for one unreachable)."""

        async def state(scheduler: SchedulerClient) -> dict[str, Any]:
            try:
                return await scheduler.state()
            except GatewayError as exc:
                return {"address": scheduler.address, "error": exc.message}

        return list(await asyncio.gather(*(state(s) for s in self.schedulers)))

    async def prompt_texts(
        self, req: CompletionRequest, inputs: list[GenerationInput]
    ) -> list[str]:
        """The prompts as text, for echo: as sent, or decoded from their token bytes (id prompts,
        and prompts `truncate_prompt_tokens` may have cut)."""
        texts = []
        for prompt, inp in zip(req.prompts(), inputs, strict=True):
            if isinstance(prompt, str) and req.truncate_prompt_tokens is None:
                texts.append(prompt)
            else:
                ids = inp.input_ids
                pieces = await self.tokenizer.token_pieces(ids)
                texts.append(b"".join(pieces[i].raw for i in ids).decode(errors="replace"))
        return texts

    async def prompt_pieces(self, ids: list[int]) -> list[str]:
        """The text of each token of `ids`, shown alone (logprobs' `tokens`)."""
        pieces = await self.tokenizer.token_pieces(ids)
        return [pieces[i].text for i in ids]

    async def _ids(self, prompt: str | list[int]) -> list[int]:
        return prompt if isinstance(prompt, list) else await self.tokenizer.encode(prompt)

    async def _chat_ids(self, req: ChatCompletionRequest) -> list[int]:
        """The rendered conversation's ids; a role the template does not render is a 400 whose
        `param` is that message's role."""
        try:
            return await self.tokenizer.apply_chat_template(req)
        except InvalidRequest as exc:
            found = ROLE_NOT_RENDERED.search(exc.message)
            if found is not None and exc.param is None:
                exc.param = f"messages[{found.group(1)}].role"
            raise

    async def _check_schedulers(self) -> None:
        results = await asyncio.gather(
            *(s.check() for s in self.schedulers), return_exceptions=True
        )
        if all(isinstance(r, BaseException) for r in results):
            reasons = "; ".join(str(r) for r in results)
            raise Unavailable(f"no scheduler is serving: {reasons}")

    async def _become_ready(self) -> None:
        """Retries the start-up steps until they all pass (a background task)."""
        while True:
            try:
                await self._startup_step()
            except Exception as exc:
                self._set_startup_reason(exc)
                await asyncio.sleep(STARTUP_RETRY_S)
                continue
            log.info("ready: serving %s", self.model.name)
            return

    def _set_startup_reason(self, exc: Exception) -> None:
        if isinstance(exc, GatewayError):
            reason = exc.message
        else:
            log.error("start-up step failed", exc_info=exc)
            reason = f"{type(exc).__name__}: {exc}"
        if reason != self._startup_reason:
            log.info("not ready: %s", reason)
        self._startup_reason = reason

    async def _startup_step(self) -> None:
        await self.router.refresh()
        scheduler = self.router.pick(0)
        await scheduler.check()
        self._model = await scheduler.model_info(self.cfg.served_model_name)
        self.metrics.bind(self._model.name)
        await self.tokenizer.check()
        self._startup_reason = "warming up"
        await self.health_generate()
        self._warmed_up = True


def chat_tools_sampling(
    req: ChatCompletionRequest,
    model: ModelInfo,
    tool_call_parser: str | None,
    reasoning_parser: str | None = None,
) -> tuple[SamplingParams, ToolPlan | None]:
    """A chat request's sampling with its tools' constraint, and how its tools are used.
    `tool_call_parser` None picks the format from the model family. With a reasoning parser, a
    constraint applies after the think section only."""
    sampling, plan = _with_tools(req, model, tool_call_parser)
    if reasoning_parser is not None and sampling.grammar is not None:
        sampling = replace(sampling, grammar=after_reasoning(sampling.grammar, reasoning_parser))
    return sampling, plan


def _with_tools(
    req: ChatCompletionRequest, model: ModelInfo, tool_call_parser: str | None
) -> tuple[SamplingParams, ToolPlan | None]:
    sampling = chat_sampling(req, model)
    functions = [t["function"] for t in req.tool_dicts()]
    choice, param = req.effective_tool_choice()
    parser = tool_call_parser or default_tool_parser(model.architecture, model.name)
    plan = plan_tools(functions, choice, req.parallel_tool_calls, parser, param)
    grammar = plan.grammar() if plan is not None else None
    if grammar is None:
        return sampling, plan
    if sampling.grammar is not None:
        raise InvalidRequest(
            f"'{sampling.grammar_param}' cannot be combined with {param} {choice!r}",
            param=sampling.grammar_param,
        )
    return replace(sampling, grammar=grammar, grammar_param="tools"), plan


def _check_prompts(
    prompts: list[str] | list[list[int]], model: ModelInfo, text_param: str, ids_param: str
) -> None:
    """Checks each prompt, text (as `text_param`) or token ids (as `ids_param`), against the
    model's limits; raises InvalidRequest naming the parameter."""
    for prompt in prompts:
        if isinstance(prompt, str):
            check_prompt_chars([prompt], model, text_param)
        else:
            check_token_ids(prompt, model, ids_param)
