"""A table of hostile requests: each must get a 4xx with an OpenAI-shaped body, never a 5xx.

Shared by the in-process test (test_hostile.py) and the one through the real services
(test_hostile_e2e.py). Cases are data: the route, the raw body, and what the answer must say.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from services.gateway.limits import FLOAT32_MAX, INT32_MAX, MAX_N, MAX_TOP_LOGPROBS

CHAT, COMPLETIONS, GENERATE = "/v1/chat/completions", "/v1/completions", "/generate"
RESPONSES = "/v1/responses"
BASE = {
    CHAT: {"messages": [{"role": "user", "content": "hi"}]},
    COMPLETIONS: {"prompt": "hi"},
    GENERATE: {"text": "hi"},
    RESPONSES: {"input": "hi"},
}
SHORT = {CHAT: "chat", COMPLETIONS: "completions", GENERATE: "generate", RESPONSES: "responses"}
JSON = "application/json"
ANY = "*"  # any param


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: bytes
    status: int = 400
    param: str | None = ANY  # ANY: not checked
    code: str | None = ANY
    content_type: str = JSON
    method: str = "POST"


def dumps(obj: object) -> bytes:
    return json.dumps(obj).encode()  # ensure_ascii: "\ud800" travels as its escape


def with_fields(path: str, **fields: object) -> bytes:
    return dumps({**BASE[path], **fields})


def with_params(**params: object) -> bytes:
    return dumps({"text": "hi", "sampling_params": params})


def raw(path: str, fragment: str) -> bytes:
    """The route's base body with `"key": value` text spliced in (for what json.dumps cannot
    write: NaN, duplicate keys, numbers past float range)."""
    base = json.dumps(BASE[path])
    return f"{base[:-1]}, {fragment}}}".encode()


# Integer fields: (min, max). Every one takes JSON integers only.
OPENAI_INTS = {
    "n": (1, MAX_N),
    "max_tokens": (1, INT32_MAX),
    "seed": (-(2**63), 2**64 - 1),
    "top_k": (-1, INT32_MAX),
    "min_tokens": (0, INT32_MAX),
}
CHAT_INTS = {
    **OPENAI_INTS,
    "max_completion_tokens": (1, INT32_MAX),
    "top_logprobs": (0, MAX_TOP_LOGPROBS),
}
COMPLETION_INTS = {**OPENAI_INTS, "logprobs": (0, MAX_TOP_LOGPROBS), "best_of": (1, INT32_MAX)}
NATIVE_INTS = {
    "max_new_tokens": (0, INT32_MAX),
    "min_new_tokens": (0, INT32_MAX),
    "top_k": (-1, INT32_MAX),
    "n": (1, MAX_N),
    "sampling_seed": (-(2**63), 2**64 - 1),
}
OPENAI_FLOATS = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (0.0, 2.0),
}
NATIVE_FLOATS = {**OPENAI_FLOATS, "temperature": (0.0, FLOAT32_MAX)}
CHAT_BOOLS = [
    "stream",
    "logprobs",
    "ignore_eos",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "add_generation_prompt",
    "continue_final_message",
    "parallel_tool_calls",
]
COMPLETION_BOOLS = ["stream", "echo", "ignore_eos", "skip_special_tokens"]
NATIVE_BOOLS = ["ignore_eos", "skip_special_tokens"]


def int_values(lo: int, hi: int) -> Iterator[tuple[str, object]]:
    yield from [("str", "4"), ("float", 4.0), ("frac", 4.5), ("bool", True), ("list", [4])]
    yield from [("obj", {"v": 4}), ("below", lo - 1), ("above", hi + 1), ("huge", 10**30)]


def float_values(lo: float, hi: float) -> Iterator[tuple[str, object]]:
    yield from [("str", "0.5"), ("bool", True), ("list", [0.5]), ("below", lo - 1)]
    yield from [("above", hi * 2 if hi > 1e30 else hi + 1e300), ("neg-huge", -1e300)]


def bool_values() -> Iterator[tuple[str, object]]:
    yield from [("str", "yes"), ("str-true", "true"), ("int", 1), ("zero", 0), ("list", [])]


def typed_cases() -> Iterator[Case]:
    """Wrong types, and values past the range, for every numeric and boolean field."""
    for path, ints, floats, bools in [
        (CHAT, CHAT_INTS, OPENAI_FLOATS, CHAT_BOOLS),
        (COMPLETIONS, COMPLETION_INTS, OPENAI_FLOATS, COMPLETION_BOOLS),
    ]:
        short = SHORT[path]
        for name, (lo, hi) in ints.items():
            for tag, value in int_values(lo, hi):
                yield Case(
                    f"{short}-{name}-{tag}", path, with_fields(path, **{name: value}), 400, name
                )
        for name, (lo, hi) in floats.items():
            for tag, value in float_values(lo, hi):
                yield Case(
                    f"{short}-{name}-{tag}", path, with_fields(path, **{name: value}), 400, name
                )
        for name in bools:
            for tag, value in bool_values():
                yield Case(
                    f"{short}-{name}-{tag}", path, with_fields(path, **{name: value}), 400, name
                )
    for name, (lo, hi) in NATIVE_INTS.items():
        for tag, value in int_values(lo, hi):
            param = f"sampling_params.{name}"
            yield Case(f"generate-{name}-{tag}", GENERATE, with_params(**{name: value}), 400, param)
    for name, (lo, hi) in NATIVE_FLOATS.items():
        for tag, value in float_values(lo, hi):
            param = f"sampling_params.{name}"
            yield Case(f"generate-{name}-{tag}", GENERATE, with_params(**{name: value}), 400, param)
    for name in NATIVE_BOOLS:
        for tag, value in bool_values():
            param = f"sampling_params.{name}"
            yield Case(f"generate-{name}-{tag}", GENERATE, with_params(**{name: value}), 400, param)
    for tag, value in bool_values():
        yield Case(
            f"generate-stream-{tag}", GENERATE, with_fields(GENERATE, stream=value), 400, "stream"
        )


def token_id_cases() -> Iterator[Case]:
    """Token ids past int32, negative, or of the wrong type, wherever ids are taken."""
    for tag, value in [("2^31", 2**31), ("2^32", 2**32), ("2^64", 2**64), ("neg", -1)]:
        yield Case(f"prompt-id-{tag}", COMPLETIONS, dumps({"prompt": [1, value]}), 400, ANY)
        yield Case(f"prompt-batch-id-{tag}", COMPLETIONS, dumps({"prompt": [[1], [value]]}))
        yield Case(f"input-ids-{tag}", GENERATE, dumps({"input_ids": [value]}), 400, "input_ids[0]")
        yield Case(f"stop-token-id-{tag}", CHAT, with_fields(CHAT, stop_token_ids=[value]))
        yield Case(f"native-stop-token-id-{tag}", GENERATE, with_params(stop_token_ids=[value]))
    for tag, value in [("str", "1"), ("float", 1.0), ("bool", True), ("null", None)]:
        yield Case(f"prompt-id-{tag}", COMPLETIONS, dumps({"prompt": [1, value]}))
        yield Case(f"input-ids-{tag}", GENERATE, dumps({"input_ids": [value]}), 400, "input_ids[0]")
    yield Case("input-ids-empty", GENERATE, dumps({"input_ids": []}), 400, "input_ids")
    # a batch (SGLang's list of id lists) with an empty, a non-list or a bad entry
    yield Case(
        "input-ids-batch-empty-entry",
        GENERATE,
        dumps({"input_ids": [[1], []]}),
        400,
        "input_ids[1]",
    )
    yield Case(
        "input-ids-batch-mixed", GENERATE, dumps({"input_ids": [[1], 2]}), 400, "input_ids[1]"
    )
    yield Case(
        "input-ids-batch-neg", GENERATE, dumps({"input_ids": [[1], [-1]]}), 400, "input_ids[1][0]"
    )
    yield Case("prompt-ids-too-long", COMPLETIONS, dumps({"prompt": [1] * 5000}), 400, "prompt")
    yield Case("input-ids-too-long", GENERATE, dumps({"input_ids": [1] * 5000}), 400, "input_ids")


def logit_bias_cases() -> Iterator[Case]:
    keys = ["²", "١", "１", " 1", "1 ", "1.0", "+1", "0x1", "1e3", "", "abc", "99999999999"]
    for i, key in enumerate(keys):
        yield Case(
            f"logit-bias-key-{i}", CHAT, with_fields(CHAT, logit_bias={key: 1}), 400, "logit_bias"
        )
    yield Case(
        "logit-bias-key-neg", CHAT, with_fields(CHAT, logit_bias={"-1": 1}), 400, "logit_bias"
    )
    yield Case(
        "logit-bias-key-vocab", COMPLETIONS, with_fields(COMPLETIONS, logit_bias={"2147483648": 1})
    )
    for tag, value in [
        ("str", "1"),
        ("bool", True),
        ("huge", 1e300),
        ("above", 101),
        ("null", None),
    ]:
        body = with_fields(CHAT, logit_bias={"1": value})
        yield Case(f"logit-bias-value-{tag}", CHAT, body, 400, "logit_bias.1")
    yield Case("logit-bias-value-nan", CHAT, raw(CHAT, '"logit_bias": {"1": NaN}'), 400, None)
    yield Case("logit-bias-list", CHAT, with_fields(CHAT, logit_bias=[1]), 400, "logit_bias")


def json_literal_cases() -> Iterator[Case]:
    """NaN, Infinity, numbers past float or int range, duplicate keys: what json.dumps won't write."""
    for path in BASE:
        short = SHORT[path]
        field = (
            '"sampling_params": {"temperature": %s}' if path == GENERATE else '"temperature": %s'
        )
        for tag, lit in [
            ("nan", "NaN"),
            ("inf", "Infinity"),
            ("-inf", "-Infinity"),
            ("1e400", "1e400"),
        ]:
            yield Case(f"{short}-literal-{tag}", path, raw(path, field % lit), 400, None)
        yield Case(f"{short}-int-5000-digits", path, raw(path, field % ("9" * 5000)), 400, None)
        key = next(iter(BASE[path]))
        yield Case(f"{short}-duplicate-key", path, raw(path, f'"{key}": "again"'), 400, None)
        yield Case(f"{short}-duplicate-stream", path, raw(path, '"stream": false, "stream": true'))
    dup = b'{"messages": [{"role": "user", "role": "system", "content": "hi"}]}'
    yield Case("chat-duplicate-nested-key", CHAT, dup, 400, None)
    dup = b'{"text": "hi", "sampling_params": {"n": 1, "n": 2}}'
    yield Case("generate-duplicate-nested-key", GENERATE, dup, 400, None)


