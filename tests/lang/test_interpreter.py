"""The interpreter against a scripted backend (no server): ordering, roles, fork and join,
streaming, batches and errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from radixserve.lang import (
    ServerError,
    assistant,
    function,
    gen,
    select,
    system,
    user,
)
from radixserve.lang.template import ChatTemplate

CHATML = ChatTemplate(
    prefixes={r: f"<{r}>" for r in ("system", "user", "assistant")},
    suffixes={r: f"</{r}>" for r in ("system", "user", "assistant")},
    default_system="<system>default</system>",
)


class Scripted:
    """Answers gen with "out<k>" (k counts calls), streams it in one-character pieces, refuses
    a regex of "(" as the server does, and prefers the choice "b" in select."""

    chat_template = CHATML

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.calls, self.bodies = delay, 0, []
        self.lock = threading.Lock()

    def _answer(self, body: dict[str, Any]) -> str:
        if body.get("sampling_params", {}).get("regex") == "(":
            raise ServerError("/generate", 400, "invalid grammar: unclosed parenthesis")
        time.sleep(self.delay)
        with self.lock:
            self.calls += 1
            self.bodies.append(body)
            return f"out{self.calls}"

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        if "input_ids" in body:  # a select choice
            ids = body["input_ids"][body["logprob_start_len"] :]
            entries = [[-0.1 if i == ord("b") else -2.0, i, None] for i in ids]
            return {"text": "", "meta_info": {"input_token_logprobs": entries,
                                              "output_token_logprobs": []}}  # fmt: skip
        text = self._answer(body)
        return {"text": text, "meta_info": {"completion_tokens": len(text)}}

    def generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for ch in self._answer(body):
            time.sleep(self.delay)
            yield {"text": ch, "meta_info": {"finish_reason": None}}

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        return [[ord(c) for c in p] for p in prompts]


@function
def chat(s: Any, question: str) -> None:
    s += system("sys")
    s += user(question)
    s += assistant(gen("answer", max_tokens=4))


def test_roles_render_with_the_template_and_are_listed_as_messages() -> None:
    backend = Scripted()
    state = chat.run(question="Q", backend=backend, temperature=0.5)
    assert state.text() == "<system>sys</system><user>Q</user><assistant>out1</assistant>"
    assert state.messages() == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "out1"},
    ]
    assert state["answer"] == "out1" and state.get_meta_info("answer") == {"completion_tokens": 4}
    (body,) = backend.bodies
    assert body["text"] == "<system>sys</system><user>Q</user><assistant>"
    assert body["sampling_params"] == {"max_new_tokens": 4, "temperature": 0.5}


def test_a_conversation_without_a_system_block_gets_the_templates_default() -> None:
    @function
    def prog(s: Any) -> None:
        with s.user():
            s += "Hi"
        s += assistant("Hello")

    state = prog.run(backend=Scripted())
    assert state.text() == "<system>default</system><user>Hi</user><assistant>Hello</assistant>"
    assert [m["role"] for m in state.messages()] == ["user", "assistant"]


def test_forks_run_concurrently_and_join_gathers_their_variables() -> None:
    backend = Scripted(delay=0.3)

    @function
    def prog(s: Any) -> Any:
        s += "Start."
        forks = s.fork(3)
        forks += lambda i: f" branch {i}: " + gen("x")
        assert forks[2]["x"].startswith("out")
        forks.join()
        s += " " + select("pick", ["a", "b"])
        return forks

    began = time.monotonic()
    state = prog.run(backend=backend)
    assert time.monotonic() - began < 0.8  # three 0.3 s calls at once, not one after another
    assert sorted(state["x"]) == ["out1", "out2", "out3"]
    assert [f.text().startswith("Start. branch ") for f in state.ret_value] == [True] * 3
    assert state.text() == "Start. b"
    assert state.get_meta_info("pick")["normalized_prompt_logprobs"] == [-2.0, -0.1]


def test_join_gathers_a_variable_from_the_branches_that_set_it() -> None:
    @function
    def prog(s: Any) -> None:
        s["kept"] = "parent"
        forks = s.fork(3)
        forks[1] += gen("only")
        forks += [gen("kept"), "", ""]
        forks.join()
        return forks

    state = prog.run(backend=Scripted())
    assert state["only"] == [state.ret_value[1]["only"]] and state["kept"] == "parent"


def test_concate_and_append_join_appends_the_branches_in_order() -> None:
    @function
    def prog(s: Any) -> None:
        s += "A"
        forks = s.fork(2)
        forks += ["-x", "-y"]
        forks.join("concate_and_append")
        s += "!"

    assert prog.run(backend=Scripted()).text() == "A-x-y!"


def test_streamed_text_arrives_in_pieces_that_add_up_to_the_variable() -> None:
    state = chat.run(question="Q", backend=Scripted(delay=0.1), stream=True)
    pieces = list(state.text_iter("answer"))
    assert "".join(pieces) == "out1" and len(pieces) >= 2  # four pieces 0.1 s apart
    assert "".join(state.text_iter()) == state.text()
    assert state["answer"] == "out1"


def test_a_server_error_is_raised_by_run_and_kept_by_run_batch() -> None:
    @function
    def prog(s: Any, regex: str | None) -> None:
        s += "Q: " + gen("a", regex=regex)

    with pytest.raises(ServerError, match=r"/generate: HTTP 400: invalid grammar") as err:
        prog.run(regex="(", backend=Scripted())
    assert err.value.status == 400 and err.value.message.startswith("invalid grammar")
    good, bad = prog.run_batch([{"regex": None}, {"regex": "("}], backend=Scripted())
    assert good["a"] == "out1" and good.error() is None
    assert isinstance(bad.error(), ServerError)
    with pytest.raises(ServerError):
        bad["a"]
    streamed = prog.run(regex="(", backend=Scripted(), stream=True)
    with pytest.raises(ServerError):
        list(streamed.text_iter())


def test_run_batch_keeps_the_order_of_its_arguments() -> None:
    backend = Scripted(delay=0.05)
    states = chat.run_batch([{"question": f"q{i}"} for i in range(6)], backend=backend)
    assert [s.messages()[1]["content"] for s in states] == [f"q{i}" for i in range(6)]
    assert sorted(s["answer"] for s in states) == [f"out{i}" for i in range(1, 7)]


def test_misuse_is_reported() -> None:
    @function
    def nested(s: Any) -> None:
        s += user(assistant("x"))

    with pytest.raises(ValueError, match="cannot open inside the user block"):
        nested.run(backend=Scripted())
    with pytest.raises(ValueError, match="not both"):
        gen("a", max_tokens=3, max_new_tokens=4)
    assert gen("a", json_schema={"type": "object"}).params.json_schema == '{"type": "object"}'
    state = chat.run(question="Q", backend=Scripted())
    with pytest.raises(RuntimeError, match="has ended"):
        state += "more"
