"""Fixtures of the scheduler tests that run a real engine over a tiny random Llama."""

from __future__ import annotations

import pytest

from services.executor.sampling_params import SamplingParams
from tests.executor.driver import Driver
from tests.executor.tiny import engine_for, hf_model


@pytest.fixture(scope="module")
def hf():
    return hf_model("llama")


@pytest.fixture(scope="module")
def alone(hf):
    """Greedy tokens of one prompt computed alone (memoized), ignoring EOS."""
    driver = Driver(engine_for(hf, num_slots=4096, max_rows=4))
    memo: dict[tuple, list[int]] = {}

    def run(
        prompt: list[int], max_tokens: int, sampling: SamplingParams | None = None
    ) -> list[int]:
        key = (tuple(prompt), max_tokens, repr(sampling))
        if key not in memo:
            driver.next_slot = 1
            memo[key] = driver.generate([prompt], max_tokens, params=sampling)[0].output
        return memo[key]

    return run
