"""Schemathesis over `/openapi.json`: generated requests, valid and invalid, never get a 5xx.

The app is the real gateway app with the real `Backend` request handling over in-process stand-ins
for the services (see `test_hostile.FakeBackend`), so every generated request is parsed, checked,
tokenized, context-fitted and encoded to protobuf as in production. Example counts are bounded.
"""

from __future__ import annotations

import json

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from services.gateway.app import build_app
from services.gateway.config import GatewayConfig
from tests.gateway.test_hostile import LIMIT, FakeBackend

APP = build_app(GatewayConfig(max_request_bytes=LIMIT), backend_factory=FakeBackend)  # type: ignore[arg-type]
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def openai_shaped_error(ctx, response, case) -> None:  # type: ignore[no-untyped-def]
    """Every refusal carries `{"error": {"message", "type", "param", "code"}}`."""
    if 400 <= response.status_code < 500:
        error = json.loads(response.content)["error"]
        assert set(error) >= {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error


@schema.parametrize()
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_request_gets_a_server_error(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error, openai_shaped_error])
