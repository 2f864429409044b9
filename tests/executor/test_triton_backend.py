"""A whole forward with the Triton attention backend gives the torch backend's logits and tokens.

Without CUDA the kernels run under Triton's interpreter on the CPU, in float32 (the interpreter
cannot compute in bfloat16); shapes stay tiny because it executes every program in Python.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

import pytest
import torch

from services.executor.attention import ATTENTION_BACKENDS, create_backend, default_backend
from services.executor.decode_runner import StaticDecodeConfig
from services.executor.kv_pool import KVPool, RequestToTokenTable
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, SharedPrefix, Slice, SlotWrite, StepInput
from tests.executor.test_decode_runner import lockstep_logits, make_engine, prompts
from tests.executor.test_shared_prefix import plain, scenario
from tests.executor.tiny import hf_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Float32 throughout; the kernels accumulate in another order than the torch backend's matmuls.
TOLERANCE = 1e-4
GREEDY = SamplingParams(temperature=0)


def _interpret_kernels_without_cuda() -> None:
    """Triton fixes compiled or interpreted mode for a kernel when its module is imported, which
    the triton backend does when it is built: set TRITON_INTERPRET before that. A kernel module
    imported earlier in this session (tests/kernels sets the same variable) is re-imported."""
    if torch.cuda.is_available():
        return
    os.environ["TRITON_INTERPRET"] = "1"
    for name in [m for m in sys.modules if m.startswith("kernels.")]:
        importlib.reload(sys.modules[name])


_interpret_kernels_without_cuda()


def prefix_reuse_steps() -> list[Callable[[dict[int, int]], StepInput]]:
    """Prefill, chunked prefill, prefix reuse through the table and decode, mixed within steps.

    Row 0: prefix P + a (42 tokens). Row 1: its own 20-token prompt in chunks of 12 and 8. Rows 2
    (step 2) and 3 (step 3) map positions 0..36 to row 0's slots of P and compute only their
    suffixes. Each step is built from the rows' last greedy tokens, which its decodes feed.
    """
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (71,), generator=gen).tolist()
    prefix, a, b, c, d = ids[:37], ids[37:42], ids[42:62], ids[62:68], ids[68:71]
    slots0, slots1 = list(range(1, 61)), list(range(100, 140))
    slots2, slots3 = list(range(200, 220)), list(range(300, 320))

    def step1(last: dict[int, int]) -> StepInput:
        return StepInput(
            1,
            add=[NewRequest(0, "a", GREEDY), NewRequest(1, "b", GREEDY)],
            writes=[SlotWrite(0, 0, slots0), SlotWrite(1, 0, slots1)],
            slices=[Slice(0, 0, prefix + a), Slice(1, 0, b[:12], sample=False)],
        )

    def step2(last: dict[int, int]) -> StepInput:
        return StepInput(
            2,
            add=[NewRequest(2, "c", GREEDY)],
            writes=[SlotWrite(2, 0, slots0[:37]), SlotWrite(2, 37, slots2)],
            slices=[Slice(0, 42, [last[0]]), Slice(1, 12, b[12:]), Slice(2, 37, c)],
        )

    def step3(last: dict[int, int]) -> StepInput:
        decodes = [Slice(r, start, [last[r]]) for r, start in ((0, 43), (1, 20), (2, 43))]
        return StepInput(
            3,
            add=[NewRequest(3, "d", GREEDY)],
            writes=[SlotWrite(3, 0, slots0[:37]), SlotWrite(3, 37, slots3)],
            slices=[Slice(3, 37, d), *decodes],
        )

    def step4(last: dict[int, int]) -> StepInput:
        starts = ((0, 44), (1, 21), (2, 44), (3, 40))
        return StepInput(4, slices=[Slice(r, start, [last[r]]) for r, start in starts])

    return [step1, step2, step3, step4]


def test_triton_forward_matches_torch_with_cached_prefixes() -> None:
    hf = hf_model("llama")
    reference = make_engine(hf, device=DEVICE)
    triton = make_engine(hf, device=DEVICE, backend="triton")
    assert triton.attn.name == "triton"
    last: dict[int, int] = {}  # row → its latest greedy token, from the torch backend
    for make_step in prefix_reuse_steps():
        step = make_step(last)
        want, got = reference.logits(step), triton.logits(step)
        assert got.shape == want.shape and got.isfinite().all()
        torch.testing.assert_close(
            got, want, rtol=TOLERANCE, atol=TOLERANCE, msg=f"step {step.step_id}"
        )
        assert torch.equal(got.argmax(-1), want.argmax(-1)), f"step {step.step_id}"
        sampled = [s.row for s in step.slices if s.sample]
        last.update(zip(sampled, want.argmax(-1).tolist(), strict=True))


def test_triton_static_decode_matches_eager_triton() -> None:
    hf = hf_model("llama")
    eager = make_engine(hf, device=DEVICE, backend="triton")
    config = StaticDecodeConfig(max_bs=4, cuda_graph=False)
    static = make_engine(hf, config, device=DEVICE, backend="triton")
    runner = static.decode_runner
    assert runner is not None and runner.attn.static_kv_len(100) == 0
    by_step = zip(
        *lockstep_logits([eager, static], prompts(3, seed=2), decode_steps=2), strict=True
    )
    for i, (want, got) in enumerate(by_step):
        torch.testing.assert_close(got, want, rtol=TOLERANCE, atol=TOLERANCE, msg=f"step {i}")
        assert torch.equal(got.argmax(-1), want.argmax(-1)), f"step {i}"
    # The bucket of 4 ran with its last entry on the padding row and slot.
    assert runner.buffers.rows[3] == static.pad_row and runner.buffers.out_cache_loc[3] == 0


def test_registry_defaults_and_sliding_window() -> None:
    assert {"torch", "triton"} <= set(ATTENTION_BACKENDS)
    assert default_backend("cuda") == "triton"
    assert default_backend("cpu") == "torch"
    pool = KVPool(1, 16, 2, 16, torch.float32, torch.device("cpu"))
    table = RequestToTokenTable(2, 64, torch.device("cpu"))
    dims = dict(num_heads=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="sliding-window"):
        create_backend("triton", pool=pool, table=table, sliding_window=32, **dims)
    within = create_backend("triton", pool=pool, table=table, sliding_window=64, **dims)
    assert within.name == "triton"


def test_triton_shared_prefixes_change_no_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans of 1 to 48 positions over decodes, extends and chunked prefills, rows joining and
    leaving, every span kept: each Step with its spans gives the logits of the same Step
    without them."""
    monkeypatch.setenv("RADIXSERVE_TRITON_SHARED_PREFIX", "always")
    hf = hf_model("llama")
    cascade = make_engine(hf, device=DEVICE, backend="triton")
    reference = make_engine(hf, device=DEVICE, backend="triton")
    grouped = 0
    for step in scenario():
        grouped += sum(len(span.rows) for span in cascade._spans(step))
        got, want = cascade.logits(step), reference.logits(plain(step))
        torch.testing.assert_close(
            got, want, rtol=TOLERANCE, atol=TOLERANCE, msg=f"step {step.step_id}"
        )
        assert torch.equal(got.argmax(-1), want.argmax(-1)), f"step {step.step_id}"
    assert grouped == 23  # the scenario's spans name 23 rows over its Steps, all kept


