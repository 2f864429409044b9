"""Generation orchestration over fake clients: stop strings, n > 1, aborts, usage, logprobs."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.errors import Overloaded
from services.gateway.events import Output
from services.gateway.generation import Generation
from services.gateway.metrics import RequestMetrics
from services.gateway.sampling import GenerationInput, SamplingParams, TextOptions
from tests.gateway.fakes import STEP, FakeScheduler, FakeTokenizer, chunks_of, end_of


def run(
    events: list, stop: tuple[str, ...] = (), n: int = 1, top_logprobs: int | None = None
) -> tuple[list[Output], Generation, FakeScheduler, FakeTokenizer]:
    sampling = SamplingParams(
        n=n, max_tokens=64, logprobs=top_logprobs is not None, top_logprobs=top_logprobs or 0
    )
    inp = GenerationInput("req-1", [1, 2, 3], sampling, TextOptions(stop=stop))
    scheduler, tokenizer = FakeScheduler(events), FakeTokenizer()
    gen = Generation(inp, scheduler, tokenizer, RequestMetrics.disabled(), 60.0)  # type: ignore[arg-type]

    async def collect() -> list[Output]:
        return [out async for out in gen.outputs()]

    return asyncio.run(collect()), gen, scheduler, tokenizer


def text_of(outputs: list[Output], index: int = 0) -> str:
    return "".join(o.text for o in outputs if o.index == index)


def reasons(outputs: list[Output]) -> dict[int, str | None]:
    return {o.index: o.finish_reason for o in outputs if o.finish_reason}


def test_plain_generation_ends_with_the_scheduler() -> None:
    outs, gen, scheduler, _ = run([*chunks_of("hello world"), end_of("hello world", "length")])
    assert text_of(outs) == "hello world" and reasons(outs) == {0: "length"}
    assert (gen.usage.prompt_tokens, gen.usage.completion_tokens) == (3, 11)
    assert scheduler.aborted == [] and not scheduler.stream.cancelled


def test_the_finish_comes_with_the_last_tokens() -> None:
    outs, gen, *_ = run([*chunks_of("hello", size=2, logprobs=True), end_of("hello", "length")],
                        top_logprobs=1)  # fmt: skip
    assert [(o.text, o.finish_reason) for o in outs] == [
        ("he", None),
        ("ll", None),
        ("o", "length"),
    ]
    assert [len(o.logprobs) for o in outs] == [2, 2, 1] and outs[-1].matched_stop is None
    assert gen.usage.completion_tokens == 5


def test_a_stop_token_a_step_later_ends_with_an_output_of_its_own() -> None:
    outs, gen, *_ = run([*chunks_of("hi"), STEP, end_of("hi", "stop", stop_token=7)])
    assert [(o.text, o.token_ids, o.finish_reason) for o in outs] == [
        ("hi", [104, 105], None),
        ("", [], "stop"),
    ]
    assert outs[-1].matched_stop == 7 and gen.usage.completion_tokens == 3


def test_held_back_text_is_flushed_with_the_finish() -> None:
    outs, *_ = run([*chunks_of("abXY", size=1), end_of("abXY", "length")], stop=("XYZ",))
    assert [(o.text, o.finish_reason) for o in outs] == [
        ("a", None),
        ("b", None),
        ("", None),
        ("XY", "length"),
    ]


def test_stop_string_aborts_the_request_at_once() -> None:
    text = "hello STOP world and more"
    outs, gen, scheduler, tokenizer = run(
        [*chunks_of(text, logprobs=True), end_of(text, "length")], stop=("STOP",), top_logprobs=1
    )
    assert text_of(outs) == "hello " and reasons(outs) == {0: "stop"}
    assert scheduler.aborted == ["req-1"] and scheduler.stream.cancelled
    # Tokens up to the one completing the stop string are counted; their logprobs only.
    assert gen.usage.completion_tokens == len("hello STOP")
    assert sum(len(o.logprobs) for o in outs) == len("hello STOP")
    assert scheduler.stream.events, "the rest of the stream is never read"
    assert tokenizer.detokenizers[0].finished


def test_stop_in_one_of_two_samples_keeps_the_other_running() -> None:
    a, b = "ab STOP cd", "efghijklmn"
    events = [*chunks_of(a, 0), *chunks_of(b, 1), end_of(b, "stop", 1), end_of(a, "length", 0)]
    outs, gen, scheduler, _ = run(events, stop=("STOP",), n=2)
    assert (text_of(outs, 0), text_of(outs, 1)) == ("ab ", b)
    assert reasons(outs) == {0: "stop", 1: "stop"}
    assert gen.usage.completion_tokens == len("ab STOP") + len(b) + 1
    # Sample 0 is still running at the scheduler when the request ends: it is aborted then.
    assert scheduler.aborted == ["req-1"]


def test_scheduler_error_propagates_and_aborts() -> None:
    with pytest.raises(Overloaded):
        run([Overloaded("queue full")])


def test_consumer_stopping_early_aborts() -> None:
    sampling = SamplingParams(max_tokens=64)
    inp = GenerationInput("req-2", [1], sampling, TextOptions())
    scheduler = FakeScheduler([*chunks_of("abcdefgh"), end_of("abcdefgh", "length")])
    gen = Generation(inp, scheduler, FakeTokenizer(), RequestMetrics.disabled(), 60.0)  # type: ignore[arg-type]

    async def first_only() -> None:
        outputs = gen.outputs()
        await anext(outputs)
        await outputs.aclose()

    asyncio.run(first_only())
    assert scheduler.aborted == ["req-2"] and scheduler.stream.cancelled


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="ab XY", min_size=0, max_size=30),
    stop=st.text(alphabet="ab XY", min_size=1, max_size=3),
    size=st.integers(1, 5),
)
def test_outputs_are_the_text_cut_before_the_first_stop(text: str, stop: str, size: int) -> None:
    outs, *_ = run([*chunks_of(text, size=size), end_of(text, "length")], stop=(stop,))
    cut = text.find(stop)
    expected = text if cut < 0 else text[:cut]
    assert text_of(outs) == expected
    assert reasons(outs) == {0: "length" if cut < 0 else "stop"}
