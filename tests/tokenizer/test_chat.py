"""Chat templates, protobuf conversion and the service config, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radixserve.v1 import tokenizer_pb2 as pb
from services.tokenizer import convert
from services.tokenizer.chat import ChatMessage, ChatRequest
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.errors import InvalidRequest
from services.tokenizer.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour. 🎨"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
]


# A template that renders OpenAI's roles and silently drops any other.
OPENAI_ROLES_ONLY = (
    "{% for m in messages %}{% if m.role in ['system', 'user', 'assistant'] %}"
    "<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}"
)


def request_pb(messages: list[dict], **fields: object) -> pb.ApplyChatTemplateRequest:
    return pb.ApplyChatTemplateRequest(messages=[pb.ChatMessage(**m) for m in messages], **fields)


@pytest.mark.parametrize("add_generation_prompt", [None, True, False])
def test_ids_match_transformers(tokenizer: Tokenizer, add_generation_prompt: bool | None) -> None:
    fields = (
        {} if add_generation_prompt is None else {"add_generation_prompt": add_generation_prompt}
    )
    prompt = tokenizer.apply_chat_template(
        convert.chat_request_from_pb(request_pb(CONVERSATION, **fields))
    )
    expected = tokenizer.hf.apply_chat_template(
        CONVERSATION, tokenize=True, add_generation_prompt=add_generation_prompt is not False
    )["input_ids"]
    assert prompt.ids == expected
    assert prompt.text.endswith("<|im_start|>assistant\n") == (add_generation_prompt is not False)


def test_text_parts_are_joined(tokenizer: Tokenizer) -> None:
    parts = [pb.ContentPart(type="text", text="first"), pb.ContentPart(type="text", text="second")]
    request = pb.ApplyChatTemplateRequest(messages=[pb.ChatMessage(role="user", parts=parts)])
    prompt = tokenizer.apply_chat_template(convert.chat_request_from_pb(request))
    assert "<|im_start|>user\nfirst\nsecond<|im_end|>" in prompt.text


def test_template_override_and_continue_final_message(tokenizer: Tokenizer) -> None:
    template = "{% for m in messages %}[{{ m.role }}|{{ m.name }}]{{ m.content }}{% endfor %}"
    messages = [ChatMessage("user", "hi", name="ann"), ChatMessage("assistant", "Hel")]
    request = ChatRequest(tuple(messages), add_generation_prompt=False, continue_final_message=True)
    assert tokenizer.apply_chat_template(request).text.endswith("<|im_start|>assistant\nHel")
    prompt = tokenizer.apply_chat_template(ChatRequest(tuple(messages), chat_template=template))
    assert prompt.text == "[user|ann]hi[assistant|]Hel"
    assert prompt.ids == tokenizer.encode(prompt.text, add_special_tokens=False)


def test_tools_reach_the_template(tokenizer: Tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]
    template = "{{ tools[0].function.name }}|{{ messages[0].tool_calls[0].function.name }}|{{ messages[1].tool_call_id }}"
    request = request_pb(
        [
            {"role": "assistant", "tool_calls_json": json.dumps(calls)},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        ],
        tools_json=json.dumps(tools),
        chat_template=template,
    )
    assert (
        tokenizer.apply_chat_template(convert.chat_request_from_pb(request)).text
        == "get_weather|get_weather|c1"
    )


def test_template_file_replaces_the_models(default_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    tok = Tokenizer.load(str(default_model_dir), str(path))
    assert tok.apply_chat_template(ChatRequest((ChatMessage("user", "x"),))).text == "<user>x"


@pytest.mark.parametrize(
    ("messages", "fields", "error"),
    [
        ([], {}, "messages must not be empty"),
        ([{"role": "", "content": "x"}], {}, "empty role"),
        (
            [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}],
            {"chat_template": OPENAI_ROLES_ONLY},
            r"does not render role 'wizard' \(messages\[1\]\)",
        ),
        (
            [{"role": "wizard", "content": "x"}],
            {
                "chat_template": "{% for m in messages %}{{ raise_exception('bad role') }}{% endfor %}"
            },
            r"does not render role 'wizard' \(messages\[0\]\): .*bad role",
        ),
        (
            [{"role": "user", "content": "x"}],
            {"chat_template": "{% for %}"},
            "chat template failed",
        ),
        (
            [{"role": "user", "content": "x"}],
            {"chat_template": "{{ raise_exception('roles must alternate') }}"},
            "roles must alternate",
        ),
        ([{"role": "user", "content": "x"}], {"tools_json": "{"}, "tools_json is not valid JSON"),
        ([{"role": "user", "content": "x"}], {"tools_json": "{}"}, "JSON array of objects"),
        (
            [{"role": "user", "content": "x", "parts": [pb.ContentPart(type="text")]}],
            {},
            "both content and parts",
        ),
        (
            [{"role": "user", "parts": [pb.ContentPart(type="image_url")]}],
            {},
            "'image_url' is not supported",
        ),
        (
            [{"role": "user", "content": "x"}],
            {"continue_final_message": True},
            "add_generation_prompt",
        ),
        ([{"role": "user", "tool_calls_json": "[{}]"}], {}, "only assistant"),
    ],
)
def test_invalid_requests(
    tokenizer: Tokenizer, messages: list[dict], fields: dict, error: str
) -> None:
    with pytest.raises(InvalidRequest, match=error):
        tokenizer.apply_chat_template(convert.chat_request_from_pb(request_pb(messages, **fields)))


def test_a_role_beyond_openais_reaches_a_template_that_renders_it(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "ipython", "content": "42"},
        {"role": "assistant", "content": "The answer is"},
    ]
    request = convert.chat_request_from_pb(
        request_pb(messages, add_generation_prompt=False, continue_final_message=True)
    )
    prompt = tokenizer.apply_chat_template(request)
    # SmolLM2's ChatML template renders any role; the probe's markers never show.
    assert "<|im_start|>ipython\n42<|im_end|>" in prompt.text
    assert prompt.text.endswith("The answer is") and "probe" not in prompt.text
    plain = convert.chat_request_from_pb(
        request_pb(messages, chat_template=OPENAI_ROLES_ONLY, add_generation_prompt=False)
    )
    with pytest.raises(InvalidRequest, match="'ipython'"):
        tokenizer.apply_chat_template(plain)


def test_info(tokenizer: Tokenizer) -> None:
    info = convert.info_to_pb(tokenizer.info)
    assert info.vocab_size == 49152 and list(info.eos_token_ids) == [2] and info.bos_token_id == 1
    assert info.context_length == 8192 and info.has_chat_template
    assert pb.SpecialToken(id=2, text="<|im_end|>") in info.special_tokens


def test_config_validation(tmp_path: Path) -> None:
    assert TokenizerConfig().port == 30001
    with pytest.raises(ValueError, match="not a file"):
        TokenizerConfig(chat_template=str(tmp_path / "missing.jinja"))
