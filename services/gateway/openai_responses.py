"""OpenAI's Responses API on the chat path: `POST /v1/responses`, `GET /v1/responses/{id}`.

A request becomes a chat completion: `instructions` a system message, then the conversation of
`previous_response_id` (its inputs and its output, without its instructions, as OpenAI keeps
them), then `input` (a string: one user message; or a list of message items whose content is a
string or `input_text` / `output_text` parts). `max_output_tokens`, `temperature`, `top_p` and
`text.format` (text, json_object, json_schema) map onto the chat fields. The answer is one
`message` output item with one `output_text` part; `status` is `completed`, or `incomplete` with
`incomplete_details.reason` `max_output_tokens` when the length limit ended it. Streamed, it is
OpenAI's event sequence (response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta …, response.output_text.done,
response.content_part.done, response.output_item.done, then response.completed or
response.incomplete), each event with its `type` and a `sequence_number`.

Responses are kept (unless `store` is false) in memory, the `--max-stored-responses` most recent,
for `GET /v1/responses/{id}` and for `previous_response_id`; a continued conversation's prompt
starts with the earlier turns' tokens, so it is served from the engine's prefix cache.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from services.gateway.chat_tools import Answer, ToolPlan, merge_call_entries
from services.gateway.errors import InvalidRequest, NotFound
from services.gateway.events import Output, Usage
from services.gateway.fields import FieldTable, Rule, rejected
from services.gateway.limits import MaxTokens, Temperature, TopP
from services.gateway.protocol import ChatCompletionRequest, NonEmptyText
from services.gateway.responses import Choice, _merge_delta

ROLES = ("user", "system", "developer", "assistant")


class InputPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(BaseModel):
    """A message item of `input` (`type` may be left out)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    """An earlier answer's call, sent back as input."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    """The result of a call, for the model to read."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function_call_output"]
    call_id: str
    output: str


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    name: NonEmptyText
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class NamedFunction(BaseModel):
    type: Literal["function"]
    name: NonEmptyText


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None
    description: str | None = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """The fields of POST /v1/responses that change the answer (the others: RESPONSES)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    model: str | None = None
    input: NonEmptyText | list[InputMessage | FunctionCallItem | FunctionCallOutputItem] = Field(
        min_length=1
    )
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: StrictBool = False
    previous_response_id: str | None = None
    store: StrictBool = True
    metadata: dict[str, str] | None = None
    text: TextOptions | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: StrictBool | None = None


RESPONSES = FieldTable(
    "/v1/responses",
    honoured={
        "model": Rule("must name the served model"),
        "input": Rule("a string, or message items (roles user, system, developer, assistant)"),
        "instructions": Rule("a system message before the conversation; not carried over"),
        "max_output_tokens": Rule("most tokens generated"),
        "temperature": Rule("sampling temperature"),
        "top_p": Rule("nucleus sampling"),
        "stream": Rule("OpenAI's streaming events"),
        "previous_response_id": Rule("continue a stored response's conversation"),
        "store": Rule("keep the response for GET and previous_response_id (default true)"),
        "metadata": Rule("returned as sent"),
        "text": Rule("`format`: text, json_object, or json_schema (structured outputs)"),
        "tools": Rule("function tools; calls come back as function_call output items"),
        "tool_choice": Rule("auto, none, required, or a named function"),
        "parallel_tool_calls": Rule("more than one call per answer (default true)"),
    },
    no_effect={
        "user": Rule("end-user id for abuse monitoring; nothing is monitored here"),
        "service_tier": Rule("one tier here"),
        "truncation": Rule("never truncated: an over-long conversation is a 400"),
    },
    rejected={
        "reasoning": rejected("reasoning options are not offered"),
        "include": rejected("no extra output data is offered", lambda v, o: not v),
        "background": rejected(
            "background responses are not offered", lambda v, o: v in (None, False)
        ),
        "top_logprobs": rejected("logprobs: use /v1/chat/completions", lambda v, o: v in (None, 0)),
        "prompt": rejected("prompt templates are not offered"),
        "conversation": rejected("conversation objects are not offered; use previous_response_id"),
        "max_tool_calls": rejected("a bound on calls is not offered; only null is accepted"),
    },
)


@dataclass
class Stored:
    """A kept response: its object, and the conversation it ended (without instructions)."""

    body: dict[str, Any]
    messages: list[dict[str, Any]]


class ResponseStore:
    """The `capacity` most recently stored responses, by id."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, response_id: str, stored: Stored) -> None:
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> Stored:
        """The stored response; NotFound (404, naming `param`) when it is unknown or dropped."""
        stored = self._items.get(response_id)
        if stored is None:
            raise NotFound(f"Response with id '{response_id}' not found.", param=param)
        return stored


