"""Greedy outputs of the real SmolLM2-135M-Instruct (float32) are unchanged when requests on one
system prompt attend it as a shared prefix (prefill of their own parts, then decode)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from services.executor.engine import Engine, EngineLimits
from services.executor.model_config import ModelConfig
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, SharedPrefix, Slice, SlotWrite, StepInput
from services.executor.weights import load_model

pytestmark = pytest.mark.slow

SYSTEM = (
    "You are a careful assistant for a travel company. Answer in at most two sentences, "
    "mention prices in euros, never invent opening hours, and suggest one alternative "
    "destination when a question is about a crowded city in summer."
)
QUESTIONS = [
    "Is Venice worth visiting in August?",
    "What is a cheap way to get from Paris to Lyon?",
    "Recommend a quiet beach in Portugal.",
    "How long does the ferry to Mallorca take?",
]
NEW_TOKENS = 24


def prompts(model_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for q in QUESTIONS:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def common_prefix(seqs: list[list[int]]) -> int:
    n = 0
    while all(len(s) > n + 1 and s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def generate(engine: Engine, ps: list[list[int]], shared: bool) -> list[list[int]]:
    """Row 0 prefills its prompt; rows 1.. reuse its first P slots and prefill the rest; all
    decode greedily. With `shared`, every step names the P shared positions."""
    p, greedy, span = common_prefix(ps), SamplingParams(temperature=0.0), 1000
    kv = [list(range(1 + r * span, 1 + (r + 1) * span)) for r in range(len(ps))]
    for r in range(1, len(ps)):
        kv[r][:p] = kv[0][:p]
    rows = list(range(1, len(ps)))
    spans = [SharedPrefix(p, rows)] if shared else []
    steps = [
        StepInput(1, add=[NewRequest(0, "0", greedy)], writes=[SlotWrite(0, 0, kv[0])],
                  slices=[Slice(0, 0, ps[0])]),
        StepInput(2, add=[NewRequest(r, str(r), greedy) for r in rows],
                  writes=[SlotWrite(r, 0, kv[r]) for r in rows],
                  slices=[Slice(r, p, ps[r][p:]) for r in rows], shared_prefixes=spans),
    ]  # fmt: skip
    outputs: list[list[int]] = [[] for _ in ps]
    for step in steps:
        for t in engine.run_step(step).tokens:
            outputs[t.row].append(t.token_id)
    everyone = [SharedPrefix(p, list(range(len(ps))))] if shared else []
    for i in range(NEW_TOKENS - 1):
        slices = [Slice(r, len(ps[r]) + i, [], use_last_sampled=True) for r in range(len(ps))]
        step = replace(StepInput(3 + i, slices=slices), shared_prefixes=everyone)
        for t in engine.run_step(step).tokens:
            outputs[t.row].append(t.token_id)
    return outputs


def test_greedy_outputs_unchanged_with_shared_prefixes(
    default_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RADIXSERVE_CPU_EXTEND_ATTENTION", "kernel")  # the spans run, on any CPU
    monkeypatch.setenv("RADIXSERVE_CPU_SHARED_PREFIX", "always")
    ps = prompts(default_model_dir)
    assert common_prefix(ps) >= 40, "the prompts should share the system prompt"
    cfg = ModelConfig.from_dir(default_model_dir)
    model = load_model(default_model_dir, cfg, 1024, torch.float32, torch.device("cpu"))

    def engine() -> Engine:
        return Engine(model, cfg, EngineLimits(8000, 8, 1024), torch.device("cpu"))

    assert generate(engine(), ps, shared=True) == generate(engine(), ps, shared=False)
