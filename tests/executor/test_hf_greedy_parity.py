"""Greedy parity with Hugging Face `generate` on the real SmolLM2-135M-Instruct weights.

In float32 and in bfloat16 (the default on CPUs with AVX-512 BF16; on CPUs with AVX2 but no
AVX-512, `--dtype bfloat16` runs the bfloat16 panel kernels of kernels/cpu/linear_f32.cpp, so the
case runs there too; elsewhere bfloat16 matmuls are torch's emulated ones and it is skipped):
the engine and HF run the same model in the same dtype; a divergence is accepted only where HF's
own top-2 logit gap shows a near-tie: 1e-4 in float32, and in bfloat16 four rounding steps of the
logits (this model's top logits lie in 16..32, where one bfloat16 step is 0.125; the hidden states
carry rounding of the same relative size through 30 layers, so a 2-step gap can flip between two
correct bfloat16 implementations).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.executor.engine import Engine, EngineLimits
from services.executor.factory import cpu_has_bf16
from services.executor.model_config import ModelConfig
from services.executor.packed_linear import can_use_panels16
from services.executor.weights import load_model
from tests.executor.driver import Driver, first_divergence, hf_greedy_batch, top2_gap

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
NEAR_TIE = {"float32": 1e-4, "bfloat16": 0.5, "float32, bfloat16 KV": 0.1}
# At most this many prompts may diverge (each at a verified near-tie). In bfloat16 a near-tie is
# met within 64 tokens by about half the prompts, so there at least two must agree on every token
# (measured: 5 to 8 of 16).
MAX_DIVERGED = {"float32": 2, "bfloat16": 14, "float32, bfloat16 KV": 4}
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a five year old.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
    "What does HTTP stand for?",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is 17 times 23?",
    "Write a Python function that reverses a string.",
    "Name the planets of the solar system.",
    "What is the difference between a list and a tuple?",
    "Tell me a joke about computers.",
    "How do vaccines work? Keep it brief.",
    "Describe a cat using only five words. 🐱",
]


BF16 = pytest.param(
    "bfloat16",
    marks=pytest.mark.skipif(
        not (cpu_has_bf16() or can_use_panels16(torch.bfloat16, torch.device("cpu"))),
        reason="neither AVX-512 BF16 nor the AVX2 bfloat16 panels: torch's emulated matmuls",
    ),
)


@pytest.fixture(scope="module", params=["float32", BF16])
def setup(request, default_model_dir: Path):
    dtype = getattr(torch, request.param)
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    prompts = []
    for i, q in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": q}]
        if i % 4 == 0:
            messages.insert(0, {"role": "system", "content": "You answer concisely."})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(
            list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        )
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=dtype).eval()
    cfg = ModelConfig.from_dir(default_model_dir)
    ctx = 1024
    model = load_model(default_model_dir, cfg, ctx, dtype, torch.device("cpu"))
    engine = Engine(model, cfg, EngineLimits(40_000, 32, ctx), torch.device("cpu"))
    reference = hf_greedy_batch(hf, prompts, NEW_TOKENS)
    return hf, Driver(engine), prompts, reference


def check(hf, prompts, reference, outputs, label: str, dtype: str | None = None) -> None:
    dtype = dtype or str(hf.dtype).removeprefix("torch.")
    agreed = []
    for prompt, expected, got in zip(prompts, reference, outputs, strict=True):
        k = first_divergence(got, expected)
        agreed.append(NEW_TOKENS if k is None else k)
        if k is None:
            continue
        gap = top2_gap(hf, prompt + expected[:k])
        assert gap < NEAR_TIE[dtype], (
            f"{label}: diverges at token {k} with a top-2 gap of {gap:.2e}"
        )
    ties = sum(1 for n in agreed if n < NEW_TOKENS)
    print(
        f"{label} ({dtype}): {ties} of {len(prompts)} prompts diverged at a verified near-tie; "
        f"tokens agreeing before the first divergence: {agreed}"
    )
    assert ties <= MAX_DIVERGED[dtype]


def test_each_prompt_alone(setup) -> None:
    hf, driver, prompts, reference = setup
    outputs = [driver.generate([p], NEW_TOKENS)[0].output for p in prompts]
    check(hf, prompts, reference, outputs, "alone")


def test_all_prompts_in_one_batch(setup) -> None:
    hf, driver, prompts, reference = setup
    outputs = [j.output for j in driver.generate(prompts, NEW_TOKENS)]
    check(hf, prompts, reference, outputs, "batched")


def test_prefill_in_chunks_of_seven(setup) -> None:
    hf, driver, prompts, reference = setup
    outputs = [j.output for j in driver.generate(prompts, NEW_TOKENS, chunk=7)]
    check(hf, prompts, reference, outputs, "chunked")


def test_bfloat16_kv_cache(setup) -> None:
    """The float32 model over a bfloat16 KV cache (--kv-cache-dtype bfloat16) against HF's
    float32 tokens: K and V rounded to bfloat16 move the logits by a few hundredths, so a
    divergence must sit at a top-2 gap under 0.1 (measured: 2 of 16 prompts, at 0.002 and 0.04)."""
    hf, driver, prompts, reference = setup
    if hf.dtype != torch.float32:
        pytest.skip("the bfloat16 cache is for float32 models (a bfloat16 one has it already)")
    model, cfg = driver.engine.model, driver.engine.cfg
    limits = EngineLimits(40_000, 32, 1024, kv_dtype=torch.bfloat16)
    engine = Engine(model, cfg, limits, torch.device("cpu"))
    assert engine.pool.k[0].dtype == torch.bfloat16
    outputs = [j.output for j in Driver(engine).generate(prompts, NEW_TOKENS)]
    check(hf, prompts, reference, outputs, "batched", "float32, bfloat16 KV")