def chat_request(
    req: ResponsesRequest, store: ResponseStore
) -> tuple[ChatCompletionRequest, list[dict[str, Any]]]:
    """The chat completion that answers `req`, and its conversation without instructions."""
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        history = list(store.get(req.previous_response_id, "previous_response_id").messages)
    if isinstance(req.input, str):
        history.append({"role": "user", "content": req.input})
    else:
        history += input_messages(req.input)
    messages = list(history)
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    for ours, chat in (
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
    ):
        if getattr(req, ours) is not None:
            body[chat] = getattr(req, ours)
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in req.tools
        ]
    if isinstance(req.tool_choice, NamedFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None and req.tools:
        body["tool_choice"] = req.tool_choice
    if req.parallel_tool_calls is not None and req.tools:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise InvalidRequest(
                "'text.format.schema' is required for json_schema", param="text.format.schema"
            )
        spec = {"name": fmt.name or "response", "schema": fmt.schema_, "strict": bool(fmt.strict)}
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    try:
        return ChatCompletionRequest.model_validate(body), history
    except ValueError as exc:  # a field valid here but not as a chat field
        raise InvalidRequest(f"invalid request: {exc}") from None


def input_messages(
    items: list[InputMessage | FunctionCallItem | FunctionCallOutputItem],
) -> list[dict[str, Any]]:
    """Input items as chat messages: consecutive function calls become one assistant message
    with tool calls, each call's output a tool message."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return messages


@dataclass
class ResponsesFormat:
    """Renders one generation as a Response object, or as its stream of events (the `Format`
    protocol of services/gateway/responses.py); stores it when it ends. With tools (`plan`), the
    answer is split as on chat (services/gateway/chat_tools.py): its text is the message item,
    its calls `function_call` items after it (streamed: announced once the answer ended)."""

    response_id: str
    model: str
    req: ResponsesRequest
    history: list[dict[str, Any]]
    store: ResponseStore
    plan: ToolPlan | None = None
    created_at: int = field(default_factory=lambda: int(time.time()))
    _text: str = ""
    _reason: str | None = None
    _sequence: int = 0
    _opened: bool = False  # the message item was announced (streamed)
    _answer: Answer | None = None
    _calls: list[dict[str, Any]] = field(default_factory=list)  # streamed call deltas

    def __post_init__(self) -> None:
        if self.plan is not None:
            self._answer = Answer(self.plan, None)

    @property
    def _item_id(self) -> str:
        return "msg_" + self.response_id.removeprefix("resp_")

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _item(self, text: str | None, cut: bool = False) -> dict[str, Any]:
        """The message item: in progress (no text yet), completed, or incomplete when `cut` by
        the length limit (as OpenAI marks it)."""
        done = text is not None
        content = [_text_part(text)] if done else []
        status = ("incomplete" if cut else "completed") if done else "in_progress"
        return {
            "type": "message",
            "id": self._item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _body(
        self, status: str, output: list[dict[str, Any]], usage: Usage | None
    ) -> dict[str, Any]:
        req = self.req
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        text = req.text.model_dump(by_alias=True, exclude_none=True) if req.text else None
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        choice = req.tool_choice
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": req.store,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "text": text or {"format": {"type": "text"}},
            "tool_choice": choice.model_dump()
            if isinstance(choice, BaseModel)
            else choice or "auto",
            "tools": tools,
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "truncation": "disabled",
            "usage": _usage(usage) if usage is not None else None,
            "user": None,
            "metadata": req.metadata or {},
        }

    def _finished(
        self, text: str, calls: list[dict[str, Any]], reason: str | None, usage: Usage
    ) -> dict[str, Any]:
        status = "incomplete" if reason == "length" and not calls else "completed"
        output = [self._item(text, status == "incomplete")] if text or not calls else []
        output += [_call_item(c) for c in calls]
        body = self._body(status, output, usage)
        if self.req.store:
            answer: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                answer["tool_calls"] = calls
            self.store.put(self.response_id, Stored(body, [*self.history, answer]))
        return body

    # ---- the Format protocol ----

    def opening(self, usage: Usage) -> list[dict[str, Any]]:
        started = self._body("in_progress", [], None)
        return [
            self._event("response.created", response=started),
            self._event("response.in_progress", response=started),
        ]

    def _open_message(self) -> list[dict[str, Any]]:
        if self._opened:
            return []
        self._opened = True
        return [
            self._event("response.output_item.added", output_index=0, item=self._item(None)),
            self._event(
                "response.content_part.added",
                item_id=self._item_id,
                output_index=0,
                content_index=0,
                part=_text_part(""),
            ),
        ]

    def chunk(self, out: Output, usage: Usage) -> dict[str, Any] | list[dict[str, Any]] | None:
        if out.finish_reason is not None:
            self._reason = out.finish_reason
        text = out.text
        if self._answer is not None:
            fields = self._answer.feed(out.text)
            if out.finish_reason is not None:
                fields = _merge_delta(fields, self._answer.finish())
            self._calls = merge_call_entries([*self._calls, *fields.get("tool_calls", [])])
            text = fields.get("content") or ""
        if not text:
            return None
        self._text += text
        opened = self._open_message()
        delta = self._event(
            "response.output_text.delta",
            item_id=self._item_id,
            output_index=0,
            content_index=0,
            delta=text,
            logprobs=[],
        )
        return [*opened, delta]

    def closing(self, usage: Usage) -> list[dict[str, Any]]:
        calls = [
            {"id": c["id"], "type": "function", "function": dict(c["function"])}
            for c in self._calls
        ]
        body = self._finished(self._text, calls, self._reason, usage)
        events: list[dict[str, Any]] = []
        if self._text or not calls:
            where = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
            events += self._open_message()
            events += [
                self._event("response.output_text.done", **where, text=self._text, logprobs=[]),
                self._event("response.content_part.done", **where, part=_text_part(self._text)),
                self._event(
                    "response.output_item.done",
                    output_index=0,
                    item=self._item(self._text, body["status"] == "incomplete"),
                ),
            ]
        first = len(body["output"]) - len(calls)
        for k, call in enumerate(calls):
            item = _call_item(call)
            index = first + k
            events += [
                self._event("response.output_item.added", output_index=index, item=item),
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                ),
                self._event("response.output_item.done", output_index=index, item=item),
            ]
        last = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        return [*events, self._event(last, response=body)]

    def response(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        (choice,) = choices
        if self._answer is None:
            return self._finished(choice.text, [], choice.finish_reason, usage)
        message = self._answer.message(choice.text)
        text = message.get("content") or ""
        return self._finished(text, message.get("tool_calls", []), choice.finish_reason, usage)


def _call_item(call: dict[str, Any]) -> dict[str, Any]:
    """A `function_call` output item of a chat tool call."""
    return {
        "type": "function_call",
        "id": "fc_" + call["id"].removeprefix("call_"),
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
        "status": "completed",
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens,
    }
