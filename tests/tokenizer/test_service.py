"""`radixserve tokenizer` as a real process, called through gRPC."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from radixserve.v1 import tokenizer_pb2 as pb
from radixserve.v1 import tokenizer_pb2_grpc as pb_grpc
from tests.procs import ServiceProcess, free_port

pytestmark = pytest.mark.slow

MESSAGES = [
    {"role": "user", "content": "What is 2+2? Answer in one word. 🙂"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def stub(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[pb_grpc.TokenizerStub]:
    port = free_port()
    log = tmp_path_factory.mktemp("tokenizer") / "tokenizer.log"
    args = ["tokenizer", "--model-path", str(default_model_dir), "--port", str(port)]
    with ServiceProcess(args, log) as proc:
        proc.wait_grpc_serving(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.TokenizerStub(channel)
        assert proc.stop() == 0, proc.output()[-2000:]


@pytest.fixture(scope="module")
def hf(default_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_encode(stub: pb_grpc.TokenizerStub, hf) -> None:
    text = "Héllo 世界 🎉"
    assert list(stub.Encode(pb.EncodeRequest(text=text)).ids) == hf.encode(text)
    plain = stub.Encode(pb.EncodeRequest(text=text, add_special_tokens=False)).ids
    assert list(plain) == hf.encode(text, add_special_tokens=False)


def test_apply_chat_template(stub: pb_grpc.TokenizerStub, hf) -> None:
    request = pb.ApplyChatTemplateRequest(messages=[pb.ChatMessage(**m) for m in MESSAGES])
    reply = stub.ApplyChatTemplate(request)
    expected = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)[
        "input_ids"
    ]
    assert list(reply.ids) == expected
    assert reply.prompt == hf.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )


def test_info(stub: pb_grpc.TokenizerStub) -> None:
    info = stub.Info(pb.TokenizerInfoRequest())
    assert (info.vocab_size, list(info.eos_token_ids), info.bos_token_id) == (49152, [2], 1)
    assert info.context_length == 8192 and info.has_chat_template
    assert pb.SpecialToken(id=2, text="<|im_end|>") in info.special_tokens


def test_detokenize_stream_with_stop(stub: pb_grpc.TokenizerStub, hf) -> None:
    ids = [*hf.encode("Sure! 你好 🎉 The END. More text after the end."), 2]
    setup = pb.DetokenizeSetup(
        request_id="r1", stop=["END", "never"], prompt_tail_ids=[1, 520, 9531, 198]
    )
    messages = [pb.DetokenizeRequest(setup=setup)]
    messages += [
        pb.DetokenizeRequest(tokens=pb.DetokenizeTokens(ids=ids[i : i + 2]))
        for i in range(0, len(ids), 2)
    ]
    replies = list(stub.Detokenize(iter(messages)))
    assert "".join(r.text for r in replies) == "Sure! 你好 🎉 The "
    assert not any("\ufffd" in r.text for r in replies)
    last = replies[-1]
    assert last.finished and last.matched_stop == "END" and not replies[0].HasField("matched_stop")
    consumed = sum(r.num_tokens for r in replies)
    assert hf.decode(ids[:consumed]).endswith("END") and len(replies) < len(messages) - 1


def test_detokenize_finish_flushes(stub: pb_grpc.TokenizerStub, hf) -> None:
    ids = hf.encode("tail: STO")
    messages = [
        pb.DetokenizeRequest(setup=pb.DetokenizeSetup(stop=["STOP"], skip_special_tokens=False)),
        pb.DetokenizeRequest(tokens=pb.DetokenizeTokens(ids=ids)),
        pb.DetokenizeRequest(tokens=pb.DetokenizeTokens(ids=[2], finish=True)),
    ]
    replies = list(stub.Detokenize(iter(messages)))
    assert [r.text for r in replies] == ["tail: ", "STO<|im_end|>"]
    assert [r.num_tokens for r in replies] == [len(ids), 1] and replies[-1].finished


def test_detokenize_stops_at_a_stop_regex(stub: pb_grpc.TokenizerStub, hf) -> None:
    ids = hf.encode("Order 66 now")
    messages = [
        pb.DetokenizeRequest(setup=pb.DetokenizeSetup(stop_regex=[r"\d+"])),
        pb.DetokenizeRequest(tokens=pb.DetokenizeTokens(ids=ids)),
    ]
    (reply,) = stub.Detokenize(iter(messages))
    assert (reply.text, reply.matched_stop, reply.finished) == ("Order ", r"\d+", True)
    assert reply.num_tokens < len(ids)
    bad = [pb.DetokenizeRequest(setup=pb.DetokenizeSetup(stop_regex=["("])), messages[1]]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Detokenize(iter(bad)))
    assert "stop_regex" in err.value.details()


def test_invalid_argument(stub: pb_grpc.TokenizerStub) -> None:
    request = pb.ApplyChatTemplateRequest(messages=[pb.ChatMessage(role="", content="hi")])
    with pytest.raises(grpc.RpcError) as err:
        stub.ApplyChatTemplate(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty role" in err.value.details()
    tokens_first = [pb.DetokenizeRequest(tokens=pb.DetokenizeTokens(ids=[1]))]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Detokenize(iter(tokens_first)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_convert_ids_to_tokens(stub: pb_grpc.TokenizerStub, hf) -> None:
    ids = [*hf.encode("🎉 ok", add_special_tokens=False), 2]
    reply = stub.ConvertIdsToTokens(pb.ConvertIdsToTokensRequest(ids=ids))
    assert b"".join(t.bytes for t in reply.tokens) == "🎉 ok<|im_end|>".encode()
    assert reply.tokens[-1].text == "<|im_end|>" and reply.tokens[-2].text == " ok"
    with pytest.raises(grpc.RpcError) as err:
        stub.ConvertIdsToTokens(pb.ConvertIdsToTokensRequest(ids=[10**6]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tools_and_chat_template_kwargs(stub: pb_grpc.TokenizerStub) -> None:
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    request = pb.ApplyChatTemplateRequest(
        messages=[pb.ChatMessage(**MESSAGES[0])],
        tools_json=json.dumps([tool]),
        chat_template_kwargs_json=json.dumps({"enable_thinking": False}),
    )
    prompt = stub.ApplyChatTemplate(request).prompt
    assert f"<tools>\n{json.dumps(tool)}\n</tools>" in prompt and "<tool_call>" in prompt
    request.chat_template_kwargs_json = json.dumps({"add_generation_prompt": False})
    with pytest.raises(grpc.RpcError) as err:
        stub.ApplyChatTemplate(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'add_generation_prompt'" in err.value.details()
