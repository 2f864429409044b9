from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.executor.tiny import hf_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama saved as a Hugging Face directory (safetensors + config)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = hf_model("llama")
    model.config.eos_token_id = 255
    model.generation_config.eos_token_id = 255
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct, converted once into the cache."""
    from services.common.model_store import resolve_model_path

    return resolve_model_path("default")


@pytest.fixture
def traced() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A tracer provider whose finished spans land in the exporter at once."""
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return provider, exported
