"""Our forward over the paged KV pool gives Hugging Face's logits on tiny random models."""

from __future__ import annotations

import pytest
import torch

from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput
from tests.executor.tiny import VARIANTS, engine_for, hf_model

TOLERANCE = 1e-4
LENGTHS = [1, 17, 64]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_and_decode_logits_match_hf(variant: str) -> None:
    hf = hf_model(variant)
    engine = engine_for(hf)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in LENGTHS]
    extra = torch.randint(0, 256, (len(prompts), 3), generator=gen).tolist()
    greedy = SamplingParams(temperature=0)
    # Rows get interleaved, non-contiguous slots, so the table really does the addressing.
    slots = torch.randperm(300, generator=gen)[:150].add(1).tolist()
    offsets = [0, 10, 60]
    writes = [
        SlotWrite(r, 0, slots[o : o + n + 3])
        for r, (o, n) in enumerate(zip(offsets, LENGTHS, strict=True))
    ]
    step = StepInput(
        1,
        add=[NewRequest(r, str(r), greedy) for r in range(3)],
        writes=writes,
        slices=[Slice(r, 0, p) for r, p in enumerate(prompts)],
    )
    ours = engine.logits(step)
    for r, p in enumerate(prompts):
        delta = (ours[r] - hf_logits(hf, p)[-1]).abs().max().item()
        assert delta < TOLERANCE, f"{variant} prefill row {r}: max |Δ| {delta:.2e}"
    for k in range(3):
        slices = [Slice(r, len(p) + k, [extra[r][k]]) for r, p in enumerate(prompts)]
        ours = engine.logits(StepInput(2 + k, slices=slices))
        for r, p in enumerate(prompts):
            ref = hf_logits(hf, p + extra[r][: k + 1])[-1]
            delta = (ours[r] - ref).abs().max().item()
            assert delta < TOLERANCE, f"{variant} decode {k} row {r}: max |Δ| {delta:.2e}"


def test_mixed_extend_and_decode_in_one_step() -> None:
    """A prefill chunk and decodes of other requests in the same forward."""
    hf = hf_model("llama")
    engine = engine_for(hf)
    a, b = list(range(10, 50)), list(range(60, 70))
    greedy = SamplingParams(temperature=0)
    engine.logits(
        StepInput(
            1,
            add=[NewRequest(0, "a", greedy), NewRequest(1, "b", greedy)],
            writes=[SlotWrite(0, 0, list(range(1, 60))), SlotWrite(1, 0, list(range(100, 130)))],
            slices=[Slice(0, 0, a[:20], sample=False), Slice(1, 0, b)],
        )
    )
    ours = engine.logits(StepInput(2, slices=[Slice(1, 10, [7]), Slice(0, 20, a[20:])]))
    assert (ours[0] - hf_logits(hf, [*b, 7])[-1]).abs().max() < TOLERANCE
    assert (ours[1] - hf_logits(hf, a)[-1]).abs().max() < TOLERANCE