def nesting_cases() -> Iterator[Case]:
    deep_list = "[" * 5000 + "]" * 5000
    deep_obj = '{"a":' * 5000 + "1" + "}" * 5000
    for path in BASE:
        short = SHORT[path]
        yield Case(f"{short}-deep-list-body", path, deep_list.encode(), 400, None)
        yield Case(f"{short}-deep-object-body", path, deep_obj.encode(), 400, None)
        yield Case(f"{short}-deep-unclosed", path, ("[" * 100_000).encode(), 400, None)
        yield Case(f"{short}-deep-field", path, raw(path, f'"x_unknown": {deep_list}'), 400, None)
        yield Case(f"{short}-65-deep", path, raw(path, '"x": ' + "[" * 64 + "]" * 64), 400, None)
    yield Case("chat-deep-content", CHAT, raw(CHAT, f'"guided_json": {deep_obj}'), 400, None)
    tpl = '"chat_template_kwargs": {"a": ' + "[" * 200 + "]" * 200 + "}"
    yield Case("chat-deep-template-kwargs", CHAT, raw(CHAT, tpl), 400, None)
    yield Case("generate-deep-ids", GENERATE, dumps({"input_ids": [[[[[[1]]]]]]}), 400, ANY)


def surrogate_cases() -> Iterator[Case]:
    lone = "\ud800"
    msg = {"role": "user", "content": "hi"}
    chat_cases = {
        "content": ({"messages": [{**msg, "content": lone}]}, "messages[0].content"),
        "low": ({"messages": [{**msg, "content": "a\udfffb"}]}, "messages[0].content"),
        "reversed-pair": (
            {"messages": [{**msg, "content": "\ude00\ud83d"}]},
            "messages[0].content",
        ),
        "name": ({"messages": [{**msg, "name": lone}]}, "messages[0].name"),
        "part": (
            {"messages": [{**msg, "content": [{"type": "text", "text": lone}]}]},
            "messages[0].content[0].text",
        ),
        "model": ({**BASE[CHAT], "model": lone}, "model"),
        "stop": ({**BASE[CHAT], "stop": ["ok", lone]}, "stop[1]"),
        "user": ({**BASE[CHAT], "user": lone}, "user"),
        "logit-bias-key": ({**BASE[CHAT], "logit_bias": {lone: 1}}, "logit_bias"),
        "unknown-field-key": ({**BASE[CHAT], lone: 1}, None),
        "tool-description": (
            {
                **BASE[CHAT],
                "tools": [{"type": "function", "function": {"name": "f", "description": lone}}],
            },
            "tools[0].function.description",
        ),
        "guided-json": ({**BASE[CHAT], "guided_json": {"type": lone}}, "guided_json.type"),
        "template-kwargs": (
            {**BASE[CHAT], "chat_template_kwargs": {"x": lone}},
            "chat_template_kwargs.x",
        ),
    }
    for tag, (body, param) in chat_cases.items():
        yield Case(f"chat-surrogate-{tag}", CHAT, dumps(body), 400, param)
    for tag, (body, param) in {
        "prompt": ({"prompt": lone}, "prompt"),
        "prompt-batch": ({"prompt": ["ok", lone]}, "prompt[1]"),
        "model": ({"prompt": "hi", "model": lone}, "model"),
        "stop": ({"prompt": "hi", "stop": lone}, "stop"),
    }.items():
        yield Case(f"completions-surrogate-{tag}", COMPLETIONS, dumps(body), 400, param)
    for tag, (body, param) in {
        "text": ({"text": lone}, "text"),
        "rid": ({"text": "hi", "rid": lone}, "rid"),
        "stop": ({"text": "hi", "sampling_params": {"stop": lone}}, "sampling_params.stop"),
        "regex": ({"text": "hi", "sampling_params": {"regex": lone}}, "sampling_params.regex"),
    }.items():
        yield Case(f"generate-surrogate-{tag}", GENERATE, dumps(body), 400, param)


