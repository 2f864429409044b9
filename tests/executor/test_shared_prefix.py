"""Shared-prefix (cascade) attention changes no logits: the same Steps with and without
`shared_prefixes` give the same logits, through the C++ kernels and the PyTorch fallback."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from kernels.cpu import cascade as cascade_kernels
from kernels.cpu.build import cpu_flags
from services.executor.attention import torch_backend
from services.executor.engine import Engine
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, SharedPrefix, Slice, SlotWrite, StepInput
from tests.executor.tiny import engine_for, hf_model

GREEDY = SamplingParams(temperature=0)
P = 48  # the shared cached prefix


class Script:
    """Rows with their KV slots, handing out fresh slots as tokens are computed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.kv: dict[int, list[int]] = {}
        self.next_slot = 1
        self.step_id = 0

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(256) for _ in range(n)]

    def step(
        self,
        add: dict[int, tuple[int, int]] | None = None,  # row -> (source row, shared length)
        compute: dict[int, int | tuple[int, bool]] | None = None,  # row -> tokens (, sample)
        shared: list[tuple[int, list[int]]] | None = None,
        release: list[int] | None = None,
    ) -> StepInput:
        self.step_id += 1
        step = StepInput(self.step_id, release_rows=list(release or []))
        for row in step.release_rows:
            del self.kv[row]
        for row, (src, n) in (add or {}).items():
            self.kv[row] = list(self.kv[src][:n]) if n else []
            step.add.append(NewRequest(row, str(row), GREEDY))
            if n:
                step.writes.append(SlotWrite(row, 0, list(self.kv[row])))
        for row, spec in (compute or {}).items():
            n, sample = spec if isinstance(spec, tuple) else (spec, True)
            start, slots = len(self.kv[row]), list(range(self.next_slot, self.next_slot + n))
            self.next_slot += n
            self.kv[row] += slots
            step.writes.append(SlotWrite(row, start, slots))
            step.slices.append(Slice(row, start, self.ids(n), sample=sample))
        step.shared_prefixes = [SharedPrefix(n, rows) for n, rows in shared or []]
        return step


def scenario(seed: int = 0) -> list[StepInput]:
    """Prefill of a shared prefix, rows joining on it (extend, chunked), decodes over spans of
    length 1, exactly a row's start, the whole prefix and shorter ones; rows leaving and joining;
    unshared rows beside shared ones."""
    s = Script(seed)
    return [
        s.step(add={0: (0, 0), 4: (4, 0)}, compute={0: P + 5, 4: 30}),
        s.step(
            add={1: (0, P), 2: (0, P), 3: (0, P - 8)},
            compute={0: 1, 1: 7, 2: 1, 3: (10, False), 4: 1},
            shared=[(P, [0, 1, 2]), (P - 8, [3])],
        ),
        s.step(compute={0: 1, 1: 1, 2: 1, 3: 6, 4: 1}, shared=[(P, [0, 1]), (1, [2, 3])]),
        s.step(
            release=[1],
            add={5: (0, P)},
            compute={5: 4, 0: 1, 2: 1, 3: 1, 4: 1},
            shared=[(P - 10, [0, 2, 3, 5])],
        ),
        s.step(
            compute={0: 1, 2: 1, 3: 1, 4: 1, 5: 1}, shared=[(P, [0, 2, 5]), (P - 8, [3]), (20, [4])]
        ),
        s.step(
            release=[2],
            add={1: (1, 0)},
            compute={1: 20, 0: 1, 3: 1, 4: 1, 5: 1},
            shared=[(P, [0, 5]), (P - 8, [3])],
        ),
        s.step(compute={0: 1, 1: 1, 3: 1, 4: 1, 5: 1}, shared=[(P - 8, [0, 3, 5])]),
    ]


def plain(step: StepInput) -> StepInput:
    return replace(step, shared_prefixes=[])


def engines(variant: str, dtype: torch.dtype) -> tuple[Engine, Engine]:
    hf = hf_model(variant)
    return engine_for(hf, dtype=dtype), engine_for(hf, dtype=dtype)


