from __future__ import annotations

from pathlib import Path

import pytest

from services.tokenizer.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    """The default model's tokenizer behind the service's wrapper."""
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(default_model_dir), default_model_dir)
