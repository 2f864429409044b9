"""One `radixserve serve` with the real default model for the structured-output and tool tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.procs import serving


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Iterator[str]:
    log = tmp_path_factory.mktemp("structured") / "serve.log"
    with serving(log, ["--max-running-requests", "32", "--max-total-tokens", "16384"]) as url:
        yield url


@pytest.fixture(scope="package")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="package")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id
