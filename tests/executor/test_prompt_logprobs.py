"""Prompt logprobs: a flagged slice returns Hugging Face's log-softmax at the next prompt tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.executor.engine import Engine, EngineLimits
from services.executor.sampling_params import SamplingParams
from services.executor.step import (
    NewRequest,
    PromptLogprobs,
    Slice,
    SlotWrite,
    StepInput,
    output_to_pb,
    step_from_pb,
    step_to_pb,
)
from services.executor.validation import StepRejected
from tests.executor.tiny import engine_for, hf_model

TOLERANCE = 1e-4
TOP = 5
PARAMS = SamplingParams(temperature=0, top_logprobs=TOP)


@pytest.fixture(scope="module")
def hf():
    return hf_model("llama")


@pytest.fixture
def engine(hf) -> Engine:
    return engine_for(hf, num_slots=1024, max_rows=8)


def prompt_of(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row p is HF's log-softmax after positions 0..p (predicting p + 1)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)


def assert_matches(
    piece: PromptLogprobs, ref: torch.Tensor, ids: list[int], first: int, k: int = TOP
) -> None:
    """`piece` holds positions first.. of `ids`' prompt logprobs (values for tokens first+1..)."""
    n = len(piece.logprobs)
    targets = torch.tensor(ids[first + 1 : first + 1 + n])
    expected = ref[first : first + n].gather(1, targets[:, None]).squeeze(1)
    got = torch.tensor(piece.logprobs)
    delta = (got - expected).abs().max().item()
    assert delta < TOLERANCE, f"prompt logprobs differ from HF by {delta:.2e}"
    vals, top_ids = ref[first : first + n].topk(k, dim=-1)
    assert piece.top_ids == top_ids.flatten().tolist()
    assert (torch.tensor(piece.top_logprobs) - vals.flatten()).abs().max() < TOLERANCE


def test_whole_prompt_in_one_slice(hf, engine) -> None:
    ids = prompt_of(40)
    out = engine.run_step(
        StepInput(
            1,
            add=[NewRequest(0, "a", PARAMS)],
            writes=[SlotWrite(0, 0, list(range(1, 41)))],
            slices=[Slice(0, 0, ids, logprob_start=0)],
        )
    )
    [piece] = out.prompt_logprobs
    assert piece.row == 0 and len(piece.logprobs) == 39  # positions 0..38 → tokens 1..39
    assert_matches(piece, hf_prompt_logprobs(hf, ids), ids, 0)
    assert len(out.tokens) == 1  # the slice still samples its next token


def test_prompt_over_two_chunks(hf, engine) -> None:
    """A non-final chunk's last position predicts the next chunk's first token."""
    ids = prompt_of(50, seed=2)
    ref = hf_prompt_logprobs(hf, ids)
    first = engine.run_step(
        StepInput(
            1,
            add=[NewRequest(0, "a", PARAMS)],
            writes=[SlotWrite(0, 0, list(range(1, 51)))],
            slices=[Slice(0, 0, ids[:23], sample=False, logprob_start=5, next_token_id=ids[23])],
        )
    )
    second = engine.run_step(StepInput(2, slices=[Slice(0, 23, ids[23:], logprob_start=23)]))
    [a], [b] = first.prompt_logprobs, second.prompt_logprobs
    assert len(a.logprobs) == 18 and len(b.logprobs) == 26  # positions 5..22, 23..48
    assert_matches(a, ref, ids, 5)
    assert_matches(b, ref, ids, 23)


def test_after_a_cached_prefix(hf, engine) -> None:
    """Row 1 points at row 0's KV for the shared prefix and computes only the rest."""
    ids = prompt_of(60, seed=3)
    prefix = list(range(1, 31))
    engine.run_step(
        StepInput(
            1,
            add=[NewRequest(0, "a", PARAMS)],
            writes=[SlotWrite(0, 0, prefix)],
            slices=[Slice(0, 0, ids[:30], sample=False)],
        )
    )
    out = engine.run_step(
        StepInput(
            2,
            add=[NewRequest(1, "b", PARAMS)],
            writes=[SlotWrite(1, 0, prefix + list(range(100, 130)))],
            slices=[Slice(1, 30, ids[30:], logprob_start=30)],
        )
    )
    [piece] = out.prompt_logprobs
    assert piece.row == 1 and len(piece.logprobs) == 29
    assert_matches(piece, hf_prompt_logprobs(hf, ids), ids, 30)


