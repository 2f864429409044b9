"""--chat-template names, the built-in tool_chat template, the tools fallback, chat_template_kwargs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from radixserve.v1 import tokenizer_pb2 as pb
from services.tokenizer import convert
from services.tokenizer.chat import ChatMessage, ChatRequest
from services.tokenizer.chat_templates import TOOL_CHAT, read_chat_template
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.errors import InvalidRequest
from services.tokenizer.tokenizer import Tokenizer

PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "City name, e.g. Paris"}},
    "required": ["city"],
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather", "parameters": PARAMETERS},
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
AGENT_LOOP = (
    ChatMessage("user", "Weather in Paris and Rome?"),
    ChatMessage("assistant", "", tool_calls=(CALL, {**CALL, "id": "call_2"})),
    ChatMessage("tool", '{"temp_c": 21}', tool_call_id="call_1"),
    ChatMessage("tool", '{"temp_c": 25}', tool_call_id="call_2"),
)
USER = (ChatMessage("user", "hi"),)


@pytest.fixture
def fresh(tokenizer: Tokenizer) -> Tokenizer:
    """The default model's tokenizer with nothing decided or logged yet about its template."""
    return Tokenizer(tokenizer.hf, Path(tokenizer.info.model_path))


def with_template(tokenizer: Tokenizer, name_or_path: str) -> Tokenizer:
    """What --chat-template NAME_OR_PATH loads, over the already loaded tokenizer."""
    model_dir = Path(tokenizer.info.model_path)
    return Tokenizer(tokenizer.hf, model_dir, read_chat_template(name_or_path))


def render(tok: Tokenizer, messages: tuple[ChatMessage, ...], **fields: object) -> str:
    return tok.apply_chat_template(ChatRequest(messages, **fields)).text  # type: ignore[arg-type]


def test_config_takes_a_file_or_a_builtin_name(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}")
    assert TokenizerConfig(chat_template=TOOL_CHAT).chat_template == TOOL_CHAT
    assert TokenizerConfig(chat_template=str(path)).chat_template == str(path)
    with pytest.raises(ValueError, match="not a file or a built-in template \\(tool_chat\\)"):
        TokenizerConfig(chat_template="no_such_template")


def test_builtin_name_loads_tool_chat(default_model_dir: Path) -> None:
    tok = Tokenizer.load(str(default_model_dir), TOOL_CHAT)
    assert render(tok, USER) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in render(tok, USER, tools=(WEATHER,))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tool_chat_without_tools_is_chatml(
    tokenizer: Tokenizer, add_generation_prompt: bool
) -> None:
    messages = (
        ChatMessage("system", "You are terse."),
        ChatMessage("user", "Name a colour. 🎨"),
        ChatMessage("assistant", "Blue."),
        ChatMessage("user", "Another?"),
    )
    chatml = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    chatml += "<|im_start|>assistant\n" if add_generation_prompt else ""
    tok = with_template(tokenizer, TOOL_CHAT)
    assert render(tok, messages, add_generation_prompt=add_generation_prompt) == chatml


def test_tool_chat_puts_the_system_message_before_the_tools(tokenizer: Tokenizer) -> None:
    messages = (ChatMessage("system", "You are terse."), *USER)
    text = render(with_template(tokenizer, TOOL_CHAT), messages, tools=(WEATHER,))
    assert text.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n\n")
    assert text.count("<|im_start|>system") == 1
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_default_template_falls_back_to_tool_chat_with_tools(
    fresh: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="radixserve.tokenizer"):
        text = render(fresh, USER, tools=(WEATHER,))
        assert render(fresh, USER, tools=(WEATHER,)) == text
    assert text.startswith("<|im_start|>system\n# Tools\n\n")
    assert '"name": "get_weather"' in text and json.dumps(PARAMETERS) in text
    assert (
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ) in text
    (record,) = [r for r in caplog.records if "ignores `tools`" in r.getMessage()]
    assert record.levelno == logging.INFO and TOOL_CHAT in record.getMessage()


def test_no_fallback_without_tools(fresh: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="radixserve.tokenizer"):
        text = render(fresh, USER)
    assert text == fresh.hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "SmolLM" in text and "<tools>" not in text
    assert not [r for r in caplog.records if "ignores `tools`" in r.getMessage()]


def test_agent_loop_renders_tool_calls_and_responses(tokenizer: Tokenizer) -> None:
    text = render(tokenizer, AGENT_LOOP, tools=(WEATHER,))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert text.endswith(
        f"<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        f"<|im_start|>assistant\n{call}\n{call}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n"
        '{"temp_c": 21}\n</tool_response>\n<tool_response>\n{"temp_c": 25}\n</tool_response>'
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tool_call_arguments_as_an_object_and_content_before_calls(tokenizer: Tokenizer) -> None:
    call = {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
    messages = (*USER, ChatMessage("assistant", "Let me check.", tool_calls=(call,)))
    text = render(with_template(tokenizer, TOOL_CHAT), messages, add_generation_prompt=False)
    assert text.endswith(
        '<|im_start|>assistant\nLet me check.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
    )


def test_a_template_that_uses_tools_is_left_alone(tokenizer: Tokenizer) -> None:
    uses_tools = (
        "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    )
    tok = Tokenizer(tokenizer.hf, Path(tokenizer.info.model_path), uses_tools)
    assert render(tok, USER, tools=(WEATHER,)) == "[get_weather]<user>hi"
    # A per-request template is used as sent, even one that ignores tools.
    ignores = "{% for m in messages %}<{{ m.role }}>{% endfor %}"
    assert render(tokenizer, USER, tools=(WEATHER,), chat_template=ignores) == "<user>"


def test_chat_template_kwargs_reach_the_template(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "kwargs.jinja"
    path.write_text(
        "{{ greeting }}, {{ messages[0].content }}"
        "{% if enable_thinking is defined and not enable_thinking %} /no_think{% endif %}"
    )
    tok = with_template(tokenizer, str(path))
    kwargs = {"greeting": "Hello", "enable_thinking": False}
    request = pb.ApplyChatTemplateRequest(
        messages=[pb.ChatMessage(role="user", content="hi")],
        chat_template_kwargs_json=json.dumps(kwargs),
    )
    prompt = tok.apply_chat_template(convert.chat_request_from_pb(request))
    assert prompt.text == "Hello, hi /no_think"


@pytest.mark.parametrize(
    "name",
    [
        "messages",
        "tools",
        "add_generation_prompt",
        "documents",
        "bos_token",
        "tokenize",
        "raise_exception",
        "namespace",
    ],
)
def test_reserved_kwargs_are_refused(tokenizer: Tokenizer, name: str) -> None:
    with pytest.raises(InvalidRequest, match=f"chat_template_kwargs may not set '{name}'"):
        render(tokenizer, USER, chat_template_kwargs={"fine": 1, name: "x"})


@pytest.mark.parametrize(
    ("text", "error"),
    [("[1]", "must be a JSON object"), ("{", "chat_template_kwargs_json is not valid JSON")],
)
def test_malformed_kwargs_are_refused(text: str, error: str) -> None:
    request = pb.ApplyChatTemplateRequest(
        messages=[pb.ChatMessage(role="user", content="hi")], chat_template_kwargs_json=text
    )
    with pytest.raises(InvalidRequest, match=error):
        convert.chat_request_from_pb(request)
