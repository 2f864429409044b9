"""What the gateway asks of a generation, as typed values, built from the validated requests.

Defaults are OpenAI's (temperature 1, top_p 1, no penalties); the scheduler gets every field
set explicitly. Checks that need the model (vocabulary, context length, logprob limits) are here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from services.common.grammar import GrammarSpec
from services.gateway.errors import ContextLengthExceeded, InvalidRequest
from services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NativeSamplingParams,
    SamplingFields,
)
from services.gateway.structured import native_grammar, request_grammar

SEED_MASK = 2**64 - 1
# Longest prompt text per token of the context, checked before tokenizing. Tokens of real
# vocabularies are far shorter; this only stops megabytes of text from reaching the tokenizer.
MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class ModelInfo:
    """The served model and the limits a request must respect (from the scheduler)."""

    name: str
    context_length: int
    vocab_size: int
    max_top_logprobs: int
    num_kv_slots: int
    architecture: str = ""  # config.json's architectures[0], e.g. "LlamaForCausalLM"
    model_path: str = ""  # where the scheduler's executor loaded the weights from

    @property
    def max_sequence(self) -> int:
        """Longest prompt + output one sample may have."""
        return min(self.context_length, self.num_kv_slots)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a random seed per sample; in [0, 2**64)
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    max_tokens: int | None = None  # None: whatever the context leaves after the prompt
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    grammar: GrammarSpec | None = None  # the output must follow it (structured outputs)
    grammar_param: str | None = None  # the request field the grammar came from, for errors
    priority: int = 0  # admission order under --schedule-policy priority (lower first)


@dataclass(frozen=True)
class TextOptions:
    """How output ids become text."""

    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False  # the matched stop string or regex text is kept
    skip_special_tokens: bool = True
    stop_regex: tuple[str, ...] = ()  # Python regular expressions that end a sample


def text_options(req: SamplingFields | NativeSamplingParams) -> TextOptions:
    """How a request's output ids become text (/generate never keeps the stop unless asked)."""
    if isinstance(req, NativeSamplingParams):
        keep = req.no_stop_trim
    else:
        keep = req.keep_stop
    return TextOptions(req.stop_strings(), keep, req.skip_special_tokens, req.stop_regexes())


@dataclass(frozen=True)
class GenerationInput:
    """One tokenized prompt and how to continue it; max_tokens already fits the context."""

    request_id: str
    input_ids: list[int]
    sampling: SamplingParams
    text: TextOptions
    # Prompt logprobs from this position on (None: none; see the scheduler's logprob_start_len).
    logprob_start_len: int | None = None
    # Generate one token the client does not see (echo with max_tokens 0: the prompt alone).
    hide_output: bool = False


def chat_sampling(req: ChatCompletionRequest, model: ModelInfo) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    max_tokens = req.max_completion_tokens or req.max_tokens
    top = req.top_logprobs or 0
    return _sampling(req, model, max_tokens, req.logprobs, top, "top_logprobs")


def completion_sampling(req: CompletionRequest, model: ModelInfo) -> SamplingParams:
    wants = req.logprobs is not None
    if req.echo and wants and req.stream:
        raise InvalidRequest(
            "'echo' with 'logprobs' (prompt logprobs) is answered unstreamed; set 'stream' false",
            param="stream",
        )
    if req.echo and wants and req.n != 1:
        raise InvalidRequest("'echo' with 'logprobs' needs 'n' 1", param="n")
    max_tokens = req.max_tokens
    if max_tokens == 0:
        if not req.echo:
            raise InvalidRequest(
                "'max_tokens' 0 needs 'echo' (the prompt alone)", param="max_tokens"
            )
        max_tokens = 1  # one token is computed and not returned
    return _sampling(req, model, max_tokens, wants, req.logprobs or 0, "logprobs")


def native_sampling(p: NativeSamplingParams, model: ModelInfo) -> SamplingParams:
    params = SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=max(p.top_k, 0),
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        seed=None if p.seed is None else p.seed & SEED_MASK,
        max_tokens=max(p.max_new_tokens, 1),  # 0: one token computed and not returned
        min_tokens=p.min_new_tokens,
        stop_token_ids=tuple(p.stop_token_ids or ()),
        ignore_eos=p.ignore_eos,
        n=p.n,
    )
    _check_ids(params, model, "sampling_params")
    return _with_grammar(params, native_grammar(p))