def test_triton_auto_keeps_decode_groups_outside_captured_graphs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RADIXSERVE_TRITON_SHARED_PREFIX", raising=False)
    pool = KVPool(1, 16, 2, 16, torch.float32, torch.device("cpu"))
    table = RequestToTokenTable(8, 512, torch.device("cpu"))
    attn = create_backend(
        "triton", pool=pool, table=table, num_heads=4, num_kv_heads=2, head_dim=16
    )
    decodes = [Slice(r, 100, [1]) for r in (0, 1, 2)]
    extend = Slice(3, 64, [1] * 8)
    spans = [SharedPrefix(64, [0, 1, 3]), SharedPrefix(100, [2]), SharedPrefix(63, [0, 1])]
    # The extend row leaves its span; a lone row or a span under 64 positions is not grouped.
    assert attn.select_shared_prefixes(spans, [extend, *decodes]) == [SharedPrefix(64, [0, 1])]
    assert attn.select_shared_prefixes(spans[:1], decodes) == [SharedPrefix(64, [0, 1])]
    attn.graph_decode_rows = 3  # a graph replays pure-decode steps of up to 3 rows
    assert attn.select_shared_prefixes(spans[:1], decodes) == []
    assert attn.select_shared_prefixes(spans[:1], [extend, *decodes]) == [SharedPrefix(64, [0, 1])]
    monkeypatch.setenv("RADIXSERVE_TRITON_SHARED_PREFIX", "never")
    never = create_backend(
        "triton", pool=pool, table=table, num_heads=4, num_kv_heads=2, head_dim=16
    )
    assert never.select_shared_prefixes(spans, decodes) == []
    monkeypatch.setenv("RADIXSERVE_TRITON_SHARED_PREFIX", "sometimes")
    with pytest.raises(ValueError, match="RADIXSERVE_TRITON_SHARED_PREFIX"):
        create_backend("triton", pool=pool, table=table, num_heads=4, num_kv_heads=2, head_dim=16)


def test_triton_warmup_compiles_the_span_path_reading_slot_0_only() -> None:
    hf = hf_model("llama")
    engine = make_engine(hf, device=DEVICE, backend="triton")
    engine.pool.k[0][1:].normal_()
    before = [t.clone() for t in (engine.pool.k[0], engine.pool.v[0])]
    engine.attn.warmup_shared_prefixes(engine.dtype, engine.pad_row)
    assert torch.equal(engine.pool.k[0], before[0]) and torch.equal(engine.pool.v[0], before[1])


def _graph_rule_steps() -> tuple[StepInput, StepInput, list[SharedPrefix]]:
    span = [SharedPrefix(64, [0, 1, 2])]
    decodes = [Slice(r, 100, [1]) for r in range(3)]
    mixed = StepInput(1, slices=[Slice(3, 64, [1] * 8), *decodes], shared_prefixes=span)
    return StepInput(1, slices=decodes, shared_prefixes=span), mixed, span


def test_triton_spans_without_captured_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADIXSERVE_TRITON_SHARED_PREFIX", raising=False)
    config = StaticDecodeConfig(max_bs=4, cuda_graph=False)
    engine = make_engine(hf_model("llama"), config, device=DEVICE, backend="triton")
    assert engine.attn.graph_decode_rows == 0
    decode, mixed, span = _graph_rule_steps()
    assert engine._spans(decode) == span and engine._spans(mixed) == span


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_triton_captured_graphs_keep_their_decode_steps_plain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RADIXSERVE_TRITON_SHARED_PREFIX", raising=False)
    config = StaticDecodeConfig(max_bs=4)
    engine = make_engine(hf_model("llama"), config, device="cuda", backend="triton")
    assert engine.attn.graph_decode_rows == 4
    decode, mixed, span = _graph_rule_steps()
    assert engine._spans(decode) == [] and engine._spans(mixed) == span
