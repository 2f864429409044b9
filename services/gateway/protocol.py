"""Request bodies of the HTTP API as pydantic models, and parsing them into 400s with `param`.

Shapes follow OpenAI's API; the SGLang / vLLM sampling extensions that clients send through
`extra_body` (top_k, min_p, repetition_penalty, min_tokens, stop_token_ids, ignore_eos, …) are
accepted at the top level. What every field does is listed in `fields.py`, which `parse_body`
applies to the raw object: rejected fields are refused there, unknown ones logged and ignored, as
vLLM does. Checks that need the model (context length, vocabulary) happen later, in `sampling.py`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from services.common.stop_regex import compile_stop_regex
from services.gateway.errors import InvalidRequest
from services.gateway.fields import FieldTable
from services.gateway.json_body import decode_object
from services.gateway.limits import (
    LOGIT_BIAS_KEY,
    BestOf,
    Bias,
    CompletionMaxTokens,
    LogprobStartLen,
    MaxTokens,
    MinP,
    MinTokens,
    N,
    NativeTemperature,
    Penalty,
    Priority,
    RepetitionPenalty,
    Seed,
    Temperature,
    TokenId,
    TopK,
    TopLogprobs,
    TopP,
    TruncatePromptTokens,
)

M = TypeVar("M", bound=BaseModel)
# Names pydantic puts in an error's location for the branch of a union that failed.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})
NonEmptyText = Annotated[str, Field(min_length=1)]
# A client's request id: echoed in answers and logs, so short and free of control characters.
RequestId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM: usage on every chunk (with include_usage)


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema` (OpenAI). The schema is always generated strictly:
    properties it does not list are not generated unless it allows additionalProperties."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | StrictBool | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`; `structural_tag` (vLLM / SGLang) carries xgrammar's
    structural tag in `format`."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | StrictBool | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: StrictBool | None = None
    structural_tag: str | dict[str, Any] | None = None


class SamplingFields(BaseModel):
    """Sampling and stopping fields shared by chat and completions."""

    model: str | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: N = 1
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: NonEmptyText | list[NonEmptyText] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None
    user: str | None = None
    # Extensions (SGLang / vLLM), sent by OpenAI clients through extra_body.
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    min_tokens: MinTokens = 0
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    priority: Priority = 0  # vLLM: lower first, with --schedule-policy priority
    # Structured outputs: at most one of them (see services/gateway/structured.py).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    regex: str | None = None  # SGLang's names on its OpenAI routes
    ebnf: str | None = None
    json_schema: dict[str, Any] | str | None = None
    # Stopping and prompts (SGLang: stop_regex, no_stop_trim; vLLM: the rest).
    stop_regex: NonEmptyText | list[NonEmptyText] | None = None
    no_stop_trim: StrictBool = False
    return_token_ids: StrictBool = False
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    truncation_side: Literal["left", "right"] | None = None

    @field_validator("stop_regex")
    @classmethod
    def _compiles(cls, value: str | list[str] | None) -> str | list[str] | None:
        check_stop_regexes(value)
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_some(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be -1 (the context length) or at least 1")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not re.fullmatch(LOGIT_BIAS_KEY, key):
                raise ValueError(f"keys must be token ids (ASCII decimal integers), got {key!r}")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return _strings(self.stop)

    def stop_regexes(self) -> tuple[str, ...]:
        return _strings(self.stop_regex)

    @property
    def keep_stop(self) -> bool:
        """The matched stop string or regex text stays in the output (vLLM's or SGLang's name)."""
        return self.include_stop_str_in_output or self.no_stop_trim


def _strings(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def check_stop_regexes(value: str | list[str] | None) -> None:
    """ValueError for a stop regex Python's `re` does not compile, or one that matches the empty
    string."""
    for pattern in _strings(value):
        compile_stop_regex(pattern)


class ContentPart(BaseModel):
    """One part of a message's content: text only (images and audio are refused by type)."""

    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"content part of type {value!r} is not supported (only 'text')")
        return value


# Roles whose messages OpenAI refuses without `content` (an assistant's may carry tool calls only).
CONTENT_REQUIRED_ROLES = frozenset({"system", "developer", "user", "tool"})


class ChatMessage(BaseModel):
    # OpenAI's roles, or any other the chat template renders (the tokenizer checks).
    role: NonEmptyText
    # Required (a string or parts, not null) for the CONTENT_REQUIRED_ROLES, as OpenAI requires it.
    content: str | list[ContentPart] | None = Field(None, validate_default=True)
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _required_for_role(
        cls, value: str | list[ContentPart] | None, info: ValidationInfo
    ) -> str | list[ContentPart] | None:
        role = info.data.get("role")  # absent when the role itself was invalid
        if value is None and role in CONTENT_REQUIRED_ROLES:
            raise ValueError(f"a {role} message needs content (a string or an array of parts)")
        return value


