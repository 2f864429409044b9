"""A byte vocabulary for grammar tests on the tiny random models: token i < 255 is the byte i,
255 is EOS, so an output's text is its bytes."""

from __future__ import annotations

import torch
import xgrammar as xgr

from services.executor.engine import Engine
from services.executor.grammar import GrammarRuntime
from tests.executor.tiny import engine_for, hf_model

EOS = 255


def byte_tokenizer_info() -> xgr.TokenizerInfo:
    vocab = [bytes([i]) for i in range(255)] + [b"</s>"]
    return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=256, stop_token_ids=[EOS])


def grammar_engine(max_rows: int = 16, num_slots: int = 4096) -> Engine:
    """A tiny random Llama (vocabulary 256) whose grammars use the byte vocabulary."""
    engine = engine_for(hf_model("llama"), num_slots=num_slots, max_rows=max_rows)
    engine.grammar = GrammarRuntime(byte_tokenizer_info, 256, max_rows, torch.device("cpu"))
    return engine


def text(ids: list[int]) -> str:
    return bytes(t for t in ids if t != EOS).decode()
