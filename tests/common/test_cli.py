"""The `radixserve` command line: which modules each process loads, and the lazily built tools."""

from __future__ import annotations

import argparse
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
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
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


def test_the_commands_help_lists_the_tools_without_building_them() -> None:
    code = (
        "from services.cli import build_parser\n"
        "text = build_parser().format_help()\n"
        "assert 'bench-executor' in text and 'perplexity' in text, text\n"
    )
    assert loaded_after(code)["torch"] is False


def test_a_tool_is_built_when_it_is_parsed() -> None:
    args = build_parser().parse_args(["bench-executor", "--dtypes", "float32", "--steps", "3"])
    assert args.func.__module__ == "services.executor.bench"
    assert (args.dtypes, args.steps) == (["float32"], 3)


def test_a_tools_help_lists_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["perplexity", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "usage: radixserve perplexity" in help_text and "--quantization" in help_text
    # formatted without parsing first (as argparse does for a usage error of the parent)
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert "--steps" in commands.choices["bench-executor"].format_usage()
    assert "--quantization" in commands.choices["perplexity"].format_help()


def test_a_tools_bad_value_is_its_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["bench-executor", "--steps", "x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: radixserve bench-executor" in err and "--steps: invalid int value" in err


def test_the_attention_backend_flag_offers_exactly_the_registered_backends() -> None:
    from services.executor.attention import ATTENTION_BACKENDS
    from services.executor.attention.base import register

    assert sorted(ATTENTION_BACKENDS) == sorted(ATTENTION_BACKEND_NAMES)
    with pytest.raises(ValueError, match="'flash' is not in"):
        register("flash")
    args = build_parser().parse_args(["executor", "--attention-backend", "triton"])
    assert args.attention_backend == "triton"
