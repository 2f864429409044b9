"""A tokenizer killed while 8 requests stream, with two tokenizers behind the gateway: every
stream completes, its text exactly its tokens' (real processes, real model)."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import gateway_args, wait_ready
from tests.procs import ServiceProcess, free_port

pytestmark = pytest.mark.slow

PROMPTS = [f"Write a short story about a {thing}." for thing in
           ("cat", "ship", "tree", "river", "robot", "castle", "cloud", "violin")]  # fmt: skip


MAX_TOKENS = 32


def stream_text(base: str, prompt: str) -> tuple[str, bytes, int]:
    """(text, the bytes of its tokens as their logprobs report them, completion tokens)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    text, raw, tokens = "", b"", 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                assert "error" not in chunk, chunk
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk["choices"]:
                    text += c["delta"].get("content") or ""
                    for lp in (c.get("logprobs") or {}).get("content") or []:
                        raw += bytes(lp["bytes"])
            elif line == "data: [DONE]":
                return text, raw, tokens
    raise AssertionError("the stream ended without [DONE]")


def test_streams_survive_a_killed_tokenizer(default_model_dir: Path, tmp_path: Path) -> None:
    model = str(default_model_dir)
    tok_a, tok_b, exe, sch, gw = (free_port() for _ in range(5))
    executor = ["executor", "--model-path", model, "--port", str(exe), "--dtype", "float32",
                "--max-total-tokens", "8192", "--max-running-requests", "16",
                "--context-length", "1024"]  # fmt: skip
    scheduler = ["scheduler", "--executor", f"127.0.0.1:{exe}", "--port", str(sch)]
    gateway = gateway_args(gw, tok_a, sch)
    gateway[gateway.index("--tokenizer") + 1 : gateway.index("--tokenizer") + 2] = [
        f"127.0.0.1:{tok_a}", f"127.0.0.1:{tok_b}",
    ]  # fmt: skip
    with contextlib.ExitStack() as procs:
        tokenizers = [
            procs.enter_context(
                ServiceProcess(["tokenizer", "--model-path", model, "--port", str(p)], tmp_path / f"tok{p}.log")
            )
            for p in (tok_a, tok_b)
        ]  # fmt: skip
        procs.enter_context(ServiceProcess(executor, tmp_path / "executor.log"))
        procs.enter_context(ServiceProcess(scheduler, tmp_path / "scheduler.log"))
        g = procs.enter_context(ServiceProcess(gateway, tmp_path / "gateway.log"))
        base = f"http://127.0.0.1:{gw}"
        wait_ready(g, base)
        results: list[tuple[str, bytes, int] | BaseException] = [("", b"", 0)] * len(PROMPTS)

        def run(i: int) -> None:
            try:
                results[i] = stream_text(base, PROMPTS[i])
            except BaseException as exc:  # reported below
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        threading.Event().wait(1.0)  # the streams are under way
        tokenizers[0].proc.kill()
        for t in threads:
            t.join(120)
        for result in results:
            assert not isinstance(result, BaseException), g.output()[-3000:]
            text, raw, tokens = result
            # Every token once, in order: the text is unbroken across the failover.
            assert tokens == MAX_TOKENS and text == raw.decode()
        assert "again on tokenizer" in g.output()  # the kill did land mid-stream
