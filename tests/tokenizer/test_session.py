"""DetokenizeSession: many samples per message, failures confined to their sample."""

from __future__ import annotations

from services.tokenizer.errors import InvalidRequest
from services.tokenizer.session import DetokenizeSession, Feed, SessionBatch
from services.tokenizer.stream import DetokenizeOptions, DetokenizeStream
from tests.gateway.fakes import char_decode, ids_of


def session() -> DetokenizeSession:
    return DetokenizeSession(lambda options: DetokenizeStream(char_decode, options))


def test_one_message_detokenizes_many_samples_as_separate_streams() -> None:
    s = session()
    opens = [(1, DetokenizeOptions(stop=("X",))), (2, DetokenizeOptions())]
    first = s.apply(SessionBatch(opens, [Feed(1, ids_of("abX")), Feed(2, ids_of("ab"))]))
    assert [(i, d.text, d.num_tokens, d.finished) for i, d in first] == [
        (1, "ab", 3, True),
        (2, "ab", 2, False),
    ]
    assert set(s.streams) == {2}  # a finished sample is closed by the server
    last = s.apply(SessionBatch(feeds=[Feed(2, ids_of("c"), finish=True)]))
    assert last[0][1].text == "c" and last[0][1].finished and not s.streams


def test_failures_belong_to_their_sample() -> None:
    s = session()
    bad_options = InvalidRequest("stop strings must not be empty")
    batch = SessionBatch(
        opens=[(1, bad_options), (2, DetokenizeOptions())],
        feeds=[Feed(1, [65]), Feed(2, [-1]), Feed(3, [65]), Feed(4, [66])],
        closes=[4],
    )
    s.apply(SessionBatch(opens=[(4, DetokenizeOptions())]))
    results = dict(s.apply(batch))
    assert results[1] is bad_options
    assert isinstance(results[2], InvalidRequest) and "negative" in str(results[2])
    assert isinstance(results[3], InvalidRequest) and "not open" in str(results[3])
    assert results[4].text == "B"
    assert not s.streams  # 2 failed, 4 was closed after its feed