def encoding_cases() -> Iterator[Case]:
    """Bytes that are not UTF-8 JSON: invalid sequences, null bytes, other encodings."""
    for path in BASE:
        short = SHORT[path]
        key = "prompt" if path == COMPLETIONS else "text"
        for tag, bad in [
            ("ff", b"\xff"),
            ("overlong", b"\xc0\xaf"),
            ("utf8-surrogate", b"\xed\xa0\x80"),
            ("truncated", b"\xe2\x82"),
            ("raw-null", b"\x00"),
            ("raw-newline", b"\n"),
        ]:
            body = b'{"%s": "a%sb"}' % (key.encode(), bad)
            if path == CHAT:
                body = b'{"messages": [{"role": "user", "content": "a%sb"}]}' % bad
            yield Case(f"{short}-bytes-{tag}", path, body, 400, None)
        text = json.dumps(BASE[path])
        yield Case(f"{short}-utf16", path, text.encode("utf-16"), 400, None)
        yield Case(f"{short}-utf32", path, text.encode("utf-32"), 400, None)
        yield Case(f"{short}-bom", path, b"\xef\xbb\xbf" + text.encode(), 400, None)
        yield Case(f"{short}-null-body", path, b"\x00", 400, None)
        yield Case(f"{short}-trailing-null", path, text.encode() + b"\x00", 400, None)