class FunctionDef(BaseModel):
    """A function the model may call (OpenAI `tools[i].function`, legacy `functions[i]`)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: StrictBool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    logprobs: StrictBool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[FunctionDef] | None = None  # legacy: mapped onto tools
    function_call: Literal["none", "auto"] | FunctionName | None = None  # legacy tool_choice
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    echo: StrictBool = False  # vLLM: a last assistant message is put before the answer

    def echo_text(self) -> str:
        """What `echo` puts before the answer: the last message, when it is the assistant's (the
        one `continue_final_message` continues), as the template sees it; else nothing."""
        last = self.messages[-1]
        if not self.echo or last.role != "assistant" or last.content is None:
            return ""
        if isinstance(last.content, str):
            return last.content
        return "\n".join(part.text or "" for part in last.content)

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as OpenAI `tools` entries (legacy `functions` become tools)."""
        tools = self.tools or [Tool(type="function", function=f) for f in self.functions or []]
        return [t.model_dump(exclude_none=True) for t in tools]

    def effective_tool_choice(self) -> tuple[str | dict[str, Any] | None, str]:
        """(tool_choice, the field it came from): legacy `function_call` maps onto it."""
        if self.tool_choice is not None or self.function_call is None:
            choice = self.tool_choice
            value = choice.model_dump() if isinstance(choice, BaseModel) else choice
            return value, "tool_choice"
        call = self.function_call
        return (call.model_dump() if isinstance(call, BaseModel) else call), "function_call"


PromptIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: NonEmptyText | PromptIds | list[NonEmptyText] | list[PromptIds]
    max_tokens: CompletionMaxTokens | None = 16
    logprobs: TopLogprobs | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: BestOf | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (a batch of one unless a list was sent)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class NativeSamplingParams(BaseModel):
    """`sampling_params` of /generate, with SGLang's names."""

    max_new_tokens: CompletionMaxTokens = 128  # SGLang: 0 computes the prompt alone
    min_new_tokens: MinTokens = 0
    temperature: NativeTemperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    min_p: MinP = 0.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    stop: NonEmptyText | list[NonEmptyText] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    seed: Seed | None = Field(None, alias="sampling_seed")
    n: N = 1
    stop_regex: NonEmptyText | list[NonEmptyText] | None = None
    no_stop_trim: StrictBool = False
    # Structured outputs (SGLang): at most one of them.
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | None = None
    structural_tag: str | None = None

    @field_validator("stop_regex")
    @classmethod
    def _compiles(cls, value: str | list[str] | None) -> str | list[str] | None:
        check_stop_regexes(value)
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return _strings(self.stop)

    def stop_regexes(self) -> tuple[str, ...]:
        return _strings(self.stop_regex)


