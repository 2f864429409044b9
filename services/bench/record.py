"""What one request measured: timings, token counts, or why it failed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RequestError:
    # http (status >= 400) | connect | disconnect (stream broken) | incomplete (no [DONE]) |
    # server (an error event in the stream) | protocol (unparsable chunk) | timeout | cancelled
    # (the run's deadline passed) | skipped (an earlier turn of the conversation failed) | client
    kind: str
    message: str
    status: int | None = None  # HTTP status when one was received


@dataclass
class RequestRecord:
    """One request's measurements; times in seconds, `start_s` on the `time.perf_counter` clock."""

    group_id: int
    conversation_id: int
    turn: int
    max_tokens: int
    input_tokens: int = 0  # of the prompt as sent, counted locally (chat: after the template)
    start_s: float = 0.0
    latency_s: float = 0.0  # end to end: sending the request to the end of the stream
    ttft_s: float | None = None  # to the first chunk carrying generated text
    itl_s: list[float] = field(default_factory=list)  # gaps between text-bearing chunks
    output_tokens: int = 0  # the generated text re-tokenized locally
    server_output_tokens: int | None = None  # usage.completion_tokens, for reference only
    finish_reason: str | None = None
    error: RequestError | None = None
    text: str = ""  # the generated text (not written to the JSON file)
    server_cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self, origin_s: float) -> dict[str, Any]:
        """The record for the result file, `start_s` counted from `origin_s` (the run's start)."""
        out = asdict(self)
        del out["text"]
        out["start_s"] = self.start_s - origin_s
        return out
