"""The one error mapping: gRPC statuses → gateway errors → HTTP status and OpenAI body."""

from __future__ import annotations

import json

import grpc
import pytest
from starlette.testclient import TestClient

from services.gateway.app import build_app
from services.gateway.auth import check_api_key
from services.gateway.config import GatewayConfig
from services.gateway.errors import (
    Busy,
    ContextLengthExceeded,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    Timeout,
    Unauthorized,
    Unavailable,
    error_response,
    from_status,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.sampling import ModelInfo


@pytest.mark.parametrize(
    ("code", "cls", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest, 400),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidRequest, 400),
        (grpc.StatusCode.ALREADY_EXISTS, InvalidRequest, 400),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Overloaded, 503),
        (grpc.StatusCode.FAILED_PRECONDITION, Busy, 400),  # FlushCache with requests in flight
        (grpc.StatusCode.UNAVAILABLE, Unavailable, 503),
        (14, Unavailable, 503),  # a GenerateError carries the number
        (grpc.StatusCode.DEADLINE_EXCEEDED, Timeout, 504),
        (grpc.StatusCode.INTERNAL, GatewayError, 500),
        (13, GatewayError, 500),
    ],
)
def test_grpc_status_mapping(code: grpc.StatusCode | int, cls: type, status: int) -> None:
    err = from_status(code, "details", "scheduler")
    assert type(err) is cls and err.status == status


@pytest.mark.parametrize(
    ("exc", "status", "type_", "code"),
    [
        (InvalidRequest("bad", param="n"), 400, "invalid_request_error", None),
        (
            ContextLengthExceeded("long", param="messages"),
            400,
            "invalid_request_error",
            "context_length_exceeded",
        ),
        (Unauthorized("no key"), 401, "invalid_request_error", "invalid_api_key"),
        (ModelNotFound("no model", param="model"), 404, "invalid_request_error", "model_not_found"),
        (Overloaded("full"), 503, "server_error", "queue_full"),
        (Unavailable("down"), 503, "server_error", "service_unavailable"),
        (RuntimeError("secret detail"), 500, "server_error", "internal_error"),
    ],
)
def test_error_response(exc: Exception, status: int, type_: str, code: str | None) -> None:
    response = error_response(exc, retry_after_s=7)
    assert response.status_code == status
    body = response.body.decode()
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (type_, code)
    assert "secret" not in body and "Traceback" not in body
    assert (response.headers.get("retry-after") == "7") == isinstance(exc, Overloaded)


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (None, False),
        ("Bearer k1", True),
        ("bearer k2", True),
        ("Bearer k3", False),
        ("Basic k1", False),
        ("k1", False),
        ("Bearer é", False),
    ],
)
def test_api_keys(header: str | None, ok: bool) -> None:
    if ok:
        check_api_key(header, ["k1", "k2"])
    else:
        with pytest.raises(Unauthorized):
            check_api_key(header, ["k1", "k2"])
    check_api_key(header, [])  # no keys: open


class FakeBackend:
    """Just enough backend for the routes; `fail` is raised by every generation request."""

    fail: Exception = RuntimeError("secret detail")

    def __init__(self, cfg: GatewayConfig) -> None:
        self.metrics = GatewayMetrics()
        self.metrics.bind("m")
        self.created = 1
        self.model = ModelInfo("m", 2048, 1000, 20, 4096)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def check_model(self, name: str | None) -> ModelInfo:
        if name not in (None, "m"):
            raise ModelNotFound(f"The model `{name}` does not exist.", param="model")
        return self.model

    async def chat_input(self, req, request_id):
        self.check_model(req.model)
        raise self.fail

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    async def not_ready_reason(self) -> str | None:
        return "the tokenizer is not serving yet"


@pytest.fixture
def client() -> TestClient:
    cfg = GatewayConfig(api_key=["k1"])
    app = build_app(cfg, backend_factory=FakeBackend)  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


AUTH = {"Authorization": "Bearer k1"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("POST", "/v1/chat/completions", {"json": CHAT}, 401, "invalid_api_key"),
        (
            "POST",
            "/v1/chat/completions",
            {"json": CHAT, "headers": {"Authorization": "Bearer x"}},
            401,
            "invalid_api_key",
        ),
        ("POST", "/v1/chat/completions", {"content": b"{", "headers": AUTH}, 400, None),
        (
            "POST",
            "/v1/chat/completions",
            {"json": {**CHAT, "model": "other"}, "headers": AUTH},
            404,
            "model_not_found",
        ),
        ("POST", "/v1/chat/completions", {"json": CHAT, "headers": AUTH}, 500, "internal_error"),
        ("GET", "/v1/chat/completions", {"headers": AUTH}, 405, None),
        ("GET", "/v1/nothing", {"headers": AUTH}, 404, "unknown_url"),
        ("GET", "/ready", {}, 503, "service_unavailable"),
    ],
)
def test_routes_answer_errors_in_openai_shape(
    client: TestClient, method: str, path: str, kwargs: dict, status: int, code: str | None
) -> None:
    response = client.request(method, path, **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert "Traceback" not in response.text and "secret" not in response.text


def test_queue_full_sends_retry_after_and_counts_a_rejection(client: TestClient) -> None:
    FakeBackend.fail = Overloaded("the server is overloaded: 8 requests waiting")
    try:
        response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    finally:
        FakeBackend.fail = RuntimeError("secret detail")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    metrics = client.get("/metrics")
    assert 'radixserve:request_rejections_total{model_name="m"} 1.0' in metrics.text
    # and the 503 is counted as an HTTP response of its route
    route = 'handler="/v1/chat/completions",method="POST",status="5xx"'
    assert f"http_requests_total{{{route}}} 1.0" in metrics.text


def test_health_needs_no_key(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_http_requests_are_counted_by_route_template_not_path(client: TestClient) -> None:
    client.get("/v1/models/m", headers=AUTH)
    client.get("/v1/models/other", headers=AUTH)  # 404: the model does not exist
    client.get("/no/such/path/123", headers=AUTH)
    text = client.get("/metrics").text
    template = 'handler="/v1/models/{model_id:path}",method="GET"'
    assert f'http_requests_total{{{template},status="2xx"}} 1.0' in text
    assert f'http_requests_total{{{template},status="4xx"}} 1.0' in text
    assert 'http_requests_total{handler="none",method="GET",status="4xx"} 1.0' in text
    assert "/no/such/path" not in text  # unmatched paths share one series
    assert f"http_request_duration_seconds_count{{{template}}} 2.0" in text
