"""Every request field is honoured, accepted with no effect, or rejected — and never more than one.

The OpenAI field names come from the `openai` package, so a field a new SDK adds fails here until
it is classified in services/gateway/fields.py.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params
from pydantic import BaseModel
from starlette.testclient import TestClient

from services.gateway import fields
from services.gateway.app import build_app
from services.gateway.backend import chat_tools_sampling
from services.gateway.chat_tools import ToolPlan
from services.gateway.config import GatewayConfig
from services.gateway.convert import chat_request_to_pb
from services.gateway.fields import CHAT, COMPLETIONS, GENERATE, SAMPLING_PARAMS, FieldTable, Rule
from services.gateway.generation import Generation
from services.gateway.metrics import GatewayMetrics, RequestMetrics
from services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    NativeSamplingParams,
)
from services.gateway.sampling import (
    GenerationInput,
    ModelInfo,
    SamplingParams,
    TextOptions,
    completion_sampling,
    fit_context,
    native_sampling,
    text_options,
)
from tests.gateway.fakes import FakeScheduler, FakeTokenizer, chunks_of, end_of

MODEL = ModelInfo("m", context_length=2048, vocab_size=1000, max_top_logprobs=20, num_kv_slots=4096)
ROOT = Path(__file__).resolve().parents[2]
# Honoured by its rule alone: the values it accepts all mean free text.
RULE_ONLY: set[str] = set()


def declared(model: type[BaseModel]) -> set[str]:
    """The JSON names of a model's fields."""
    return {f.alias or name for name, f in model.model_fields.items()}


def lists_holding(table: FieldTable, name: str) -> list[str]:
    lists = {"honoured": table.honoured, "no effect": table.no_effect, "rejected": table.rejected}
    return [label for label, rules in lists.items() if name in rules]


def assert_each_in_one_list(table: FieldTable, names: set[str], model: type[BaseModel]) -> None:
    misplaced = {n: lists_holding(table, n) for n in names if len(lists_holding(table, n)) != 1}
    assert not misplaced, f"{table.endpoint}: fields in no list or in several: {misplaced}"
    # An honoured field the model drops would be silently ignored.
    assert set(table.honoured) - declared(model) <= RULE_ONLY, table.endpoint


def test_a_field_in_two_lists_or_in_none_fails() -> None:
    with pytest.raises(AssertionError, match="two lists"):
        FieldTable("/x", {"a": Rule("")}, {"a": Rule("")}, {})
    with pytest.raises(AssertionError, match="no list or in several"):
        assert_each_in_one_list(CHAT, {"not_a_field"}, ChatCompletionRequest)


def test_every_chat_field_is_in_exactly_one_list() -> None:
    sdk = set(chat_params.CompletionCreateParamsBase.__annotations__)
    assert {"messages", "audio", "tool_choice"} <= sdk
    names = sdk | declared(ChatCompletionRequest)
    assert_each_in_one_list(CHAT, names, ChatCompletionRequest)


def test_every_completions_field_is_in_exactly_one_list() -> None:
    sdk = set(completion_params.CompletionCreateParamsBase.__annotations__)
    assert {"prompt", "suffix", "best_of"} <= sdk
    names = sdk | declared(CompletionRequest)
    assert_each_in_one_list(COMPLETIONS, names, CompletionRequest)


def test_every_generate_field_is_in_exactly_one_list() -> None:
    assert_each_in_one_list(GENERATE, declared(GenerateRequest), GenerateRequest)
    sampling = declared(NativeSamplingParams)
    assert "sampling_seed" in sampling
    assert_each_in_one_list(SAMPLING_PARAMS, sampling, NativeSamplingParams)
    assert GENERATE.nested == {"sampling_params": SAMPLING_PARAMS}


def openai_text(req: ChatCompletionRequest | CompletionRequest) -> TextOptions:
    return text_options(req)