def test_raw_distribution_in_a_mixed_batch(hf, engine) -> None:
    """Penalties, bias and temperature do not touch prompt logprobs; each row gets its own top-k
    count; other slices' logits are unchanged; results come in the Step's slice order."""
    a, b, c = prompt_of(30, seed=4), prompt_of(12, seed=5), prompt_of(20, seed=6)
    odd = SamplingParams(
        temperature=0.7, repetition_penalty=1.5, logit_bias={3: 5.0}, top_logprobs=2, seed=1
    )
    plain = SamplingParams(temperature=0)
    step = StepInput(
        1,
        add=[NewRequest(0, "a", odd, a), NewRequest(1, "b", PARAMS), NewRequest(2, "c", plain)],
        writes=[
            SlotWrite(0, 0, list(range(1, 31))),
            SlotWrite(1, 0, list(range(40, 52))),
            SlotWrite(2, 0, list(range(60, 80))),
        ],
        slices=[
            Slice(2, 0, c),
            Slice(1, 0, b[:1], sample=False, logprob_start=0, next_token_id=b[1]),
            Slice(0, 0, a, logprob_start=10),
        ],
    )
    out = engine.run_step(step)
    pieces = out.prompt_logprobs
    assert [p.row for p in pieces] == [1, 0]
    assert_matches(pieces[0], hf_prompt_logprobs(hf, b), b, 0)
    assert_matches(pieces[1], hf_prompt_logprobs(hf, a), a, 10, k=2)
    alone = engine_for(hf, num_slots=1024, max_rows=8).run_step(
        StepInput(
            1,
            add=[NewRequest(2, "c", plain)],
            writes=[SlotWrite(2, 0, list(range(60, 80)))],
            slices=[Slice(2, 0, c)],
        )
    )
    assert out.tokens[0].token_id == alone.tokens[0].token_id


def test_static_decode_runner_is_not_used(hf) -> None:
    """A batch of one-token slices looks like a decode batch; with prompt logprobs it runs on the
    eager path, which returns their logits."""
    from services.executor.decode_runner import StaticDecodeConfig
    from services.executor.model_config import ModelConfig
    from services.executor.weights import build_model, load_weights

    cfg = ModelConfig.from_dict(hf.config.to_dict())
    model = build_model(cfg, 512, torch.float32, torch.device("cpu"))
    load_weights(model, hf.state_dict().items())
    static = StaticDecodeConfig(max_bs=4, cuda_graph=False)
    engine = Engine(model, cfg, EngineLimits(1024, 4, 512), torch.device("cpu"), "torch", static)
    runner = engine.decode_runner
    assert runner is not None
    runs: list[int] = []
    run = runner.run
    runner.run = lambda batch: runs.append(batch.num_decode) or run(batch)  # type: ignore[method-assign]
    a, b = prompt_of(10, seed=9), prompt_of(12, seed=10)
    engine.run_step(
        StepInput(
            1,
            add=[NewRequest(0, "a", PARAMS), NewRequest(1, "b", PARAMS)],
            writes=[SlotWrite(0, 0, list(range(1, 21))), SlotWrite(1, 0, list(range(30, 50)))],
            slices=[Slice(0, 0, a), Slice(1, 0, b[:10], sample=False)],
        )
    )
    decode = [Slice(0, 10, [], use_last_sampled=True)]
    engine.run_step(StepInput(2, slices=decode))
    assert runs == [1]  # a plain decode batch takes the static path
    flagged = Slice(1, 10, [b[10]], sample=False, logprob_start=10, next_token_id=b[11])
    out = engine.run_step(StepInput(3, slices=[Slice(0, 11, [], use_last_sampled=True), flagged]))
    assert runs == [1] and len(out.tokens) == 1
    [piece] = out.prompt_logprobs
    assert_matches(piece, hf_prompt_logprobs(hf, b), b, 10)


