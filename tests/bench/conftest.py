from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.bench.tokens import TokenCounter
from tests.bench.fake_server import FakeServer


@pytest.fixture(scope="session")
def counter(default_model_dir: Path) -> TokenCounter:
    from transformers import AutoTokenizer

    return TokenCounter(AutoTokenizer.from_pretrained(default_model_dir))


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    with FakeServer() as server:
        yield server
