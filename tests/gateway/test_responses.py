"""Response bodies and stream chunks in OpenAI's shapes."""

from __future__ import annotations

import json
from dataclasses import dataclass

from services.gateway.events import Output, TokenLogprob, TokenPiece, Usage
from services.gateway.responses import (
    ChatFormat,
    CompletionFormat,
    Meta,
    NativeFormat,
    NativePrompt,
    ResponseOptions,
    chat_logprobs,
    completion_logprobs,
    join_outputs,
    usage_dict,
)
from services.gateway.sse import DONE, event, sse_stream

META = Meta("id-1", "m", created=123)
USAGE = Usage(prompt_tokens=10, completion_tokens=3, cached_tokens=4)


def lp(text: str, value: float, *alts: tuple[str, float]) -> TokenLogprob:
    piece = TokenPiece(text, text.encode())
    return TokenLogprob(piece, value, [(TokenPiece(t, t.encode()), v) for t, v in alts])


def test_usage_has_cached_tokens() -> None:
    assert usage_dict(USAGE) == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


def test_chat_logprobs_shape() -> None:
    entries = chat_logprobs([lp(" é", -0.1, (" é", -0.1), ("x", float("-inf")))])
    assert entries == [
        {
            "token": " é",
            "logprob": -0.1,
            "bytes": [32, 195, 169],
            "top_logprobs": [
                {"token": " é", "logprob": -0.1, "bytes": [32, 195, 169]},
                {"token": "x", "logprob": -9999.0, "bytes": [120]},
            ],
        }
    ]
    json.dumps(entries, allow_nan=False)


def test_completion_logprobs_shape() -> None:
    body = completion_logprobs([lp("Hi", -0.5, ("Hey", -1.0)), lp("!", -0.2, ("!", -0.2))], 7)
    assert body == {
        "tokens": ["Hi", "!"],
        "token_logprobs": [-0.5, -0.2],
        # The sampled token is always listed, next to the alternatives.
        "top_logprobs": [{"Hey": -1.0, "Hi": -0.5}, {"!": -0.2}],
        "text_offset": [7, 9],
    }


def test_chat_response() -> None:
    outs = [Output(0, "Hel", [1, 2], [lp("Hel", -1.0)]), Output(0, "lo", [3], [], "stop")]
    fmt = ChatFormat(META, n=1, logprobs=True)
    body = fmt.response(join_outputs(outs, 1), USAGE)
    assert body["object"] == "chat.completion" and body["id"] == "id-1" and body["model"] == "m"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello"}
    assert choice["finish_reason"] == "stop" and len(choice["logprobs"]["content"]) == 1
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 4


def test_chat_stream_sequence_with_usage() -> None:
    fmt = ChatFormat(META, n=2, logprobs=False, options=ResponseOptions(include_usage=True))
    chunks = [
        *fmt.opening(USAGE),
        fmt.chunk(Output(1, "a", [97]), USAGE),
        fmt.chunk(Output(0, "", finish_reason="abort"), USAGE),
    ]
    chunks += fmt.closing(USAGE)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""}
    ] * 2
    assert [c["choices"][0]["index"] for c in chunks[:4]] == [0, 1, 1, 0]
    assert chunks[2]["choices"][0]["delta"] == {"content": "a"}
    # A finish with no new text (an abort, a stop token) still gets its chunk.
    assert chunks[3]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "matched_stop": None,
        "finish_reason": "length",
    }
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 13
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert fmt.chunk(Output(0, ""), USAGE) is None


def test_completion_echo_and_batches() -> None:
    options = ResponseOptions(echo=("P0", "Prompt1"))
    fmt = CompletionFormat(META, n=2, logprobs=True, options=options)
    outs = [
        Output(3, "x", [1], [lp("x", -1.0)], "length"),
        Output(0, "y", [2], [lp("y", -2.0)], "stop"),
    ]
    body = fmt.response(join_outputs(outs, 4), USAGE)
    texts = [c["text"] for c in body["choices"]]
    assert texts == ["P0y", "P0", "Prompt1", "Prompt1x"]
    assert body["choices"][3]["logprobs"]["text_offset"] == [len("Prompt1")]
    assert body["object"] == "text_completion"


def test_completion_stream_offsets_follow_the_text() -> None:
    fmt = CompletionFormat(META, n=1, logprobs=True, options=ResponseOptions(echo=("ab",)))
    opening = fmt.opening(USAGE)
    assert opening[0]["choices"][0]["text"] == "ab"
    first = fmt.chunk(Output(0, "cd", [1], [lp("cd", -1.0)]), USAGE)
    second = fmt.chunk(Output(0, "e", [2], [lp("e", -1.0)], "stop"), USAGE)
    assert first["choices"][0]["logprobs"]["text_offset"] == [2]
    assert second["choices"][0]["logprobs"]["text_offset"] == [4]


def test_native_response() -> None:
    fmt = NativeFormat(META, n=1)
    body = fmt.response(join_outputs([Output(0, "hi", [5, 6], [], "length")], 1), USAGE)
    assert body["text"] == "hi" and body["output_ids"] == [5, 6]
    assert body["meta_info"]["finish_reason"] == {"type": "length"}
    assert body["meta_info"]["cached_tokens"] == 4


