from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.bench import cli
from services.cli import build_parser
from tests.bench.fake_server import WORD, FakeServer


def bench(server: FakeServer, model_dir: Path, out: Path, *flags: str) -> dict[str, Any]:
    argv = [
        "bench",
        "--base-url",
        server.url,
        "--tokenizer",
        str(model_dir),
        "--output-file",
        str(out),
    ]
    return cli.main(build_parser().parse_args([*argv, *flags]))


def test_random_run_prints_and_writes_the_summary(
    fake_server: FakeServer,
    default_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "random.json"
    flags = [
        "--num-prompts",
        "6",
        "--random-input-len",
        "32",
        "--random-output-len",
        "4",
        "--max-concurrency",
        "3",
    ]
    summary = bench(fake_server, default_model_dir, out, *flags)
    assert (summary["completed"], summary["errors"], summary["total"]) == (6, 0, 6)
    assert 6 <= summary["total_output_tokens"] <= 24
    assert summary["peak_concurrency"] <= 3 and summary["request_throughput"] > 0
    assert summary["ttft_ms"]["count"] == 6
    printed = capsys.readouterr()
    assert "Serving Benchmark Result" in printed.out and "Median TTFT (ms)" in printed.out
    assert "6/6 completed" in printed.err
    result = json.loads(out.read_text())
    assert result["summary"] == json.loads(json.dumps(summary))
    assert result["model"] == "ok"  # the first id of GET /v1/models
    assert (
        result["config"]["endpoint"] == "completions" and result["config"]["request_rate"] == "inf"
    )
    assert len(result["requests"]) == 6 and all(r["error"] is None for r in result["requests"])
    assert all(0 <= r["start_s"] < summary["duration_s"] for r in result["requests"])
    assert all("prompt" in b for b in fake_server.bodies[-6:])


def test_multi_turn_sends_back_the_answers(
    fake_server: FakeServer, default_model_dir: Path, tmp_path: Path
) -> None:
    flags = ["--dataset", "multi-turn", "--mt-num-conversations", "2", "--mt-turns", "3"]
    flags += ["--mt-turn-input-len", "8", "--mt-output-len", "3", "--warmup-requests", "0"]
    summary = bench(fake_server, default_model_dir, tmp_path / "mt.json", *flags)
    assert (summary["completed"], summary["errors"]) == (6, 0)
    last_turns = [b for b in fake_server.bodies[-6:] if len(b["messages"]) == 5]
    assert len(last_turns) == 2
    for body in last_turns:
        assert [m["role"] for m in body["messages"]] == [
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
        ]
        assert body["messages"][1]["content"] == body["messages"][3]["content"] == WORD * 3


def test_errors_are_counted_not_raised(
    fake_server: FakeServer, default_model_dir: Path, tmp_path: Path
) -> None:
    flags = ["--model", "busy", "--dataset", "generated-shared-prefix", "--gsp-num-groups", "2"]
    flags += [
        "--gsp-prompts-per-group",
        "2",
        "--gsp-system-prompt-len",
        "8",
        "--gsp-question-len",
        "4",
    ]
    summary = bench(
        fake_server, default_model_dir, tmp_path / "busy.json", *flags, "--warmup-requests", "0"
    )
    assert (summary["completed"], summary["errors"], summary["errors_by_kind"]) == (
        0,
        4,
        {"http 503": 4},
    )
    with pytest.raises(ValueError, match="warmup request failed"):
        bench(fake_server, default_model_dir, tmp_path / "busy2.json", *flags)


def test_deadline_cancels_the_rest(
    fake_server: FakeServer, default_model_dir: Path, tmp_path: Path
) -> None:
    flags = [
        "--model",
        "ok",
        "--num-prompts",
        "3",
        "--random-input-len",
        "8",
        "--random-output-len",
        "40",
    ]
    flags += ["--random-range-ratio", "1", "--timeout-s", "0.5", "--warmup-requests", "0"]
    summary = bench(fake_server, default_model_dir, tmp_path / "late.json", *flags)
    assert summary["errors_by_kind"] == {"cancelled": 3}
    assert summary["duration_s"] < 1.5
