"""The OpenAPI document of the generation routes, generated from the pydantic request models."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from services.gateway.openai_responses import ResponsesRequest
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest

ROUTES: dict[str, tuple[type[BaseModel], str]] = {
    "/v1/chat/completions": (ChatCompletionRequest, "Creates a chat completion (OpenAI)."),
    "/v1/completions": (CompletionRequest, "Creates a text completion (OpenAI)."),
    "/generate": (GenerateRequest, "Generates from text or token ids (SGLang's native API)."),
    "/v1/responses": (ResponsesRequest, "Creates a model response (OpenAI's Responses API)."),
}
_ERROR = {
    "description": "an OpenAI-shaped error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


@functools.cache
def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1: one POST operation per route, its body the request model's JSON schema."""
    models = [(model, "validation") for model, _ in ROUTES.values()]
    refs, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    paths = {}
    for path, (model, summary) in ROUTES.items():
        body = {"application/json": {"schema": refs[(model, "validation")]}}
        paths[path] = {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, "content": body},
                "responses": {"200": {"description": "the answer (JSON or SSE)"}, "4XX": _ERROR},
            }
        }
    schemas = {**defs.get("$defs", {}), "Error": _ERROR_SCHEMA}
    return {
        "openapi": "3.1.0",
        "info": {"title": "radixserve", "version": "1"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
