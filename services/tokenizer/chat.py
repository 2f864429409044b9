"""Chat requests as the tokenizer sees them: validated OpenAI messages for a Jinja chat template.

Roles beyond OpenAI's (system, developer, user, assistant, tool) go to the template as sent; a
template that does not render them refuses them (see `role_probe`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from services.tokenizer.errors import InvalidRequest

ROLES = ("system", "developer", "user", "assistant", "tool")
# Content that stands in for a message's own when checking that the template renders its role.
PROBE_MARKER = "radixserve-role-probe-{}-x"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str = ""
    name: str = ""
    tool_call_id: str = ""
    # The OpenAI `tool_calls` array of an assistant message, already parsed.
    tool_calls: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.role:
            raise InvalidRequest("a message has an empty role")
        if self.tool_calls and self.role != "assistant":
            raise InvalidRequest(f"tool_calls on a {self.role!r} message (only assistant messages)")

    def to_template(self) -> dict[str, Any]:
        """The dict a chat template reads as `message`; optional keys only when set."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name:
            message["name"] = self.name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = list(self.tool_calls)
        return message


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[ChatMessage, ...]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # A Jinja template overriding the service's one for this request.
    chat_template: str | None = None
    tools: tuple[dict[str, Any], ...] = ()
    # Extra template variables (OpenAI-compatible servers' `chat_template_kwargs`).
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.messages:
            raise InvalidRequest("messages must not be empty")
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequest("continue_final_message needs add_generation_prompt set to false")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise InvalidRequest("continue_final_message needs an assistant message last")


def role_probe(request: ChatRequest) -> tuple[ChatRequest, dict[int, str]] | None:
    """The request with the content of each message of a role beyond OpenAI's replaced by a
    marker, and the markers by message index; None when every role is one of OpenAI's. A
    template renders those roles when every marker comes out in the rendered text."""
    markers = {
        i: PROBE_MARKER.format(i) for i, m in enumerate(request.messages) if m.role not in ROLES
    }
    if not markers:
        return None
    messages = tuple(
        replace(m, content=markers[i]) if i in markers else m
        for i, m in enumerate(request.messages)
    )
    return replace(request, messages=messages), markers


def role_not_rendered(request: ChatRequest, index: int, why: str = "") -> InvalidRequest:
    role = request.messages[index].role
    reason = f": {why}" if why else ""
    return InvalidRequest(
        f"the chat template does not render role {role!r} (messages[{index}]){reason}"
    )


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat prompt."""

    text: str
    ids: list[int]


def join_text_parts(parts: list[tuple[str, str]]) -> str:
    """OpenAI content parts (type, text) as one string; only text parts are accepted."""
    for kind, _ in parts:
        if kind != "text":
            raise InvalidRequest(f"content part of type {kind!r} is not supported (only 'text')")
    return "\n".join(text for _, text in parts)


def check_template_kwargs(kwargs: Mapping[str, Any], reserved: Collection[str]) -> None:
    """Refuses `chat_template_kwargs` that would replace a variable the template already gets."""
    taken = sorted(name for name in kwargs if name in reserved)
    if taken:
        raise InvalidRequest(
            f"chat_template_kwargs may not set {taken[0]!r}: the chat template already gets it"
        )
