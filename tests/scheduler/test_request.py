"""GenerateRequest validation and conversion at the API edge."""

from __future__ import annotations

import pytest

from radixserve.v1 import scheduler_pb2 as pb
from services.scheduler import convert
from services.scheduler.errors import InvalidRequest
from services.scheduler.request import FinishReason, Limits, resolve_seed
from services.scheduler.streams import Chunk, Complete, Failure

LIMITS = Limits(
    vocab_size=256,
    context_length=512,
    num_kv_slots=4096,
    max_top_logprobs=5,
    eos_token_ids=frozenset({255}),
)


def request(**sampling: object) -> pb.GenerateRequest:
    fields = dict(temperature=0.0, top_p=1.0, repetition_penalty=1.0, max_tokens=16, n=1)
    fields.update(sampling)
    prompt = fields.pop("prompt", [1, 2, 3])
    return pb.GenerateRequest(
        request_id="r1", input_ids=prompt, sampling=pb.SamplingOptions(**fields)
    )


def test_every_field_converts() -> None:
    msg = request(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        seed=42,
        logit_bias={7: -100.0},
        logprobs=True,
        top_logprobs=3,
        max_tokens=32,
        min_tokens=2,
        stop_token_ids=[9, 10],
        ignore_eos=True,
        n=3,
    )
    p = convert.params_from_pb(msg)
    p.validate(LIMITS)
    s, st = p.sampling, p.stop
    assert (p.request_id, p.input_ids, p.n) == ("r1", [1, 2, 3], 3)
    assert (s.temperature, s.top_k, s.seed, s.logit_bias, s.top_logprobs) == (
        pytest.approx(0.7),
        40,
        42,
        {7: -100.0},
        3,
    )
    assert (st.max_tokens, st.min_tokens, st.stop_token_ids, st.ignore_eos) == (
        32,
        2,
        frozenset({9, 10}),
        True,
    )


def test_unset_seed_is_random_and_set_seed_offsets_by_index() -> None:
    assert convert.params_from_pb(request()).sampling.seed is None
    assert resolve_seed(None, 0) != resolve_seed(None, 0)
    assert [resolve_seed(42, i) for i in range(3)] == [42, 43, 44]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": []}, "input_ids must not be empty"),
        ({"prompt": [256]}, "input_ids must be in [0, 256)"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"min_tokens": 20}, "min_tokens (20) exceeds max_tokens (16)"),
        ({"n": 0}, "n must be at least 1"),
        ({"top_logprobs": 6}, "top_logprobs must be in [0, 5]"),
        ({"stop_token_ids": [300]}, "stop_token_ids"),
        ({"logit_bias": {999: 1.0}}, "logit_bias"),
        (
            {"prompt": [1] * 500, "max_tokens": 20},
            "has 500 tokens and max_tokens is 20: 520 exceeds the context length 512",
        ),
    ],
)
def test_invalid_requests_name_the_problem(fields: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=None) as info:
        convert.params_from_pb(request(**fields)).validate(LIMITS)
    assert message in str(info.value)


def test_sampling_is_required() -> None:
    with pytest.raises(InvalidRequest, match="sampling is required"):
        convert.params_from_pb(pb.GenerateRequest(request_id="x", input_ids=[1]))


def test_events_convert() -> None:
    chunk = convert.event_to_pb(Chunk(1, [4, 5], [-0.1, -0.2], [], [], 3, 2, 1))
    assert chunk.WhichOneof("event") == "chunk" and list(chunk.chunk.token_ids) == [4, 5]
    stop = convert.event_to_pb(Complete(0, FinishReason.STOP, 255, 3, 4, 0)).complete
    assert (stop.reason, stop.matched_stop_token) == (pb.FINISH_REASON_STOP, 255)
    length = convert.event_to_pb(Complete(0, FinishReason.LENGTH, None, 3, 4, 0)).complete
    assert length.reason == pb.FINISH_REASON_LENGTH and not length.HasField("matched_stop_token")
    err = convert.event_to_pb(Failure(14, "lost")).error
    assert (err.code, err.message) == (14, "lost")
