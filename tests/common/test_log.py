"""The log set-up every service shares: --log-level, --log-format and the request id on lines."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import datetime

import pytest

from services.cli import build_parser
from services.common.config import from_args
from services.common.log import (
    REQUEST_ID,
    JsonFormatter,
    LogConfig,
    TextFormatter,
    setup_logging,
)
from services.serve import SERVICES, child_commands, config_class


def record(
    msg: str, *args: object, level: int = logging.INFO, **extra: object
) -> logging.LogRecord:
    rec = logging.LogRecord("radixserve.scheduler", level, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def failing_record() -> logging.LogRecord:
    try:
        raise ValueError("bad row")
    except ValueError:
        rec = record("step failed", level=logging.ERROR)
        rec.exc_info = sys.exc_info()
        return rec


def test_a_json_line_has_the_documented_keys_and_nothing_else() -> None:
    line = JsonFormatter("scheduler").format(record("admitted %d", 3))
    entry = json.loads(line)
    assert "\n" not in line
    assert set(entry) == {"time", "level", "service", "logger", "message"}
    assert (entry["level"], entry["service"], entry["logger"], entry["message"]) == (
        "INFO",
        "scheduler",
        "radixserve.scheduler",
        "admitted 3",
    )
    assert datetime.fromisoformat(entry["time"]).utcoffset() is not None  # ISO 8601, zoned


def test_a_json_line_about_a_request_carries_its_id_and_fields() -> None:
    fmt = JsonFormatter("gateway")
    entry = json.loads(fmt.format(record("done", request_id="my-req-1", fields={"status": 200})))
    assert entry["request_id"] == "my-req-1" and entry["status"] == 200
    token = REQUEST_ID.set("from-context")
    try:
        assert json.loads(fmt.format(record("x")))["request_id"] == "from-context"
        explicit = json.loads(fmt.format(record("x", request_id="explicit")))
        assert explicit["request_id"] == "explicit"
    finally:
        REQUEST_ID.reset(token)
    assert "request_id" not in json.loads(fmt.format(record("x")))


def test_fields_never_hide_the_standard_keys() -> None:
    entry = json.loads(JsonFormatter("gateway").format(record("m", fields={"level": "fake"})))
    assert entry["level"] == "INFO"


def test_a_json_line_with_an_exception_carries_the_traceback_on_the_same_line() -> None:
    line = JsonFormatter("executor").format(failing_record())
    entry = json.loads(line)
    assert "\n" not in line
    assert (
        entry["exception"].startswith("Traceback") and "ValueError: bad row" in entry["exception"]
    )


def test_a_text_line_shows_time_level_service_request_and_fields() -> None:
    line = TextFormatter("gateway").format(
        record("request finished", request_id="r-1", fields={"status": 200, "ttft_ms": 4.5})
    )
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d INFO gateway: \[r-1\] request finished status=200 ttft_ms=4\.5", line
    ), line
    plain = TextFormatter("tokenizer").format(record("ready"))
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO tokenizer: ready", plain), plain
    lines = TextFormatter("executor").format(failing_record()).splitlines()
    assert lines[0].endswith("ERROR executor: step failed") and lines[-1] == "ValueError: bad row"


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    ours = logging.getLogger("radixserve")
    handlers, level, our_level = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_logs_from_the_chosen_level_up_in_the_chosen_format(
    restored_logging: None, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    log = setup_logging("scheduler", LogConfig(log_level="warning", log_format=fmt))
    log.info("not shown")
    log.warning("shown")
    logging.getLogger("grpc").info("a library's info is not shown either")
    (line,) = capsys.readouterr().err.splitlines()
    if fmt == "json":
        assert json.loads(line)["message"] == "shown"
    else:
        assert line.endswith("WARNING scheduler: shown")


def test_debug_shows_radixserves_debug_lines_but_not_every_librarys(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    log = setup_logging("scheduler", LogConfig(log_level="debug"))
    log.debug("admitted")
    # A library logger no other test configures (uvicorn's own are set up by uvicorn itself).
    logging.getLogger("some_library.core").debug("Loaded running loop")
    logging.getLogger("some_library.core").info("Started server process")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["admitted", "Started server process"]


def test_every_service_takes_the_level_from_its_variable_then_its_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RADIXSERVE_LOG_LEVEL", "DEBUG")  # upper case, as it was read before
    for name, spec in SERVICES:
        cls = config_class(spec)
        assert from_args(cls, build_parser().parse_args([name])).log_level == "debug"
        flagged = build_parser().parse_args([name, "--log-level", "error", "--log-format", "json"])
        cfg = from_args(cls, flagged)
        assert (cfg.log_level, cfg.log_format) == ("error", "json")
    monkeypatch.delenv("RADIXSERVE_LOG_LEVEL")
    assert from_args(LogConfig, build_parser().parse_args(["models"])).log_level == "info"


def test_a_bad_level_or_format_is_refused_naming_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gateway", "--log-level", "verbose"])
    monkeypatch.setenv("RADIXSERVE_LOG_LEVEL", "verbose")
    with pytest.raises(ValueError, match="--log-level"):
        from_args(LogConfig, build_parser().parse_args(["tokenizer"]))
    with pytest.raises(ValueError, match="--log-format"):
        LogConfig(log_format="xml")


def test_serve_hands_its_log_flags_to_every_service() -> None:
    args = build_parser().parse_args(
        ["serve", "--log-level", "debug", "--log-format", "json", "--log-requests", "--access-log"]
    )
    commands = dict(child_commands(args))
    assert set(commands) == {"tokenizer", "executor", "scheduler", "gateway"}
    for argv in commands.values():
        flags = " ".join(argv)
        assert "--log-level debug" in flags and "--log-format json" in flags
    assert "--log-requests" in commands["gateway"] and "--access-log" in commands["gateway"]
