"""The samples open on one DetokenizeBatch call, and one message's worth of work on them.

A message opens samples, feeds ids to many, and closes some; `apply` does all of it in one
call, so a whole scheduler step of many samples is detokenized at once (on a thread when large).
A failure belongs to its sample: it is reported as that sample's result and the sample is
closed, while the call and the other samples carry on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from services.tokenizer.errors import InvalidRequest
from services.tokenizer.stream import Delta, DetokenizeOptions, DetokenizeStream


@dataclass(frozen=True)
class Feed:
    sample_id: int
    ids: list[int]
    finish: bool = False


@dataclass
class SessionBatch:
    """One DetokenizeBatchRequest: opens (options, or why they are invalid), feeds, closes."""

    opens: list[tuple[int, DetokenizeOptions | InvalidRequest]] = field(default_factory=list)
    feeds: list[Feed] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)

    @property
    def num_ids(self) -> int:
        return sum(len(f.ids) for f in self.feeds)


# One result per feed, in order: (sample_id, its delta or its failure).
Result = tuple[int, Delta | InvalidRequest]


class DetokenizeSession:
    """Open samples by caller-chosen id. Not thread-safe: one `apply` at a time."""

    def __init__(self, new_stream: Callable[[DetokenizeOptions], DetokenizeStream]) -> None:
        self._new_stream = new_stream
        self.streams: dict[int, DetokenizeStream] = {}
        self._refused: dict[int, InvalidRequest] = {}  # bad opens, reported at their next feed

    def apply(self, batch: SessionBatch) -> list[Result]:
        """Opens, then feeds (one result each), then closes."""
        for sample_id, options in batch.opens:
            self._open(sample_id, options)
        results = [(f.sample_id, self._feed(f)) for f in batch.feeds]
        for sample_id in batch.closes:
            self.streams.pop(sample_id, None)
            self._refused.pop(sample_id, None)
        return results

    def _open(self, sample_id: int, options: DetokenizeOptions | InvalidRequest) -> None:
        if sample_id in self.streams or sample_id in self._refused:
            options = InvalidRequest(f"sample {sample_id} is already open")
        if isinstance(options, InvalidRequest):
            self._refused[sample_id] = options
            return
        self.streams[sample_id] = self._new_stream(options)

    def _feed(self, feed: Feed) -> Delta | InvalidRequest:
        refused = self._refused.pop(feed.sample_id, None)
        if refused is not None:
            return refused
        stream = self.streams.get(feed.sample_id)
        if stream is None:
            return InvalidRequest(f"sample {feed.sample_id} is not open")
        try:
            delta = stream.finish(feed.ids) if feed.finish else stream.feed(feed.ids)
        except InvalidRequest as exc:
            delta = exc
        if isinstance(delta, InvalidRequest) or delta.finished:
            del self.streams[feed.sample_id]
        return delta