CASES = {
    # head_dim 64: every part through the C++ kernels
    "kernels-fp32": ("gqa3-hd64", torch.float32, 1e-4),
    "kernels-bf16": ("gqa3-hd64", torch.bfloat16, 2e-2),
    # head_dim 16: C++ decode, PyTorch shared span and extend
    "mixed-fp32": ("llama", torch.float32, 1e-4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_without_shared_prefixes(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The C++ extend kernel (where AMX is present, bfloat16 extends default to SDPA, without spans),
    # attending every span the Step names.
    monkeypatch.setenv("RADIXSERVE_CPU_EXTEND_ATTENTION", "kernel")
    monkeypatch.setenv("RADIXSERVE_CPU_SHARED_PREFIX", "always")
    variant, dtype, tol = CASES[case]
    cascade, reference = engines(variant, dtype)
    assert cascade.attn.supports_shared_prefixes
    for step in scenario():
        ours, ref = cascade.logits(step), reference.logits(plain(step))
        delta = (ours - ref).abs().max().item()
        assert delta < tol, f"step {step.step_id}: max |Δ| {delta:.2e}"


def test_pytorch_fallback_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    cascade, reference = engines("gqa3-hd64", torch.float32)
    assert not cascade.attn.use_cpu_kernel  # type: ignore[attr-defined]
    for step in scenario(seed=1):
        delta = (cascade.logits(step) - reference.logits(plain(step))).abs().max().item()
        assert delta < 1e-4, f"step {step.step_id}: max |Δ| {delta:.2e}"


def test_sdpa_extends_run_the_spans_as_plain_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXSERVE_CPU_EXTEND_ATTENTION", "sdpa")
    cascade, reference = engines("gqa3-hd64", torch.bfloat16)
    assert not cascade.attn.supports_shared_prefixes  # the engine drops the spans
    for step in scenario(seed=3):
        assert torch.equal(cascade.logits(step), reference.logits(plain(step)))


def test_greedy_tokens_identical_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXSERVE_CPU_EXTEND_ATTENTION", "kernel")  # the spans run, on any CPU
    monkeypatch.setenv("RADIXSERVE_CPU_SHARED_PREFIX", "always")
    cascade, reference = engines("gqa3-hd64", torch.float32)
    assert cascade.attn.supports_shared_prefixes
    for step in scenario(seed=2):
        a, b = cascade.run_step(step), reference.run_step(plain(step))
        assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]
    # Decodes of the sampled tokens, with the shared group changing every step.
    rows = sorted(cascade.rows)
    groups = [[(P - 8, [0, 3, 5])], [(P, [0, 5])], [(1, [0, 3, 5]), (3, [4])], []]
    for k, spans in enumerate(groups * 3):
        slices = [Slice(r, _length(cascade, r), [], use_last_sampled=True) for r in rows]
        shared = [SharedPrefix(n, rs) for n, rs in spans]
        step = StepInput(100 + k, slices=slices, shared_prefixes=shared)
        step.writes = [
            SlotWrite(r, s.start, [2000 + 10 * k + r]) for r, s in zip(rows, slices, strict=True)
        ]
        a, b = cascade.run_step(step), reference.run_step(plain(step))
        assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]


def _length(engine: Engine, row: int) -> int:
    """Positions row holds: the nonzero prefix of its table row."""
    return int((engine.table.table[row] != 0).sum())


def _decodes(rows: list[int]) -> list[Slice]:
    return [Slice(r, 3000, [], use_last_sampled=True) for r in rows]


def test_cpu_kernels_keep_the_spans_that_pay(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default the C++ kernels attend a span once per group only for its decode rows, when
    there are SPAN_MIN_ROWS of them over SPAN_MIN_LENGTH positions (the measured break-even on
    AVX-512 CPUs); on CPUs without AVX-512 the AVX2 decode kernel's grouped form takes groups of
    GROUPED_SPAN_MIN_ROWS over GROUPED_SPAN_MIN_LENGTH, and without it none is kept."""
    monkeypatch.setenv("RADIXSERVE_CPU_EXTEND_ATTENTION", "kernel")
    attn = engine_for(hf_model("gqa3-hd64")).attn
    assert attn.avx512 == ("avx512f" in cpu_flags().split())
    assert attn.grouped_decode == cascade_kernels.reads_spans_once(64)
    rows, length = torch_backend.SPAN_MIN_ROWS, torch_backend.SPAN_MIN_LENGTH
    slices = [*_decodes(list(range(rows + 1))), Slice(20, 2100, [1, 2, 3])]  # row 20 extends
    paying = [SharedPrefix(length, list(range(rows)))]
    attn.avx512 = attn.grouped_decode = False
    assert attn.select_shared_prefixes(paying, slices) == []
    attn.grouped_decode = True
    select = attn.select_shared_prefixes
    few = torch_backend.GROUPED_SPAN_MIN_ROWS
    short = torch_backend.GROUPED_SPAN_MIN_LENGTH
    assert select([SharedPrefix(short, [*range(few), 20])], slices) == [
        SharedPrefix(short, list(range(few)))
    ]
    assert select([SharedPrefix(short - 1, list(range(few)))], slices) == []
    assert select([SharedPrefix(short, [*range(few - 1), 20])], slices) == []
    attn.grouped_decode = False
    attn.avx512 = True
    select = attn.select_shared_prefixes
    assert select([SharedPrefix(length, [*range(rows), 20])], slices) == [
        SharedPrefix(length, list(range(rows)))
    ]
    assert select([SharedPrefix(length - 1, list(range(rows)))], slices) == []
    assert select([SharedPrefix(length, [*range(rows - 1), 20])], slices) == []
    both = [SharedPrefix(length, list(range(rows))), SharedPrefix(length + 5, [rows, 20])]
    assert select(both, slices) == both[:1]


@pytest.mark.parametrize("mode", ["always", "never"])
def test_shared_prefix_mode_overrides_the_rule(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXSERVE_CPU_EXTEND_ATTENTION", "kernel")
    monkeypatch.setenv("RADIXSERVE_CPU_SHARED_PREFIX", mode)
    attn = engine_for(hf_model("gqa3-hd64")).attn
    spans = [SharedPrefix(40, [0, 1]), SharedPrefix(9, [2, 3])]
    assert attn.select_shared_prefixes(spans, _decodes([0, 1, 2, 3])) == (
        spans if mode == "always" else []
    )


def test_shared_prefix_mode_must_be_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXSERVE_CPU_SHARED_PREFIX", "sometimes")
    with pytest.raises(ValueError, match="RADIXSERVE_CPU_SHARED_PREFIX='sometimes'"):
        engine_for(hf_model("gqa3-hd64"))


def test_logits_match_with_the_default_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the break-even lowered to this scenario's sizes, the default rule keeps some spans'
    decode rows and drops the rest, and the logits stay those of the plain Steps (the rule as on
    AVX-512 CPUs; the kernels are this CPU's own)."""
    monkeypatch.setenv("RADIXSERVE_CPU_EXTEND_ATTENTION", "kernel")
    monkeypatch.setattr(torch_backend, "SPAN_MIN_ROWS", 2)
    monkeypatch.setattr(torch_backend, "SPAN_MIN_LENGTH", P - 8)
    cascade, reference = engines("gqa3-hd64", torch.float32)
    cascade.attn.avx512 = True  # type: ignore[attr-defined]
    cascade.attn.grouped_decode = False  # type: ignore[attr-defined]
    kept = 0
    for step in scenario(seed=4):
        kept += len(cascade.attn.select_shared_prefixes(step.shared_prefixes, step.slices))
        delta = (cascade.logits(step) - reference.logits(plain(step))).abs().max().item()
        assert delta < 1e-4, f"step {step.step_id}: max |Δ| {delta:.2e}"
    assert kept >= 3


def count_decode_groups(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A one-item list counting the batches of `engine` whose decode rows then run as decode
    groups (KernelCascadeDecode) in one call per layer."""
    grouped = [0]
    original = engine.attn.init_metadata

    def init_metadata(batch):  # type: ignore[no-untyped-def]
        original(batch)
        grouped[0] += isinstance(batch.attn_metadata.decode, torch_backend.KernelCascadeDecode)

    monkeypatch.setattr(engine.attn, "init_metadata", init_metadata)
    return grouped


def test_amx_decode_groups_match_without_shared_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the AMX attention kernel runs (bfloat16), the default rule keeps the spans' decode
    rows (its break-even lowered to this scenario's sizes) and runs them as decode groups in one
    call per layer, beside extends without spans; the logits stay those of the plain Steps."""
    monkeypatch.setattr(torch_backend, "AMX_SPAN_MIN_ROWS", 2)
    monkeypatch.setattr(torch_backend, "AMX_SPAN_MIN_LENGTH", P - 10)
    cascade, reference = engines("gqa3-hd64", torch.bfloat16)
    if not cascade.attn.amx_cascade:  # type: ignore[attr-defined]
        pytest.skip("the AMX attention kernel does not run here")
    grouped = count_decode_groups(cascade, monkeypatch)
    for step in scenario(seed=5):
        delta = (cascade.logits(step) - reference.logits(plain(step))).abs().max().item()
        assert delta < 2e-2, f"step {step.step_id}: max |Δ| {delta:.2e}"
    assert grouped[0] >= 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx2_decode_groups_give_the_plain_logits(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPUs with AVX2 but no AVX-512, the default rule (its break-even lowered to this
    scenario's sizes) keeps the spans' decode rows and runs them as decode groups in one call per
    layer (grouped_decode_attention), beside extends without spans: the logits are bit for bit
    those of the plain Steps, with rows joining and leaving the groups from step to step."""
    monkeypatch.setenv("RADIXSERVE_CPU_EXTEND_ATTENTION", "kernel")
    monkeypatch.setattr(torch_backend, "GROUPED_SPAN_MIN_ROWS", 2)
    monkeypatch.setattr(torch_backend, "GROUPED_SPAN_MIN_LENGTH", P - 10)
    cascade, reference = engines("gqa3-hd64", dtype)
    if not cascade.attn.grouped_decode:  # type: ignore[attr-defined]
        pytest.skip("the AVX2 decode kernel's grouped form does not run here")
    grouped = count_decode_groups(cascade, monkeypatch)
    for step in scenario(seed=6):
        assert torch.equal(cascade.logits(step), reference.logits(plain(step))), step.step_id
    assert grouped[0] >= 3