def shape_cases() -> Iterator[Case]:
    """Bodies that are not a JSON object, or not JSON at all, and wrong content types."""
    for path in BASE:
        short = SHORT[path]
        text = json.dumps(BASE[path])
        for tag, body in [
            ("array", b"[]"),
            ("string", b'"hi"'),
            ("number", b"1"),
            ("null", b"null"),
            ("true", b"true"),
            ("empty", b""),
            ("spaces", b"   "),
            ("wrapped", f"[{text}]".encode()),
            ("truncated", text[:-1].encode()),
            ("trailing-comma", f"{text[:-1]},}}".encode()),
            ("single-quotes", text.replace('"', "'").encode()),
            ("comment", f"/* c */ {text}".encode()),
            ("two-objects", f"{text} {text}".encode()),
        ]:
            yield Case(f"{short}-body-{tag}", path, body, 400, None)
        for tag, ctype, body in [
            ("form", "application/x-www-form-urlencoded", b"prompt=hi&n=1"),
            (
                "multipart",
                "multipart/form-data; boundary=x",
                b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--x--\r\n',
            ),
            ("text", "text/plain", b"hello there"),
            ("xml", "application/xml", b"<prompt>hi</prompt>"),
        ]:
            yield Case(f"{short}-content-type-{tag}", path, body, 400, None, content_type=ctype)


