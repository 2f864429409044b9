"""Single tokens as logprobs show them: text alone and exact bytes."""

from __future__ import annotations

import pytest

from services.tokenizer.errors import InvalidRequest
from services.tokenizer.tokenizer import Tokenizer


def test_pieces_of_plain_and_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" world,", add_special_tokens=False)
    pieces = tokenizer.token_pieces([*ids, 2])
    assert [text for text, _ in pieces] == [" world", ",", "<|im_end|>"]
    assert [raw for _, raw in pieces] == [b" world", b",", b"<|im_end|>"]


def test_bytes_of_split_characters_join_to_the_utf8(tokenizer: Tokenizer) -> None:
    text = "🎉 你好"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = tokenizer.token_pieces(ids)
    assert b"".join(raw for _, raw in pieces) == text.encode()
    assert any("\ufffd" in piece for piece, _ in pieces)


def test_out_of_range_ids_are_refused(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidRequest, match="token ids must be in"):
        tokenizer.token_pieces([tokenizer.info.vocab_size])