def test_native_samples_count_their_own_tokens_and_end_with_the_stop_token() -> None:
    """SGLang: each sample's completion_tokens is its own, and output_ids ends with the EOS or
    stop token that ended it (the stop token counts); a stop string adds no id."""
    outs = [
        Output(0, "a", [7], [], "stop", matched_stop=2),
        Output(1, "cc", [8, 8], [], "stop", matched_stop="\n"),
        Output(2, "dddd", [9, 9, 9, 9], [], "length"),
    ]
    body = NativeFormat(META, n=3).response(join_outputs(outs, 3), USAGE)
    assert [b["output_ids"] for b in body] == [[7, 2], [8, 8], [9, 9, 9, 9]]
    assert [b["meta_info"]["completion_tokens"] for b in body] == [2, 2, 4]
    assert all(b["meta_info"]["prompt_tokens"] == USAGE.prompt_tokens for b in body)
    fmt = NativeFormat(META, n=1)
    first = fmt.chunk(Output(0, "a", [7], []), USAGE)
    assert (first["output_ids"], first["meta_info"]["completion_tokens"]) == ([7], 1)
    last = fmt.chunk(Output(0, "", [], [], "stop", matched_stop=2), USAGE)
    assert (last["output_ids"], last["meta_info"]["completion_tokens"]) == ([7, 2], 2)
    assert last["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}


def test_native_batch_gives_each_prompt_its_id_counts_and_prompt_logprobs() -> None:
    """A /generate batch of two prompts with n=2: a list of four bodies, prompt-major; each
    sample names its prompt's request id and prompt_tokens; prompt logprobs are its own
    prompt's; stream events carry the flat index."""

    @dataclass
    class Counted:
        usage: Usage

    prompts = [
        NativePrompt("r-0", [11, 12], ["x", "y"], Counted(Usage(2, 3, 0))),
        NativePrompt("r-1", [21, 22, 23], ["p", "q", "r"], Counted(Usage(3, 1, 1))),
    ]
    fmt = NativeFormat(META, 2, logprobs=True, text_in_logprobs=True, prompts=prompts)
    fmt.batched = True
    first_prompt = [None, TokenLogprob(TokenPiece("y", b"y"), -0.5, [], 12)]
    second_prompt = [None, TokenLogprob(TokenPiece("q", b"q"), -1.5, [], 22), None]
    outs = [
        Output(0, "a", [1], [lp("a", -0.1)], "length", prompt_logprobs=first_prompt),
        Output(1, "bb", [2, 3], [lp("b", -0.2), lp("b", -0.3)], "length"),
        Output(2, "c", [4], [lp("c", -0.4)], "length", prompt_logprobs=second_prompt),
        Output(3, "", [], [], "stop", matched_stop=2),
    ]
    body = fmt.response(join_outputs(outs, 4), USAGE)
    assert isinstance(body, list) and [b["text"] for b in body] == ["a", "bb", "c", ""]
    assert [b["meta_info"]["id"] for b in body] == ["r-0", "r-0", "r-1", "r-1"]
    assert [b["meta_info"]["prompt_tokens"] for b in body] == [2, 2, 3, 3]
    assert [b["meta_info"]["completion_tokens"] for b in body] == [1, 2, 1, 1]
    assert [b["meta_info"]["cached_tokens"] for b in body] == [0, 0, 1, 1]
    assert body[1]["meta_info"]["input_token_logprobs"] == [[None, 11, "x"], [-0.5, 12, "y"]]
    assert body[3]["meta_info"]["input_token_logprobs"] == [
        [None, 21, "p"],
        [-1.5, 22, "q"],
        [None, 23, "r"],
    ]
    event = fmt.chunk(outs[2], USAGE)
    assert event["index"] == 2 and event["meta_info"]["id"] == "r-1"
    assert event["meta_info"]["prompt_tokens"] == 3
    single = NativeFormat(META, 1, prompts=prompts[:1], batched=True)
    assert isinstance(single.response(join_outputs(outs[:1], 1), USAGE), list)  # a batch of one


def test_sse_stream_ends_with_done_and_reports_errors() -> None:
    import asyncio

    from services.gateway.errors import Unavailable

    async def failing():
        yield Output(0, "a")
        raise Unavailable("the scheduler is unavailable: gone")

    async def body() -> list[bytes]:
        fmt = ChatFormat(META, n=1, logprobs=False)
        return [part async for part in sse_stream(fmt, failing(), lambda: USAGE)]

    parts = asyncio.run(body())
    assert parts[-1] == DONE and parts[0].startswith(b"data: {")
    error = json.loads(parts[-2].removeprefix(b"data: "))
    assert error["error"]["code"] == "service_unavailable"
    assert event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()


def test_an_aborted_sample_reports_an_openai_finish_reason() -> None:
    """OpenAI's enum has no "abort": the OpenAI routes report "length"; /generate keeps "abort"."""
    outs = [Output(0, "Hel", [1], [], "abort")]
    chat = ChatFormat(META, n=1, logprobs=False)
    assert chat.response(join_outputs(outs, 1), USAGE)["choices"][0]["finish_reason"] == "length"
    assert chat.chunk(outs[0], USAGE)["choices"][0]["finish_reason"] == "length"
    completion = CompletionFormat(META, n=1, logprobs=False)
    assert (
        completion.response(join_outputs(outs, 1), USAGE)["choices"][0]["finish_reason"] == "length"
    )
    native = NativeFormat(META, n=1).response(join_outputs(outs, 1), USAGE)
    assert native["meta_info"]["finish_reason"] == {"type": "abort"}
