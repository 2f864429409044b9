"""The `radixserve` command line: which modules each process loads, and the lazily built tools."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from services.cli import build_parser
from services.executor.config import ATTENTION_BACKEND_NAMES

HEAVY = ("torch", "transformers", "xgrammar")


def loaded_after(code: str) -> dict[str, bool]:
    """Which of HEAVY a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY}}}))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("command", "module"),
    [
        ("gateway", "services.gateway.server"),
        ("scheduler", "services.scheduler.server"),
        ("tokenizer", "services.tokenizer.server"),
        ("serve", "services.serve"),
    ],
)
def test_the_services_without_a_model_start_without_torch(command: str, module: str) -> None:
    # The command line of every service is parsed from the whole parser, tools included; the
    # tokenizer imports transformers (and with it torch) only when it loads the tokenizer.
    code = (
        "from services.cli import build_parser\n"
        f"args = build_parser().parse_args([{command!r}])\n"
        f"import {module}\n"
    )
    assert loaded_after(code) == dict.fromkeys(HEAVY, False)


def test_a_tool_is_built_when_it_is_parsed() -> None:
    assert loaded_after("from services.cli import build_parser\nbuild_parser()")["torch"] is False
    args = build_parser().parse_args(["bench-executor", "--dtypes", "float32", "--steps", "3"])
    assert args.func.__module__ == "services.executor.bench"
    assert (args.dtypes, args.steps) == (["float32"], 3)


def test_a_tools_help_lists_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["perplexity", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "usage: radixserve perplexity" in help_text and "--quantization" in help_text


def test_a_tools_bad_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["bench-executor", "--no-such-flag"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_the_attention_backend_flag_offers_exactly_the_registered_backends() -> None:
    from services.executor.attention import ATTENTION_BACKENDS
    from services.executor.attention.base import register

    assert sorted(ATTENTION_BACKENDS) == sorted(ATTENTION_BACKEND_NAMES)
    with pytest.raises(ValueError, match="'flash' is not in"):
        register("flash")
    args = build_parser().parse_args(["executor", "--attention-backend", "triton"])
    assert args.attention_backend == "triton"