def test_failed_slice_is_contained(hf, engine) -> None:
    """The forward fails for one row: the batch is bisected and the other row's prompt logprobs
    still come back."""
    ids, other = prompt_of(30, seed=7), prompt_of(20, seed=8)
    engine.fault_request_id, engine.fault_stage = "bad", "forward"
    out = engine.run_step(
        StepInput(
            1,
            add=[NewRequest(0, "good", PARAMS), NewRequest(1, "bad", PARAMS)],
            writes=[SlotWrite(0, 0, list(range(1, 31))), SlotWrite(1, 0, list(range(40, 60)))],
            slices=[Slice(0, 0, ids, logprob_start=0), Slice(1, 0, other, logprob_start=0)],
        )
    )
    assert set(out.unwritten) == {1}
    [piece] = out.prompt_logprobs
    assert piece.row == 0
    assert_matches(piece, hf_prompt_logprobs(hf, ids), ids, 0)


def test_round_trip_through_protobuf() -> None:
    step = StepInput(
        3, slices=[Slice(0, 4, [1, 2, 3], sample=False, logprob_start=5, next_token_id=9)]
    )
    assert step_from_pb(step_to_pb(step)) == step
    plain = StepInput(3, slices=[Slice(0, 4, [1, 2, 3])])
    assert step_from_pb(step_to_pb(plain)).slices[0].logprob_start is None
    from services.executor.step import StepOutput

    out = StepOutput(3, prompt_logprobs=[PromptLogprobs(0, [-1.0, -2.0], [7, 8], [-0.5, -0.6])])
    msg = output_to_pb(out)
    assert list(msg.prompt_rows) == [0] and list(msg.prompt_counts) == [2]
    assert list(msg.prompt_top_ids) == [7, 8]


@pytest.mark.parametrize(
    "bad, message",
    [
        (Slice(0, 0, [1, 2, 3], logprob_start=2), "no position"),  # last position, no next token
        (Slice(0, 2, [1, 2, 3], logprob_start=1), "no position"),  # before the slice
        (Slice(0, 0, [1, 2], sample=False, next_token_id=3), "needs logprob_start"),
        (Slice(0, 0, [1, 2], logprob_start=0, next_token_id=3), "needs logprob_start"),
        (Slice(0, 0, [1, 2], sample=False, logprob_start=0, next_token_id=999), "vocabulary"),
    ],
)
def test_invalid_slices_are_rejected(engine, bad: Slice, message: str) -> None:
    step = StepInput(
        1, add=[NewRequest(0, "a", PARAMS)], writes=[SlotWrite(0, 0, [1, 2, 3, 4, 5])], slices=[bad]
    )
    with pytest.raises(StepRejected, match=message):
        engine.run_step(step)
    assert not engine.rows


@pytest.mark.slow
def test_smollm2_matches_hf(default_model_dir: Path) -> None:
    """The real default model in float32, one short prompt in two chunks, against HF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.executor.model_config import ModelConfig
    from services.executor.weights import load_model

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tok("The quick brown fox jumps over the lazy dog. Paris is the capital of")["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    cfg = ModelConfig.from_dir(default_model_dir)
    model = load_model(default_model_dir, cfg, 256, torch.float32, torch.device("cpu"))
    engine = Engine(model, cfg, EngineLimits(512, 2, 256), torch.device("cpu"))
    cut = len(ids) // 2
    first = engine.run_step(
        StepInput(
            1,
            add=[NewRequest(0, "a", PARAMS)],
            writes=[SlotWrite(0, 0, list(range(1, len(ids) + 1)))],
            slices=[Slice(0, 0, ids[:cut], sample=False, logprob_start=0, next_token_id=ids[cut])],
        )
    )
    second = engine.run_step(StepInput(2, slices=[Slice(0, cut, ids[cut:], logprob_start=cut)]))
    ref = hf_prompt_logprobs(hf, ids)
    assert_matches(first.prompt_logprobs[0], ref, ids, 0)
    assert_matches(second.prompt_logprobs[0], ref, ids, cut)