def check_prompt_chars(texts: Iterable[str], model: ModelInfo, what: str) -> None:
    """Refuses prompt text that cannot fit the context whatever the tokenizer makes of it: more
    than MAX_CHARS_PER_TOKEN characters per token of the context. Runs before tokenizing, so a
    huge prompt costs no tokenizer time."""
    limit = model.context_length * MAX_CHARS_PER_TOKEN
    chars = sum(len(text) for text in texts)
    if chars > limit:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {model.context_length} tokens. However, "
            f"your {what} is {chars} characters long, more than the {limit} characters "
            f"({MAX_CHARS_PER_TOKEN} per token) that context can hold. "
            f"Please reduce the length of the {what}.",
            param=what,
        )


def chat_texts(req: ChatCompletionRequest) -> Iterator[str]:
    """The text of every message (names, strings and text parts)."""
    for message in req.messages:
        if message.name is not None:
            yield message.name
        if isinstance(message.content, str):
            yield message.content
        elif message.content is not None:
            yield from (part.text for part in message.content if part.text is not None)


def fit_context(
    params: SamplingParams, prompt_len: int, model: ModelInfo, what: str
) -> SamplingParams:
    """Resolves max_tokens against the context; `what` names the prompt ("messages", "prompt")."""
    limit = model.max_sequence
    if params.max_tokens is None:
        if prompt_len >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{what} resulted in {prompt_len} tokens. Please reduce the length of the {what}.",
                param=what,
            )
        return replace(params, max_tokens=limit - prompt_len)
    total = prompt_len + params.max_tokens
    if total > limit:
        # OpenAI's wording (vLLM's too, on every route), which clients match on.
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{total} tokens ({prompt_len} in the messages, {params.max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            param=what,
        )
    return params


def truncate_prompt(ids: list[int], req: SamplingFields, model: ModelInfo) -> list[int]:
    """vLLM's `truncate_prompt_tokens`: the last K ids of the prompt (the first K with
    `truncation_side` "right"); -1 keeps as many as the context holds."""
    keep = req.truncate_prompt_tokens
    if keep is None:
        return ids
    if keep == -1:
        keep = model.context_length
    if keep > model.context_length:
        raise InvalidRequest(
            f"truncate_prompt_tokens value ({keep}) is greater than the model's maximum context "
            f"length ({model.context_length}). Please select a smaller truncation size.",
            param="truncate_prompt_tokens",
        )
    if len(ids) <= keep:
        return ids
    return ids[:keep] if req.truncation_side == "right" else ids[-keep:]


def _sampling(
    req: SamplingFields,
    model: ModelInfo,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    logprobs_param: str,
) -> SamplingParams:
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("'stream_options' needs 'stream' set to true", param="stream_options")
    if top_logprobs > model.max_top_logprobs:
        limit = model.max_top_logprobs
        raise InvalidRequest(f"'{logprobs_param}' must be at most {limit}", param=logprobs_param)
    params = SamplingParams(
        temperature=_or(req.temperature, 1.0),
        top_p=_or(req.top_p, 1.0),
        top_k=max(req.top_k or 0, 0),
        min_p=_or(req.min_p, 0.0),
        presence_penalty=_or(req.presence_penalty, 0.0),
        frequency_penalty=_or(req.frequency_penalty, 0.0),
        repetition_penalty=_or(req.repetition_penalty, 1.0),
        seed=None if req.seed is None else req.seed & SEED_MASK,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        n=req.n,
        priority=req.priority,
    )
    _check_ids(params, model, None)
    return _with_grammar(params, request_grammar(req))


def _with_grammar(params: SamplingParams, found: tuple[GrammarSpec, str] | None) -> SamplingParams:
    if found is None:
        return params
    return replace(params, grammar=found[0], grammar_param=found[1])


def check_token_ids(ids: Iterable[int], model: ModelInfo, param: str) -> None:
    """InvalidRequest naming the first id past the vocabulary (and `param`)."""
    vocab = model.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequest(
            f"invalid '{param}': token id {bad} is out of vocabulary (vocab size {vocab})",
            param=param,
        )


def _check_ids(params: SamplingParams, model: ModelInfo, prefix: str | None) -> None:
    check_token_ids(params.logit_bias, model, "logit_bias")
    name = f"{prefix}.stop_token_ids" if prefix else "stop_token_ids"
    check_token_ids(params.stop_token_ids, model, name)
    if params.max_tokens is not None and params.min_tokens > params.max_tokens:
        name = f"{prefix}.min_new_tokens" if prefix else "min_tokens"
        raise InvalidRequest("the minimum tokens exceed the maximum tokens", param=name)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
