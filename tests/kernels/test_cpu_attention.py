"""The C++ CPU attention kernels against their PyTorch references, and inside the engine."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu as cpu_kernels
from kernels.cpu import cascade
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput
from tests.executor.driver import Driver
from tests.executor.tiny import engine_for, hf_model

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# (query dtype, pool dtype): every pair the kernels take (the model's own dtype, a float32 model
# over a bfloat16 KV cache, either over a float8 e5m2 one); the references widen the same stored
# values, so the tolerance is the query dtype's
DTYPE_PAIRS = list(cpu_kernels.KERNEL_DTYPES)

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None, reason=f"kernel not built: {cpu_kernels.load_error()}"
)


@pytest.mark.parametrize(("dtype", "kv_dtype"), DTYPE_PAIRS)
# At head_dim 64 the float32 kernels take the query heads in chunks of 4 (AVX-512) or 3 (AVX2):
# groups of 1, 3, 4 and 8; past 8, bfloat16 queries leave the AVX-512 BF16 kernel for them
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(4, 4, 64), (9, 3, 64), (8, 2, 64), (16, 2, 64), (8, 1, 128), (12, 1, 64)],
)
@pytest.mark.parametrize("batch", [6, 40])  # split by kv head / one task per request
def test_kernel_matches_reference(
    dtype: torch.dtype, kv_dtype: torch.dtype, heads: int, kv_heads: int, dim: int, batch: int
) -> None:
    gen = torch.Generator().manual_seed(heads * dim)
    slots = 3000
    k_pool = torch.randn(slots, kv_heads, dim, generator=gen).to(kv_dtype)
    v_pool = torch.randn(slots, kv_heads, dim, generator=gen).to(kv_dtype)
    k_pool[0] = float("nan")  # the padding slot must never be read
    table = torch.randint(1, slots, (10, 300), generator=gen)
    rows = torch.tensor([7, 0, 3, 9, 1, 5] * (batch // 6) + [2] * (batch % 6))
    seq_lens = torch.tensor([1, 299, 17, 64, 2, 150] * (batch // 6) + [33] * (batch % 6))
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    out = cpu_kernels.paged_decode_attention(q, k_pool, v_pool, table, rows, seq_lens, dim**-0.5)
    ref = cpu_kernels.paged_decode_attention_ref(
        q, k_pool, v_pool, table, rows, seq_lens, dim**-0.5
    )
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref.float()).abs().max().item() < TOLERANCE[dtype]


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e5m2])
def test_bfloat16_output_is_the_float32_sums_rounded_once(kv_dtype: torch.dtype) -> None:
    # The module returns bfloat16 queries' output in bfloat16, rounded in C++ (vectorised, with a
    # scalar tail: 9 heads x 64 = 576 values per row, 7 rows end mid-vector); the float32 sums it
    # rounds are those of the lse variant, which returns them as they are.
    gen = torch.Generator().manual_seed(5)
    k_pool = torch.randn(500, 3, 64, generator=gen).to(kv_dtype)
    v_pool = torch.randn(500, 3, 64, generator=gen).to(kv_dtype)
    table = torch.randint(1, 500, (8, 200), generator=gen)
    rows, seq_lens = torch.arange(7), torch.tensor([1, 2, 17, 64, 199, 100, 33])
    q = torch.randn(7, 9, 64, generator=gen).bfloat16()
    module = cpu_kernels.load()
    out = module.paged_decode_attention(q, k_pool, v_pool, table, rows, seq_lens, 0.125)
    sums, _ = module.paged_decode_attention_lse(
        q, k_pool, v_pool, table, rows, torch.zeros_like(rows), seq_lens, 0.125
    )
    assert out.dtype == torch.bfloat16 and sums.dtype == torch.float32
    assert torch.equal(out, sums.bfloat16())
    assert (
        module.paged_decode_attention(q.float(), k_pool, v_pool, table, rows, seq_lens, 0.125).dtype
        == torch.float32
    )


@pytest.mark.parametrize(("dtype", "kv_dtype"), DTYPE_PAIRS)
# bfloat16 at head_dim 64 runs the AVX-512 BF16 kernel over the query rows in chunks of 16 to 64:
# groups of 1, 3, 4, 5 (80 rows) and 8 (128 rows)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(4, 4, 64), (9, 3, 64), (8, 2, 64), (10, 2, 64), (16, 2, 64), (8, 1, 128)],
)
def test_extend_kernel_matches_reference(
    dtype: torch.dtype, kv_dtype: torch.dtype, heads: int, kv_heads: int, dim: int
) -> None:
    gen = torch.Generator().manual_seed(heads + dim)
    slots = 3000
    k_pool = torch.randn(slots, kv_heads, dim, generator=gen).to(kv_dtype)
    v_pool = torch.randn(slots, kv_heads, dim, generator=gen).to(kv_dtype)
    k_pool[0] = v_pool[0] = float("nan")  # the padding slot must never be read
    table = torch.randint(1, slots, (10, 400), generator=gen)
    # One new token with no prefix, a block and a bit, exactly one block after a prefix, a long
    # one after a prefix that is not a multiple of the key block, and a short one behind a long
    # prefix.
    rows = torch.tensor([7, 0, 3, 9, 1])
    prefix_lens = torch.tensor([0, 0, 100, 17, 383])
    extend_lens = torch.tensor([1, 19, 16, 130, 5])
    q = torch.randn(int(extend_lens.sum()), heads, dim, generator=gen).to(dtype)
    args = (q, k_pool, v_pool, table, rows, prefix_lens, extend_lens, dim**-0.5)
    out = cpu_kernels.extend_attention(*args)
    ref = cpu_kernels.extend_attention_ref(*args)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    assert (out.float() - ref.float()).abs().max().item() < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_finite_float8_value_is_read_exactly(dtype: torch.dtype) -> None:
    """Each finite float8 e5m2 value (zeros, subnormals, normals: 248 of the 256 bytes), read as a
    key by the decode kernel (float32 queries: widened to float32; bfloat16 ones: converted to
    bfloat16 for the pair dot products), scores exactly that value: one key per request, so the
    log-sum-exp is q . k, with q one-hot."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes[~codes.view(torch.float8_e5m2).float().isfinite()] = 0  # 0 x inf in a dot is NaN
    values = codes.view(torch.float8_e5m2)
    pool = torch.cat([torch.zeros(64, dtype=torch.float8_e5m2), values]).view(5, 1, 64)
    table = torch.arange(1, 5).view(4, 1)  # row i holds slot i + 1, whose 64 values ...
    rows = torch.arange(4).repeat_interleave(64)
    q = torch.eye(64)[torch.arange(256) % 64].view(256, 1, 64).to(dtype)  # ... b reads at b % 64
    starts, lens = torch.zeros(256, dtype=torch.int64), torch.ones(256, dtype=torch.int64)
    _, lse = cascade.paged_decode_attention_lse(q, pool, pool, table, rows, starts, lens, 1.0)
    assert torch.equal(lse[:, 0], values.float())


