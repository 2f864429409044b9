"""One logging set-up for every service: text or JSON lines on stderr, at --log-level.

Text (`--log-format text`): `12:00:01 INFO gateway: [my-req-1] message`, the request id in
brackets when the line is about one request, a traceback on the lines after. JSON
(`--log-format json`): one object per line with `time` (ISO 8601, UTC), `level`, `service`,
`logger`, `message`, `request_id` when the line is about one request, `exception` (the traceback)
when there is one, and the line's own `fields`.

A line is about a request when it is logged with `extra={"request_id": ...}` (the scheduler,
executor and tokenizer do so) or while `REQUEST_ID` is set (the gateway sets it while it handles
a request, the tokenizer while it encodes or renders a template for one). `extra={"fields":
{...}}` gives a line named values: top-level keys in JSON, `key=value` pairs after the message in
text.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from services.common.config import option

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# The request the current task works for (set by the gateway around each request it handles).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# The gRPC metadata key that carries it on the gateway's unary tokenizer calls (keys are lower
# case in gRPC); the tokenizer sets REQUEST_ID from it while it serves the call.
REQUEST_ID_METADATA = "x-request-id"


@dataclass(frozen=True)
class LogConfig:
    """The logging options of every service; each service's config extends it."""

    log_level: str = option("info", "least severe level logged", LOG_LEVELS)
    log_format: str = option("text", "text lines, or json: one JSON object per line", LOG_FORMATS)

    def __post_init__(self) -> None:
        # The variable may be upper case (as it was before the flag existed); the flag may not.
        object.__setattr__(self, "log_level", self.log_level.lower())
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")


def setup_logging(service: str, cfg: LogConfig) -> logging.Logger:
    """Sends every logger's lines to stderr in `cfg`'s format, from `cfg`'s level up (replacing
    any earlier set-up); returns the service's logger. Other libraries' loggers stay at info and
    above (at debug, gRPC alone writes a line per call)."""
    handler = logging.StreamHandler()
    formatter = JsonFormatter if cfg.log_format == "json" else TextFormatter
    handler.setFormatter(formatter(service))
    level = logging.getLevelName(cfg.log_level.upper())
    logging.basicConfig(level=max(level, logging.INFO), handlers=[handler], force=True)
    logging.getLogger("radixserve").setLevel(level)
    return logging.getLogger(f"radixserve.{service}")


def request_id_of(record: logging.LogRecord) -> str | None:
    """The request a line is about: its `request_id` extra, else the current task's request."""
    return getattr(record, "request_id", None) or REQUEST_ID.get()


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    return getattr(record, "fields", None) or {}


class TextFormatter(logging.Formatter):
    """`HH:MM:SS LEVEL service: [request id] message key=value …`, then any traceback."""

    def __init__(self, service: str) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        rid = request_id_of(record)
        parts = [
            self.formatTime(record, self.datefmt),
            record.levelname,
            f"{self.service}:",
            *([f"[{rid}]"] if rid else []),
            record.getMessage(),
            *(f"{key}={value}" for key, value in _fields_of(record).items()),
        ]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module's docstring for its keys)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id_of(record)
        if rid:
            entry["request_id"] = rid
        for key, value in _fields_of(record).items():
            entry.setdefault(key, value)  # never hides one of the keys above
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)