def value_cases() -> Iterator[Case]:
    """Empty, huge, missing and ill-shaped values of the prompt and structured fields."""
    huge = "x" * 70_000  # past the 2048-token context's 65,536 characters
    ctx = "context_length_exceeded"
    yield Case(
        "chat-huge-content",
        CHAT,
        dumps({"messages": [{"role": "user", "content": huge}]}),
        400,
        "messages",
        ctx,
    )
    yield Case(
        "chat-huge-name",
        CHAT,
        dumps({"messages": [{"role": "user", "content": "", "name": huge}]}),
        400,
        "messages",
        ctx,
    )
    many = [{"role": "user", "content": "x" * 1000}] * 70
    yield Case("chat-huge-total", CHAT, dumps({"messages": many}), 400, "messages", ctx)
    yield Case("completions-huge-prompt", COMPLETIONS, dumps({"prompt": huge}), 400, "prompt", ctx)
    yield Case(
        "completions-huge-in-batch", COMPLETIONS, dumps({"prompt": ["a", huge]}), 400, "prompt", ctx
    )
    yield Case("generate-huge-text", GENERATE, dumps({"text": huge}), 400, "text", ctx)
    yield Case("chat-no-messages", CHAT, dumps({"messages": []}), 400, "messages")
    yield Case("chat-messages-string", CHAT, dumps({"messages": "hi"}), 400, "messages")
    yield Case("chat-messages-null", CHAT, dumps({"messages": None}), 400, "messages")
    yield Case("chat-message-number", CHAT, dumps({"messages": [1]}), 400, "messages[0]")
    yield Case(
        "chat-role-empty",
        CHAT,
        dumps({"messages": [{"role": "", "content": "hi"}]}),
        400,
        "messages[0].role",
    )
    yield Case(
        "chat-no-role", CHAT, dumps({"messages": [{"content": "hi"}]}), 400, "messages[0].role"
    )
    for role in ("user", "system", "tool"):  # OpenAI: content is required for these roles
        missing = {"role": role} if role != "tool" else {"role": role, "tool_call_id": "c1"}
        yield Case(
            f"chat-{role}-without-content",
            CHAT,
            dumps({"messages": [missing]}),
            400,
            "messages[0].content",
        )
    yield Case(
        "chat-user-content-null",
        CHAT,
        dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": None}]}),
        400,
        "messages[1].content",
    )
    yield Case(
        "chat-content-object",
        CHAT,
        dumps({"messages": [{"role": "user", "content": {"a": 1}}]}),
        400,
        ANY,
    )
    yield Case(
        "chat-content-number", CHAT, dumps({"messages": [{"role": "user", "content": 5}]}), 400, ANY
    )
    yield Case("chat-stop-empty", CHAT, with_fields(CHAT, stop=""), 400, "stop")
    yield Case("chat-stop-number", CHAT, with_fields(CHAT, stop=5), 400, "stop")
    yield Case("chat-tools-string", CHAT, with_fields(CHAT, tools="f"), 400, "tools")
    yield Case(
        "chat-tool-choice-number", CHAT, with_fields(CHAT, tool_choice=5), 400, "tool_choice"
    )
    yield Case(
        "chat-response-format-bad",
        CHAT,
        with_fields(CHAT, response_format={"type": "nope"}),
        400,
        "response_format.type",
    )
    yield Case(
        "chat-stream-options-string",
        CHAT,
        with_fields(CHAT, stream_options="x"),
        400,
        "stream_options",
    )
    yield Case(
        "chat-stream-options-no-stream",
        CHAT,
        with_fields(CHAT, stream_options={"include_usage": True}),
        400,
        "stream_options",
    )
    yield Case(
        "chat-include-usage-string",
        CHAT,
        with_fields(CHAT, stream=True, stream_options={"include_usage": "yes"}),
        400,
        "stream_options.include_usage",
    )
    yield Case(
        "chat-template-kwargs-list",
        CHAT,
        with_fields(CHAT, chat_template_kwargs=[1]),
        400,
        "chat_template_kwargs",
    )
    yield Case(
        "chat-model-empty", CHAT, with_fields(CHAT, model=""), 404, "model", "model_not_found"
    )
    yield Case(
        "chat-model-other", CHAT, with_fields(CHAT, model="gpt-9"), 404, "model", "model_not_found"
    )
    yield Case("chat-model-number", CHAT, with_fields(CHAT, model=5), 400, "model")
    yield Case(
        "chat-model-null-byte",
        CHAT,
        with_fields(CHAT, model="m\u0000"),
        404,
        "model",
        "model_not_found",
    )
    yield Case("completions-prompt-empty", COMPLETIONS, dumps({"prompt": ""}), 400, "prompt")
    yield Case("completions-prompt-empty-list", COMPLETIONS, dumps({"prompt": []}), 400, "prompt")
    yield Case(
        "completions-prompt-empty-ids", COMPLETIONS, dumps({"prompt": [[1], []]}), 400, "prompt[1]"
    )
    yield Case("completions-prompt-null", COMPLETIONS, dumps({"prompt": None}), 400, "prompt")
    yield Case("completions-prompt-object", COMPLETIONS, dumps({"prompt": {"a": 1}}), 400, "prompt")
    yield Case("completions-no-prompt", COMPLETIONS, dumps({"n": 1}), 400, "prompt")
    yield Case(
        "completions-suffix", COMPLETIONS, with_fields(COMPLETIONS, suffix="y"), 400, "suffix"
    )
    yield Case(
        "completions-echo-logprobs-streamed",
        COMPLETIONS,
        with_fields(COMPLETIONS, echo=True, logprobs=1, stream=True),
        400,
        "stream",
    )
    yield Case(
        "completions-echo-logprobs-n",
        COMPLETIONS,
        with_fields(COMPLETIONS, echo=True, logprobs=1, n=2),
        400,
        "n",
    )
    yield Case(
        "completions-max-tokens-0-without-echo",
        COMPLETIONS,
        with_fields(COMPLETIONS, max_tokens=0),
        400,
        "max_tokens",
    )
    yield Case(
        "completions-min-over-max",
        COMPLETIONS,
        with_fields(COMPLETIONS, min_tokens=20, max_tokens=4),
        400,
        "min_tokens",
    )
    yield Case(
        "completions-over-context",
        COMPLETIONS,
        with_fields(COMPLETIONS, max_tokens=INT32_MAX),
        400,
        "prompt",
        ctx,
    )
    yield Case("generate-empty-text", GENERATE, dumps({"text": ""}), 400, "text")
    yield Case("generate-neither", GENERATE, dumps({"stream": False}), 400, "text")
    yield Case("generate-both", GENERATE, dumps({"text": "a", "input_ids": [1]}), 400, "text")
    yield Case(
        "generate-params-list",
        GENERATE,
        dumps({"text": "a", "sampling_params": []}),
        400,
        "sampling_params",
    )
    yield Case("generate-rid-number", GENERATE, dumps({"text": "a", "rid": 5}), 400, "rid")
    batch = {"text": ["a", "b"]}
    for tag, extra, param in [
        ("empty-text-list", {"text": []}, "text"),
        ("empty-text-entry", {"text": ["a", ""]}, "text[1]"),
        ("params-list-short", {"sampling_params": [{}]}, "sampling_params"),
        (
            "params-list-n-differs",
            {"sampling_params": [{"n": 1}, {"n": 2}]},
            "sampling_params[1].n",
        ),
        ("rid-one-string", {"rid": "x"}, "rid"),
        ("rid-list-short", {"rid": ["x"]}, "rid"),
        ("rid-list-repeats", {"rid": ["x", "x"]}, "rid"),
    ]:
        yield Case(f"generate-batch-{tag}", GENERATE, dumps({**batch, **extra}), 400, param)
    yield Case(
        "generate-rid-list-one-prompt", GENERATE, dumps({"text": "a", "rid": ["x"]}), 400, "rid"
    )
    yield Case(
        "generate-params-list-one-prompt",
        GENERATE,
        dumps({"text": "a", "sampling_params": [{}]}),
        400,
        "sampling_params",
    )
    yield Case(
        "generate-rid-null-byte", GENERATE, dumps({"text": "a", "rid": "a\u0000b"}), 400, "rid"
    )
    yield Case(
        "generate-logprob-start-past-the-prompt",
        GENERATE,
        dumps({"text": "a", "return_logprob": True, "logprob_start_len": 5}),
        400,
        "logprob_start_len",
    )
    yield Case(
        "generate-logprob-start-below-minus-one",
        GENERATE,
        dumps({"text": "a", "return_logprob": True, "logprob_start_len": -2}),
        400,
        "logprob_start_len",
    )