def test_extend_launcher_rejects_bad_inputs() -> None:
    pool = torch.randn(10, 1, 64)
    table = torch.zeros(2, 8, dtype=torch.int64)
    one = torch.tensor([0])
    with pytest.raises(ValueError, match="multiple of 64"):
        cpu_kernels.extend_attention(
            torch.randn(2, 1, 48), torch.randn(10, 1, 48), torch.randn(10, 1, 48), table, one,
            one, torch.tensor([2]), 1.0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="int64"):
        cpu_kernels.extend_attention(
            torch.randn(2, 1, 64), pool, pool, table, one, one.int(), torch.tensor([2]), 1.0
        )


def test_launcher_rejects_bad_inputs() -> None:
    q = torch.randn(2, 4, 64)
    pool = torch.randn(10, 2, 64)
    table = torch.zeros(4, 8, dtype=torch.int64)
    idx = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="dtypes"):  # K and V of different dtypes
        cpu_kernels.paged_decode_attention(q, pool.bfloat16(), pool, table, idx, idx, 0.1)
    with pytest.raises(ValueError, match="dtypes"):  # bfloat16 queries over a float32 pool
        cpu_kernels.paged_decode_attention(q.bfloat16(), pool, pool, table, idx, idx, 0.1)
    with pytest.raises(ValueError, match="int64"):
        cpu_kernels.paged_decode_attention(q, pool, pool, table.int(), idx, idx, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        cpu_kernels.paged_decode_attention(torch.randn(2, 3, 64), pool, pool, table, idx, idx, 0.1)


def test_engine_gives_same_tokens_with_and_without_the_kernel() -> None:
    hf = hf_model("llama31")
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], list(range(40, 100))]
    with_kernel = engine_for(hf)
    assert with_kernel.attn.use_cpu_kernel
    without = engine_for(hf)
    without.attn.use_cpu_kernel = False
    a = [j.output for j in Driver(with_kernel).generate(prompts, 16)]
    b = [j.output for j in Driver(without).generate(prompts, 16)]
    assert a == b


def test_engine_extend_kernel_gives_torch_logits_with_cached_prefixes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prefill, then requests pointed at the first one's prefix slots computing only their own
    suffix, with the extend kernel and with the PyTorch path: the same logits."""
    monkeypatch.setenv("RADIXSERVE_CPU_EXTEND_ATTENTION", "kernel")  # SDPA's choice on some CPUs
    hf = hf_model("gqa3-hd64")
    prompt = list(range(3, 83))
    results = []
    for use_kernel in (True, False):
        engine = engine_for(hf)
        assert engine.attn.use_cpu_extend_kernel
        engine.attn.use_cpu_kernel = engine.attn.use_cpu_extend_kernel = use_kernel
        greedy = SamplingParams(temperature=0)
        first = StepInput(
            1,
            add=[NewRequest(0, "a", greedy)],
            writes=[SlotWrite(0, 0, list(range(1, 81)))],
            slices=[Slice(0, 0, prompt)],
        )
        logits = [engine.logits(first)]
        # Row 1 reuses 50 slots of row 0 and adds 30; row 2 reuses 33 and adds 1; row 3 is new.
        second = StepInput(
            2,
            add=[NewRequest(r, f"r{r}", greedy) for r in (1, 2, 3)],
            writes=[
                SlotWrite(1, 0, list(range(1, 51)) + list(range(100, 130))),
                SlotWrite(2, 0, [*range(1, 34), 200]),
                SlotWrite(3, 0, list(range(300, 323))),
            ],
            slices=[
                Slice(1, 50, list(range(90, 120))),
                Slice(2, 33, [7]),
                Slice(3, 0, list(range(23))),
            ],
        )
        logits.append(engine.logits(second))
        results.append(torch.cat(logits))
    assert (results[0] - results[1]).abs().max().item() < 1e-4
