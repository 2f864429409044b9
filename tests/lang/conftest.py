"""One `radixserve serve` (float32, the default model, an API key) for the frontend's end-to-end
tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from radixserve.lang import RuntimeEndpoint
from tests.procs import serving

API_KEY = "lang-test-key"


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Iterator[str]:
    with serving(tmp_path_factory.mktemp("lang") / "serve.log", ["--api-key", API_KEY]) as url:
        yield url


@pytest.fixture(scope="package")
def backend(server: str) -> Iterator[RuntimeEndpoint]:
    endpoint = RuntimeEndpoint(server, api_key=API_KEY)
    yield endpoint
    endpoint.close()