def route_cases() -> Iterator[Case]:
    yield Case("unknown-route", "/v1/embeddings", dumps({"input": "x"}), 404, None)
    yield Case("wrong-method-get", COMPLETIONS, b"", 405, None, method="GET")
    yield Case("wrong-method-put", CHAT, with_fields(CHAT), 405, None, method="PUT")
    yield Case(
        "unknown-model-path", "/v1/models/gpt-9", b"", 404, "model", "model_not_found", method="GET"
    )
    yield Case("surrogate-model-path", "/v1/models/%ED%A0%80", b"", 404, ANY, method="GET")
    yield Case("null-model-path", "/v1/models/%00", b"", 404, ANY, method="GET")


def too_large_cases(limit: int) -> Iterator[Case]:
    for path in BASE:
        short = SHORT[path]
        body = raw(path, f'"x": "{"x" * limit}"')
        yield Case(f"{short}-too-large", path, body, 413, None, "request_too_large")


def cases(limit: int = 4 * 2**20) -> list[Case]:
    groups = [
        typed_cases,
        token_id_cases,
        logit_bias_cases,
        json_literal_cases,
        nesting_cases,
        surrogate_cases,
        encoding_cases,
        shape_cases,
        value_cases,
        route_cases,
    ]
    found = [case for group in groups for case in group()] + list(too_large_cases(limit))
    ids = [c.id for c in found]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return found


def check_answer(case: Case, status: int, headers: dict, body: bytes) -> dict:
    """Asserts the case's answer: its status, an OpenAI error body, and its param and code."""
    assert 400 <= status < 500, f"{case.id}: {status} {body[:300]!r}"
    assert status == case.status, f"{case.id}: {status} {body[:300]!r}"
    assert headers.get("content-type", "").startswith("application/json"), case.id
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, case.id
    assert isinstance(error["message"], str) and error["message"], case.id
    assert error["type"] == "invalid_request_error", case.id
    if case.param != ANY:
        assert error["param"] == case.param, f"{case.id}: {error}"
    if case.code != ANY:
        assert error["code"] == case.code, f"{case.id}: {error}"
    assert "Traceback" not in error["message"], case.id
    return error
