"""POST /v1/responses and GET /v1/responses/{id} through the `openai` SDK, in process (the real
Backend over a toy tokenizer whose chat template concatenates the messages' texts)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI
from starlette.testclient import TestClient

from services.gateway.app import build_app
from services.gateway.config import GatewayConfig
from services.gateway.generation import Generation
from services.gateway.metrics import RequestMetrics
from services.gateway.openai_responses import RESPONSES
from services.gateway.sampling import GenerationInput
from tests.gateway.fakes import FakeScheduler, char_decode, chunks_of, end_of
from tests.gateway.test_fields import MODEL, api_doc_rows, rows_of
from tests.gateway.test_hostile import FakeBackend


class RecordingBackend(FakeBackend):
    """Answers "ok" to every sample; keeps each prompt (as text) it was asked to continue."""

    def __init__(self, cfg: GatewayConfig) -> None:
        super().__init__(cfg)
        self.prompts: list[str] = []
        self.inputs: list[GenerationInput] = []
        self.app_state = None  # the app's state, when a test wants GET /load's counter seen
        self.loads: list[int | None] = []

    def generation(self, inp: GenerationInput, metrics: RequestMetrics | None = None) -> Generation:
        self.prompts.append(char_decode(inp.input_ids))
        self.inputs.append(inp)
        self.loads.append(self.app_state.server_load if self.app_state else None)
        return super().generation(inp, metrics)


@pytest.fixture
def http() -> Iterator[TestClient]:
    app = build_app(GatewayConfig(max_stored_responses=2), backend_factory=RecordingBackend)  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def sdk(http: TestClient) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)


def prompts(http: TestClient) -> list[str]:
    return http.app.state.backend.prompts  # type: ignore[attr-defined]


def test_sampling_fields_reach_the_generation(sdk: OpenAI, http: TestClient) -> None:
    sdk.responses.create(
        model=MODEL.name, input="hi", temperature=0.25, top_p=0.5, max_output_tokens=7
    )
    sdk.responses.create(model=MODEL.name, input="hi")
    chosen, default = http.app.state.backend.inputs  # type: ignore[attr-defined]
    assert (chosen.sampling.temperature, chosen.sampling.top_p) == (0.25, 0.5)
    assert chosen.sampling.max_tokens == 7
    assert (default.sampling.temperature, default.sampling.top_p) == (1.0, 1.0)


def test_a_response_has_openai_shape(sdk: OpenAI, http: TestClient) -> None:
    resp = sdk.responses.create(model=MODEL.name, input="hi", instructions="be brief")
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert (resp.status, resp.output_text, resp.model) == ("completed", "ok", MODEL.name)
    (item,) = resp.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    u = resp.usage  # the stand-in scheduler reports 3 prompt (1 cached) and 3 output tokens
    assert u is not None and (u.input_tokens, u.output_tokens, u.total_tokens) == (3, 3, 6)
    assert u.input_tokens_details.cached_tokens == 1
    assert prompts(http) == ["be briefhi"]  # instructions first, then the input


def test_a_response_cut_by_the_length_limit_is_incomplete_with_its_message(
    sdk: OpenAI,
) -> None:
    resp = sdk.responses.create(model=MODEL.name, input="hi", max_output_tokens=2)
    assert resp.status == "incomplete" and resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    (item,) = resp.output
    assert item.status == "incomplete" and resp.output_text == "ok"
    events = list(
        sdk.responses.create(model=MODEL.name, input="hi", max_output_tokens=2, stream=True)
    )
    done = next(e for e in events if e.type == "response.output_item.done")
    assert done.item.status == "incomplete"
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output[0].status == "incomplete"


def test_a_streamed_response_is_openai_event_sequence(sdk: OpenAI) -> None:
    events = list(sdk.responses.create(model=MODEL.name, input="hi", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "ok" == events[-4].text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == "ok" and final.usage is not None


def test_previous_response_id_continues_the_conversation(sdk: OpenAI, http: TestClient) -> None:
    first = sdk.responses.create(model=MODEL.name, input="one", instructions="sys")
    second = sdk.responses.create(
        model=MODEL.name, input=[{"role": "user", "content": "two"}], previous_response_id=first.id
    )
    # Instructions are not carried over; the first turn's input and answer are.
    assert prompts(http)[-1] == "oneoktwo"
    assert second.previous_response_id == first.id
    third = sdk.responses.create(model=MODEL.name, input="three", previous_response_id=second.id)
    assert prompts(http)[-1] == "oneoktwookthree"
    got = http.get(f"/v1/responses/{third.id}").json()
    assert got["id"] == third.id and got["output"][0]["content"][0]["text"] == "ok"
    # Only the two most recent are kept (--max-stored-responses 2).
    assert http.get(f"/v1/responses/{first.id}").status_code == 404
    with pytest.raises(openai.NotFoundError) as err:
        sdk.responses.create(model=MODEL.name, input="x", previous_response_id=first.id)
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert first.id in err.value.body["message"]  # type: ignore[index]


def test_store_false_keeps_nothing(sdk: OpenAI, http: TestClient) -> None:
    resp = sdk.responses.create(model=MODEL.name, input="hi", store=False)
    assert http.get(f"/v1/responses/{resp.id}").status_code == 404


def test_text_format_json_schema_becomes_structured_output(sdk: OpenAI, http: TestClient) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text = {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
    response = http.post("/v1/responses", json={"input": "hi", "text": text})
    assert response.status_code == 200, response.text
    assert response.json()["text"]["format"]["schema"] == schema
    missing = http.post(
        "/v1/responses", json={"input": "hi", "text": {"format": {"type": "json_schema"}}}
    )
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "text.format.schema"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tool_calls", 3),
        ("reasoning", {"effort": "high"}),
        ("background", True),
        ("include", ["message.output_text.logprobs"]),
    ],
)
def test_fields_not_offered_are_a_400_naming_them(
    http: TestClient, field: str, value: object
) -> None:
    response = http.post("/v1/responses", json={"input": "hi", field: value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": ""}, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_malformed_requests_name_the_field(http: TestClient, body: dict, param: str) -> None:
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_api_doc_lists_the_responses_fields_as_in_the_code() -> None:
    rows = api_doc_rows("### `/v1/responses` fields")
    assert len(rows) == len(set(rows))
    assert set(rows) == rows_of(RESPONSES)


def test_invocations_dispatches_by_body_and_load_counts_requests_in_flight(
    http: TestClient,
) -> None:
    backend = http.app.state.backend  # type: ignore[attr-defined]
    backend.app_state = http.app.state  # type: ignore[attr-defined]
    chat = http.post("/invocations", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    completion = http.post("/invocations", json={"prompt": "hi", "max_tokens": 2})
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion"
    neither = http.post("/invocations", json={"input": "hi"})
    assert neither.status_code == 400 and neither.json()["error"]["param"] == "messages"
    assert backend.loads == [1, 1]  # each counted while it ran...
    assert http.get("/load").json() == {"server_load": 0}  # ...and not once answered


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CALL_TEXT = (
    'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
)


class ToolCallingBackend(RecordingBackend):
    """Answers every request with CALL_TEXT (a hermes tool call after some text)."""

    def generation(self, inp: GenerationInput, metrics: RequestMetrics | None = None) -> Generation:
        self.prompts.append(char_decode(inp.input_ids))
        self.inputs.append(inp)
        scheduler = FakeScheduler([*chunks_of(CALL_TEXT, size=7), end_of(CALL_TEXT, "stop")])
        return Generation(inp, scheduler, self.tokenizer, RequestMetrics.disabled(), 60.0)  # type: ignore[arg-type]


@pytest.fixture
def tool_sdk() -> Iterator[tuple[OpenAI, TestClient]]:
    cfg = GatewayConfig(tool_call_parser="hermes")
    app = build_app(cfg, backend_factory=ToolCallingBackend)  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as c:
        yield OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c), c


def test_a_tool_call_comes_back_as_a_function_call_item(
    tool_sdk: tuple[OpenAI, TestClient],
) -> None:
    sdk, http = tool_sdk
    resp = sdk.responses.create(model=MODEL.name, input="Weather in Paris?", tools=[WEATHER])
    message, call = resp.output
    assert message.type == "message" and resp.output_text == "Let me check."
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_")
    # The call's result goes back as input; the conversation continues from the stored one.
    sdk.responses.create(
        model=MODEL.name,
        previous_response_id=resp.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER],
    )
    prompt = prompts(http)[-1]  # the toy template joins the messages' texts
    assert prompt.startswith("Weather in Paris?Let me check.") and prompt.endswith("sunny")


def test_a_streamed_tool_call_is_announced_after_the_text(
    tool_sdk: tuple[OpenAI, TestClient],
) -> None:
    sdk, _ = tool_sdk
    events = list(
        sdk.responses.create(model=MODEL.name, input="Weather?", tools=[WEATHER], stream=True)
    )
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "Let me check."  # the call's markup never streams as text
    args = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(args) == 1 and json.loads(args[0].arguments) == {"city": "Paris"}
    final = events[-1].response
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_a_tool_that_is_not_a_function_is_a_400(http: TestClient) -> None:
    response = http.post("/v1/responses", json={"input": "hi", "tools": [{"type": "web_search"}]})
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith("tools[0]")