class OkBackend:
    """Enough backend for the routes: the real sampling checks, then every sample answers "ok"."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        self.created = 1
        self.model = MODEL
        self.inputs: list[GenerationInput] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def check_model(self, name: str | None) -> ModelInfo:
        return self.model

    async def chat_input(
        self, req: ChatCompletionRequest, rid: str
    ) -> tuple[GenerationInput, ToolPlan | None]:
        sampling, plan = chat_tools_sampling(req, MODEL, self.cfg.tool_call_parser)
        return self._input(rid, sampling, openai_text(req)), plan

    async def completion_inputs(self, req: CompletionRequest, rid: str) -> list[GenerationInput]:
        return [self._input(rid, completion_sampling(req, MODEL), openai_text(req))]

    async def prompt_texts(self, req: CompletionRequest) -> list[str]:
        return [str(p) for p in req.prompts()]

    async def native_inputs(self, req: GenerateRequest, rid: str) -> list[GenerationInput]:
        count = len(req.prompts())
        return [
            self._input(k, native_sampling(p, MODEL), text_options(p))
            for k, p in zip(req.request_ids(rid, count), req.params_per_prompt(count), strict=True)
        ]

    def _input(self, rid: str, sampling: SamplingParams, text: TextOptions) -> GenerationInput:
        sampling = fit_context(sampling, 3, MODEL, "prompt")
        inp = GenerationInput(rid, [1, 2, 3], sampling, text)
        self.inputs.append(inp)
        return inp

    def generation(self, inp: GenerationInput) -> Generation:
        scheduler = FakeScheduler([*chunks_of("ok"), end_of("ok", "stop")])
        metrics = RequestMetrics.disabled()
        return Generation(inp, scheduler, FakeTokenizer(), metrics, 60.0)  # type: ignore[arg-type]


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = build_app(GatewayConfig(), backend_factory=OkBackend)  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


ROUTES = {
    "/v1/chat/completions": (CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
    "/v1/completions": (COMPLETIONS, {"prompt": "hi"}),
    "/generate": (GENERATE, {"text": "hi"}),
}
# A value each rejected field refuses (a new rejected field needs one here).
REFUSED = {
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "hello"},
    "web_search_options": {},
    "moderation": {"model": "omni-moderation-latest"},
    "suffix": "y",
    "best_of": 2,
    "image_data": "cat.png",
    "lora_path": "adapter",
    "use_beam_search": True,
    "prompt_logprobs": 1,
}
# A no-op value each rejected field accepts, next to the default request of its route.
ACCEPTED_NO_OPS = [
    ("/v1/chat/completions", {"audio": None}),
    ("/v1/chat/completions", {"modalities": ["text"]}),
    ("/v1/completions", {"suffix": ""}),
    ("/v1/completions", {"best_of": 3, "n": 3}),
    ("/v1/completions", {"use_beam_search": False}),
    ("/v1/chat/completions", {"use_beam_search": None}),
    ("/generate", {"image_data": None}),
]
# A value for each no-effect field (a new one needs one here).
NO_EFFECT = {
    "user": "user-1",
    "metadata": {"team": "a"},
    "store": True,
    "service_tier": "priority",
    "safety_identifier": "hash-1",
    "prompt_cache_key": "k",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"mode": "explicit"},
    "reasoning_effort": "high",
    "verbosity": "low",
}


def rejected_fields() -> list[tuple[str, str]]:
    return [(route, name) for route, (table, _) in ROUTES.items() for name in table.rejected]


def no_effect_fields() -> list[tuple[str, str]]:
    return [(route, name) for route, (table, _) in ROUTES.items() for name in table.no_effect]


def assert_openai_error(response, param: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
    return error


def answer(body: dict) -> object:
    """The generated part of a response (no ids, no timestamps)."""
    return body["choices"] if "choices" in body else body["text"]


def test_every_rejected_field_has_a_refused_value() -> None:
    assert {name for _, name in rejected_fields()} == set(REFUSED)
    assert {name for _, name in no_effect_fields()} == set(NO_EFFECT)


@pytest.mark.parametrize(("route", "name"), rejected_fields())
def test_a_rejected_field_is_a_400_naming_it(client: TestClient, route: str, name: str) -> None:
    table, body = ROUTES[route]
    response = client.post(route, json={**body, name: REFUSED[name]})
    error = assert_openai_error(response, name)
    assert table.rejected[name].note in error["message"]


@pytest.mark.parametrize(("route", "extra"), ACCEPTED_NO_OPS)
def test_a_rejected_field_at_its_no_op_value_is_accepted(
    client: TestClient, route: str, extra: dict
) -> None:
    response = client.post(route, json={**ROUTES[route][1], **extra})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("route", "name"), no_effect_fields())
def test_a_no_effect_field_is_accepted_and_changes_nothing(
    client: TestClient, route: str, name: str
) -> None:
    body = ROUTES[route][1]
    plain = client.post(route, json=body)
    with_field = client.post(route, json={**body, name: NO_EFFECT[name]})
    assert (plain.status_code, with_field.status_code) == (200, 200), with_field.text
    assert answer(with_field.json()) == answer(plain.json())
    first, second = client.app.state.backend.inputs
    assert (first.sampling, first.text) == (second.sampling, second.text)


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("value", ["auto", "none", None])
def test_tool_choice_auto_and_none_answer_in_free_text(client: TestClient, value) -> None:
    body = {**ROUTES["/v1/chat/completions"][1], "tools": TOOLS}
    response = client.post("/v1/chat/completions", json={**body, "tool_choice": value})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "ok"
    assert client.app.state.backend.inputs[-1].sampling.grammar is None


def test_chat_template_kwargs_reach_the_tokenizer_request() -> None:
    body = ROUTES["/v1/chat/completions"][1]
    kwargs = {"enable_thinking": False}
    req = ChatCompletionRequest.model_validate({**body, "chat_template_kwargs": kwargs})
    assert json.loads(chat_request_to_pb(req).chat_template_kwargs_json) == kwargs
    plain = ChatCompletionRequest.model_validate(body)
    assert chat_request_to_pb(plain).chat_template_kwargs_json == ""


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}},
            "tool_choice.type",
        ),
        ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
        ),
    ],
)
def test_tool_choices_the_tools_cannot_satisfy_are_400s(client: TestClient, extra, param) -> None:
    body = {**ROUTES["/v1/chat/completions"][1], **extra}
    assert_openai_error(client.post("/v1/chat/completions", json=body), param)


def test_invalid_values_are_reported_before_rejected_fields(client: TestClient) -> None:
    body = {**ROUTES["/v1/completions"][1], "best_of": 0, "suffix": "y"}
    assert_openai_error(client.post("/v1/completions", json=body), "best_of")


def test_best_of_must_equal_n(client: TestClient) -> None:
    body = {**ROUTES["/v1/completions"][1], "best_of": 1, "n": 2}
    error = assert_openai_error(client.post("/v1/completions", json=body), "best_of")
    assert "best-of selection is not supported" in error["message"]


def warnings_naming(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "radixserve.gateway" and r.levelno == logging.WARNING and name in r.message
    ]


def test_an_unknown_field_is_accepted_and_logged_once(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    body = {**ROUTES["/v1/chat/completions"][1], "x_unknown_chat_field": {"a": 1}}
    with caplog.at_level(logging.WARNING, logger="radixserve.gateway"):
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    (message,) = warnings_naming(caplog, "x_unknown_chat_field")
    assert "/v1/chat/completions" in message


def test_an_unknown_sampling_param_is_logged_with_its_path(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"text": "hi", "sampling_params": {"x_unknown_sampling_param": 1}}
    with caplog.at_level(logging.WARNING, logger="radixserve.gateway"):
        for _ in range(2):
            assert client.post("/generate", json=body).status_code == 200
    (message,) = warnings_naming(caplog, "x_unknown_sampling_param")
    assert "/generate" in message and "sampling_params.x_unknown_sampling_param" in message


def test_known_fields_are_not_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    body = {**ROUTES["/v1/chat/completions"][1], "user": "u", "top_k": 5, "tool_choice": "auto"}
    with caplog.at_level(logging.WARNING, logger="radixserve.gateway"):
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert not [r for r in caplog.records if "unknown request field" in r.getMessage()]


def test_unknown_fields_logged_are_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fields, "_warned", set())
    monkeypatch.setattr(fields, "MAX_WARNED", 2)
    with caplog.at_level(logging.WARNING, logger="radixserve.gateway"):
        COMPLETIONS.check({"prompt": "x", "a": 1, "b": 2, "c": 3, "d": 4})
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "no further unknown fields" in messages[1]
    assert len(fields._warned) == 2


STATUS = {"honoured": "honoured", "no_effect": "no effect", "rejected": "rejected"}


def rows_of(table: FieldTable, prefix: str = "") -> set[tuple[str, str, str]]:
    rows = {
        (prefix + name, STATUS[status], rule.note)
        for status in STATUS
        for name, rule in getattr(table, status).items()
    }
    for name, nested in table.nested.items():
        rows |= rows_of(nested, f"{name}.")
    return rows


def api_doc_rows(heading: str) -> list[tuple[str, ...]]:
    """The rows `| `field` | … |` of the docs/api.md table under `heading`."""
    text = (ROOT / "docs" / "api.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]
    cells = re.findall(r"^\| `([^`]+)` \| (.+) \|$", section, flags=re.MULTILINE)
    return [(name, *(c.strip() for c in rest.split(" | "))) for name, rest in cells]


def test_api_doc_lists_the_openai_fields_as_in_fields_py() -> None:
    chat, completions = rows_of(CHAT), rows_of(COMPLETIONS)
    expected = set()
    for name, status, note in chat | completions:
        in_chat, in_completions = ((name, status, note) in rows for rows in (chat, completions))
        where = "both" if in_chat and in_completions else "chat" if in_chat else "completions"
        expected.add((name, where, status, note))
    rows = api_doc_rows("### OpenAI routes")
    assert len(rows) == len(set(rows))
    assert set(rows) == expected


def test_api_doc_lists_the_generate_fields_as_in_fields_py() -> None:
    rows = api_doc_rows("### `/generate`")
    assert len(rows) == len(set(rows))
    assert set(rows) == rows_of(GENERATE)