class GenerateRequest(BaseModel):
    """The native /generate: a prompt as text or ids, or a batch of them as SGLang takes one
    (`text: [...]`, `input_ids: [[...], ...]`, with one `sampling_params` for all or a list of
    one per prompt, and `rid` a list of one id per prompt); answers with output ids and text."""

    text: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] | None = None
    input_ids: PromptIds | Annotated[list[PromptIds], Field(min_length=1)] | None = None
    sampling_params: (
        NativeSamplingParams | Annotated[list[NativeSamplingParams], Field(min_length=1)]
    ) = Field(default_factory=NativeSamplingParams)
    stream: StrictBool = False
    rid: RequestId | Annotated[list[RequestId], Field(min_length=1)] | None = None
    priority: Priority = 0  # SGLang: lower first, with --schedule-policy priority
    # SGLang's logprob options: output tokens' logprobs, and the prompt's from logprob_start_len.
    return_logprob: StrictBool = False
    logprob_start_len: LogprobStartLen = -1  # -1: no prompt logprobs
    top_logprobs_num: TopLogprobs = 0
    return_text_in_logprobs: StrictBool = False

    @property
    def batched(self) -> bool:
        """Whether the prompts came as a batch (a list of texts or of id lists)."""
        ids = self.input_ids
        return isinstance(self.text, list) or (bool(ids) and isinstance(ids[0], list))

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, a batch of one unless a batch was sent. Raises InvalidRequest unless
        exactly one of `text` and `input_ids` is set."""
        if (self.text is None) == (self.input_ids is None):
            raise InvalidRequest("set exactly one of 'text' and 'input_ids'", param="text")
        if self.text is not None:
            return self.text if isinstance(self.text, list) else [self.text]
        ids = self.input_ids or []
        return ids if self.batched else [ids]  # type: ignore[list-item,return-value]

    def params_per_prompt(self, count: int) -> list[NativeSamplingParams]:
        """`sampling_params` of each of `count` prompts: the one object for all, or the list's
        entry of each. A list must hold one entry per prompt of a batch, all with the same `n`
        (SGLang's rule); raises InvalidRequest otherwise."""
        p = self.sampling_params
        if not isinstance(p, list):
            return [p] * count
        if not self.batched or len(p) != count:
            raise InvalidRequest(
                f"'sampling_params' holds {len(p)} entries for "
                f"{count if self.batched else 'one prompt, not a batch'}"
                + (" prompts" if self.batched else "")
                + "; send one object for all prompts or one per prompt",
                param="sampling_params",
            )
        for i, entry in enumerate(p):
            if entry.n != p[0].n:
                raise InvalidRequest(
                    f"every prompt of a batch must ask for the same n: {entry.n} against {p[0].n}",
                    param=f"sampling_params[{i}].n",
                )
        return list(p)

    def request_ids(self, base: str, count: int) -> list[str]:
        """The request id of each of `count` prompts: `rid` (a list of distinct ids, one per
        prompt of a batch; one id for a single prompt), else `base`, or `base-k` in a batch.
        Raises InvalidRequest where `rid` does not fit the prompts."""
        rid = self.rid
        if not self.batched:
            if isinstance(rid, list):
                raise InvalidRequest("'rid' is a list but the prompt is not a batch", param="rid")
            return [base]
        if rid is None:
            return [f"{base}-{k}" for k in range(count)]
        if not isinstance(rid, list) or len(rid) != count:
            raise InvalidRequest(
                f"'rid' must be a list of one id per prompt of the batch ({count})", param="rid"
            )
        if len(set(rid)) != len(rid):
            raise InvalidRequest("'rid' names one id twice", param="rid")
        return list(rid)


class TokenizeRequest(BaseModel):
    """/tokenize (SGLang's and vLLM's): `prompt` (a text or a batch of texts) or chat `messages`,
    rendered as /v1/chat/completions renders them (the template writes the special tokens, so
    `add_special_tokens` applies to `prompt` only)."""

    model: str | None = None
    prompt: str | Annotated[list[str], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool = True
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None

    @property
    def batched(self) -> bool:
        return isinstance(self.prompt, list)

    def prompts(self) -> list[str]:
        """The prompt as a batch (of one unless a list was sent)."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt or [])

    def chat_request(self) -> ChatCompletionRequest:
        """The chat request whose prompt the `messages` are."""
        assert self.messages is not None
        return ChatCompletionRequest(
            messages=self.messages,
            tools=self.tools,
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
            chat_template_kwargs=self.chat_template_kwargs,
        )


class DetokenizeRequest(BaseModel):
    """/detokenize (SGLang's and vLLM's): token ids, or a batch of them, back to text."""

    model: str | None = None
    tokens: list[TokenId] | list[list[TokenId]]
    skip_special_tokens: StrictBool = True  # SGLang's default: BOS and the like are left out

    @property
    def batched(self) -> bool:
        return bool(self.tokens) and isinstance(self.tokens[0], list)

    def batch(self) -> list[list[int]]:
        """The ids as a batch (of one unless a list of lists was sent)."""
        return list(self.tokens) if self.batched else [self.tokens]  # type: ignore[arg-type,list-item]


def parse_body(model: type[M], body: bytes, fields: FieldTable | None = None) -> M:
    """Decodes and validates a JSON body, then checks it against `fields` (the endpoint's lists).

    Malformed, invalid or rejected input raises InvalidRequest.
    """
    data = decode_object(body)
    try:
        # Strict: JSON booleans and integers only, as OpenAI (no "4", 4.0 or "yes").
        parsed = model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise _invalid(exc) from None
    if fields is not None:
        fields.check(data)
    return parsed


def _invalid(exc: ValidationError) -> InvalidRequest:
    first = _best_error(exc.errors(include_url=False))
    param = param_name(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return InvalidRequest(f"'{param}' is a required property", param=param)
    return InvalidRequest(f"invalid '{param}': {message}", param=param)


def _best_error(errors: list[Any]) -> Any:
    """For a union, the error of the branch the input matched best: the deepest error, not a
    type mismatch; between branches tied so, the one that failed furthest along its list
    (`[[1], 2]` is a batch failing at [1]); within a branch, its first error."""

    def depth(e: Any) -> tuple[int, bool]:
        return len(e["loc"]), not e["type"].endswith("_type")

    deepest = max(depth(e) for e in errors)
    firsts: dict[tuple[Any, ...], Any] = {}
    for e in errors:
        if depth(e) == deepest:
            firsts.setdefault(tuple(p for p in e["loc"] if not isinstance(p, int)), e)
    return max(firsts.values(), key=lambda e: [p for p in e["loc"] if isinstance(p, int)])


def param_name(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'content', 'str') → 'messages[0].content': union branch tags (type names,
    model class names, literals) dropped."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part not in _TYPE_TAGS and not any(c in part for c in "[-") and not part[:1].isupper():
            name += f".{part}" if name else part
    return name
