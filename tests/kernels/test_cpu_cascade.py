"""The C++ shared-prefix kernels (kernels/cpu/cascade.py) against their PyTorch references, and the
cascade identity: shared span + own keys, merged, equals attention over all keys."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu as cpu_kernels
from kernels.cpu import cascade
from kernels.cpu.build import cpu_flags

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# (query dtype, pool dtype): every pair the kernels take (the model's own dtype, a float32 model
# over a bfloat16 KV cache, either over a float8 e5m2 one); the references widen the same stored
# values, so the tolerance is the query dtype's
DTYPE_PAIRS = list(cpu_kernels.KERNEL_DTYPES)

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None, reason=f"kernel not built: {cpu_kernels.load_error()}"
)


def pool(dtype: torch.dtype, heads: int, kv_heads: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(3000, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(3000, kv_heads, dim, generator=gen).to(dtype)
    k[0] = v[0] = float("nan")  # the padding slot must never be read
    table = torch.randint(1, 3000, (10, 300), generator=gen)
    table[1:6, :120] = table[0, :120]  # rows 0..5 share 120 positions
    return k, v, table, gen


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


SHAPES = [(4, 4, 64), (9, 3, 64), (8, 1, 128)]


@pytest.mark.parametrize(("dtype", "kv_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), SHAPES)
def test_shared_prefix_attention(dtype, kv_dtype, heads, kv_heads, dim) -> None:
    k, v, table, gen = pool(kv_dtype, heads, kv_heads, dim)
    offsets = torch.tensor([0, 1, 5, 40])  # groups of 1, 4 and 35 tokens (blocks of 16)
    rows, lens = torch.tensor([0, 3, 7]), torch.tensor([120, 1, 299])
    q = torch.randn(40, heads, dim, generator=gen).to(dtype)
    args = (q, k, v, table, rows, offsets, lens, dim**-0.5)
    for a, b in zip(
        cascade.shared_prefix_attention(*args),
        cascade.shared_prefix_attention_ref(*args),
        strict=True,
    ):
        close(a, b, dtype)


def test_shared_prefix_attention_rejects_an_empty_span() -> None:
    k, v, table, gen = pool(torch.float32, 9, 3, 64)
    q = torch.randn(2, 9, 64, generator=gen)
    with pytest.raises(RuntimeError, match="shared spans must be 1 or longer"):
        cascade.shared_prefix_attention(
            q, k, v, table, torch.tensor([0]), torch.tensor([0, 2]), torch.tensor([0]), 0.125
        )


@pytest.mark.parametrize(("dtype", "kv_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), SHAPES)
@pytest.mark.parametrize("batch", [6, 40])  # split by kv head / one task per request
def test_decode_tail(dtype, kv_dtype, heads, kv_heads, dim, batch) -> None:
    k, v, table, gen = pool(kv_dtype, heads, kv_heads, dim)
    rows = torch.arange(batch) % 10
    seq_lens = torch.randint(1, 300, (batch,), generator=gen)
    starts = (seq_lens - 1) * torch.rand(batch, generator=gen)
    args = (torch.randn(batch, heads, dim, generator=gen).to(dtype), k, v, table, rows)
    args += (starts.long(), seq_lens, dim**-0.5)
    for a, b in zip(
        cascade.paged_decode_attention_lse(*args),
        cascade.paged_decode_attention_lse_ref(*args),
        strict=True,
    ):
        close(a, b, dtype)


@pytest.mark.parametrize(("dtype", "kv_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), SHAPES)
def test_extend_tail(dtype, kv_dtype, heads, kv_heads, dim) -> None:
    k, v, table, gen = pool(kv_dtype, heads, kv_heads, dim)
    rows, prefix = torch.tensor([0, 2, 4]), torch.tensor([120, 0, 64])
    extend, starts = torch.tensor([1, 37, 16]), torch.tensor([120, 0, 10])
    q = torch.randn(int(extend.sum()), heads, dim, generator=gen).to(dtype)
    args = (q, k, v, table, rows, starts, prefix, extend, dim**-0.5)
    for a, b in zip(
        cascade.extend_attention_lse(*args), cascade.extend_attention_lse_ref(*args), strict=True
    ):
        close(a, b, dtype)


@pytest.mark.skipif("avx512_bf16" not in cpu_flags().split(), reason="needs AVX-512 BF16")
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e5m2])
def test_bfloat16_extend_rounds_probabilities_to_bfloat16_for_p_v(
    monkeypatch, kv_dtype: torch.dtype
) -> None:
    """bfloat16 extends (AVX-512 BF16) compute p . v with p = exp(s - max) rounded to bfloat16,
    divided by the float32 sum of the unrounded p, as torch's SDPA does: to float32 rounding of
    that, and further from the float32 p . v. The log-sum-exp uses the unrounded p. (The AVX-512
    kernel even where the AMX one would run: that one's maximum is a running one, see
    test_cpu_attention_amx.py.)"""
    monkeypatch.setattr(cascade, "extend_module", lambda q, k_pool: cpu_kernels.load())
    k, v, table, gen = pool(kv_dtype, 9, 3, 64)
    rows, prefix = torch.tensor([0, 2, 4]), torch.tensor([120, 0, 64])
    extend, starts = torch.tensor([1, 37, 16]), torch.tensor([120, 0, 10])  # odd and even keys
    q = torch.randn(int(extend.sum()), 9, 64, generator=gen).bfloat16()
    args = (q, k, v, table, rows, starts, prefix, extend, 0.125)
    out, lse = cascade.extend_attention_lse(*args)
    want, want_lse = torch.empty(out.shape), torch.empty(lse.shape)
    first = 0
    for b in range(3):
        ks, p0, n = int(starts[b]), int(prefix[b]), int(extend[b])
        slots = table[rows[b], ks : p0 + n]
        keys = k[slots].float().repeat_interleave(3, 1)
        values = v[slots].float().repeat_interleave(3, 1)
        s = torch.einsum("qhd,lhd->qhl", q[first : first + n].float(), keys) * 0.125
        seen = torch.arange(ks, p0 + n)[None, :] <= (p0 + torch.arange(n))[:, None]
        s = s.masked_fill(~seen[:, None, :], float("-inf"))
        m = s.amax(-1, keepdim=True)
        p = (s - m).exp()
        z = p.sum(-1, keepdim=True)
        want[first : first + n] = torch.einsum("qhl,lhd->qhd", p.bfloat16().float(), values) / z
        want_lse[first : first + n] = (m + z.log())[..., 0]
        first += n
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    float32_pv, _ = cascade.extend_attention_lse_ref(*args)
    assert (out - float32_pv).abs().max().item() > 1e-4  # the rounding is really there


@pytest.mark.skipif("avx512_bf16" not in cpu_flags().split(), reason="needs AVX-512 BF16")
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e5m2], ids=str)
# query heads per KV head 1 to 8: the kernel takes them four at a time
@pytest.mark.parametrize(
    ("heads", "kv_heads"), [(3, 3), (4, 2), (9, 3), (8, 2), (10, 2), (12, 2), (7, 1), (8, 1)]
)
def test_bfloat16_decode_rounds_probabilities_to_bfloat16_for_p_v(
    kv_dtype: torch.dtype, heads: int, kv_heads: int
) -> None:
    """bfloat16 decode over a bfloat16 pool computes p . v as the extend kernel does: p = exp(s -
    max) rounded to bfloat16, divided by the float32 sum of the unrounded p; over a float8 pool
    the values are widened to float32 and p stays float32. Odd and even key counts, from key 0
    and from a start position; the log-sum-exp uses the unrounded p either way."""
    k, v, table, gen = pool(kv_dtype, heads, kv_heads, 64)
    rows = torch.arange(10)
    seq_lens = torch.tensor([1, 2, 17, 31, 32, 120, 121, 200, 299, 300])
    starts = torch.tensor([0, 0, 0, 5, 0, 0, 120, 7, 0, 33])
    q = torch.randn(10, heads, 64, generator=gen).bfloat16()
    args = (q, k, v, table, rows, starts, seq_lens, 0.125)
    out, lse = cascade.paged_decode_attention_lse(*args)
    group = heads // kv_heads
    want, want_lse = torch.empty(out.shape), torch.empty(lse.shape)
    for b in range(10):
        slots = table[rows[b], int(starts[b]) : int(seq_lens[b])]
        keys = k[slots].float().repeat_interleave(group, 1)
        values = v[slots].float().repeat_interleave(group, 1)
        s = torch.einsum("hd,lhd->hl", q[b].float(), keys) * 0.125
        m = s.amax(-1, keepdim=True)
        p = (s - m).exp()
        z = p.sum(-1, keepdim=True)
        weights = p.bfloat16().float() if kv_dtype == torch.bfloat16 else p
        want[b] = torch.einsum("hl,lhd->hd", weights, values) / z
        want_lse[b] = (m + z.log())[:, 0]
    # The kernel's float32 scores are summed in another order than the reference's, so a p near
    # a bfloat16 rounding boundary may round the other way (one bfloat16 step, up to 4e-5 of the
    # output here); everywhere else the outputs agree to float32 rounding.
    err = (out - want).abs()
    assert err.max().item() < 1e-4 and err.mean().item() < 1e-6
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    float32_pv, _ = cascade.paged_decode_attention_lse_ref(*args)
    if kv_dtype == torch.bfloat16:  # the rounding is really there: 1.6e-4 on average here
        assert (out - float32_pv).abs().mean().item() > 5e-5
    else:
        torch.testing.assert_close(out, float32_pv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("span", [1, 64, 119, 120])
def test_shared_plus_own_keys_is_full_attention(span: int) -> None:
    k, v, table, gen = pool(torch.float32, 9, 3, 64)
    rows, seq_lens = torch.tensor([0, 1, 2, 5]), torch.tensor([121, 200, 150, 299])
    q = torch.randn(4, 9, 64, generator=gen)
    scale = 0.125
    full = cpu_kernels.paged_decode_attention(q, k, v, table, rows, seq_lens, scale)
    starts = torch.full((4,), span)
    out, lse = cascade.paged_decode_attention_lse(q, k, v, table, rows, starts, seq_lens, scale)
    part = cascade.shared_prefix_attention(
        q, k, v, table, rows[:1], torch.tensor([0, 4]), torch.tensor([span]), scale
    )
    merged = cascade.merge_attention_states_(out, lse, *part, torch.arange(4))
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)
    ref = cascade.merge_attention_states_ref(*cascade.paged_decode_attention_lse_ref(
        q, k, v, table, rows, starts, seq_lens, scale), *part, torch.arange(4))  # fmt: skip
    torch.testing.assert_close(ref, full, atol=1e-5, rtol=1e-5)


def grouped_case(dtype, kv_dtype, heads, kv_heads, dim, seed=0):
    """24 decode rows over a 4,000-slot pool: a group of 11 rows (more than the 8 members a task
    takes) sharing 203 slots, one of 3 sharing 64 slots with a member whose keys are all shared,
    one of 2 sharing 5 (not a multiple of 4), a group of one, and 7 rows in no group."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(4000, kv_heads, dim, generator=gen).to(kv_dtype)
    v = torch.randn(4000, kv_heads, dim, generator=gen).to(kv_dtype)
    k[0] = v[0] = float("nan")  # the padding slot must never be read
    table = torch.randint(1, 4000, (24, 400), generator=gen)
    groups = [(list(range(0, 22, 2)), 203), ([1, 5, 9], 64), ([3, 7], 5), ([11], 150)]
    for members, span in groups:
        table[members[1:], :span] = table[members[0], :span]
    batch = 24
    rows = torch.arange(batch)
    seq_lens = torch.randint(210, 400, (batch,), generator=gen)
    seq_lens[5] = 64  # every key of this member is the span's
    order = torch.tensor([r for members, _ in groups for r in members])
    offsets = torch.tensor([0, 11, 14, 16, 17])
    spans = torch.tensor([span for _, span in groups])
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    return q, k, v, table, rows, seq_lens, order, offsets, spans, dim**-0.5


@pytest.mark.parametrize(("dtype", "kv_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [*SHAPES, (8, 2, 64), (6, 3, 64)])
def test_grouped_decode_is_the_decode_kernel_bit_for_bit(dtype, kv_dtype, heads, kv_heads, dim):
    """Each row's output from the grouped form is exactly the plain decode kernel's (and close to
    the PyTorch reference), whether or not this CPU reads the spans once."""
    q, k, v, table, rows, seq_lens, order, offsets, spans, scale = grouped_case(
        dtype, kv_dtype, heads, kv_heads, dim
    )
    out = cascade.grouped_decode_attention(
        q, k, v, table, rows, seq_lens, order, offsets, spans, scale
    )
    plain = cpu_kernels.paged_decode_attention(q, k, v, table, rows, seq_lens, scale)
    assert out.dtype == q.dtype
    assert torch.equal(out, plain)
    ref = cascade.grouped_decode_attention_ref(
        q, k, v, table, rows, seq_lens, order, offsets, spans, scale
    )
    close(out.float(), ref.float(), dtype)


def test_grouped_decode_reads_spans_once_only_on_avx2_without_avx512() -> None:
    flags = cpu_flags().split()
    avx2 = all(f in flags for f in ("avx2", "fma", "f16c"))
    assert cascade.reads_spans_once(64) == (avx2 and "avx512f" not in flags)
    assert not cascade.reads_spans_once(128)


@pytest.mark.skipif(not cascade.reads_spans_once(64), reason="spans are not read once here")
def test_a_group_reads_its_span_through_its_first_member() -> None:
    """Where the span is read once, every member attends the span through the first member's
    slots: a member whose own first slots differ gets the first member's span (the kernel takes
    the caller's word, so this shows the shared reads happen), and the checked wrapper refuses
    such a group."""
    q, k, v, table, rows, seq_lens, order, offsets, spans, scale = grouped_case(
        torch.float32, torch.float32, 9, 3, 64
    )
    other = table.clone()
    # member 2 of the first group (whose span is 203: keys 200 .. 202, in a block of 4 that
    # straddles the span's end, are scored through each member's own slots)
    other[2, :200] = torch.randint(1, 4000, (200,))
    out = cpu_kernels.load().grouped_decode_attention(
        q, k, v, other, rows, seq_lens, order, offsets, spans, scale
    )
    plain = cpu_kernels.paged_decode_attention(q, k, v, table, rows, seq_lens, scale)
    assert torch.equal(out[2], plain[2])
    with pytest.raises(ValueError, match="group 0: its rows' first 203 slots differ"):
        cascade.grouped_decode_attention(
            q, k, v, other, rows, seq_lens, order, offsets, spans, scale
        )


@pytest.mark.parametrize(
    ("order", "offsets", "spans", "error", "message"),
    [
        ([0, 1], [0, 2], [1, 1], ValueError, "offsets needs one entry more than spans"),
        ([0, 1], [0, 1], [4], RuntimeError, r"offsets must run 0 \.\. len\(order\)"),
        ([0, 1], [0, 0, 2], [4, 4], RuntimeError, "offsets must rise from 0 to len"),
        ([0, 0], [0, 2], [4], RuntimeError, "order must name distinct rows of the batch"),
        ([0, 24], [0, 2], [4], RuntimeError, "order must name distinct rows of the batch"),
        ([0, 1], [0, 2], [500], RuntimeError, "a span is longer than a member's keys"),
        ([0, 1], [0, 2], [0], RuntimeError, "shared spans must be 1 or longer"),
        ([0, 1, 2], [0, 4, 3], [4, 4], RuntimeError, "offsets must rise from 0 to len"),
    ],
)
def test_grouped_decode_rejects_a_bad_grouping(order, offsets, spans, error, message) -> None:
    q, k, v, table, rows, seq_lens, *_, scale = grouped_case(torch.float32, torch.float32, 9, 3, 64)
    index = [torch.tensor(x, dtype=torch.int64) for x in (order, offsets, spans)]
    with pytest.raises(error, match=message):
        cascade.grouped_decode_attention(q, k, v, table, rows, seq_lens, *index, scale)


@pytest.mark.parametrize("threads", [30, 64])  # groups of 2 members; of 1, rows by head
def test_grouped_decode_with_more_threads_than_tasks(threads: int) -> None:
    """With more threads than groups x kv heads, groups are cut into smaller tasks (down to one
    member) and the other rows by kv head; every output stays the plain kernel's."""
    q, k, v, table, rows, seq_lens, order, offsets, spans, scale = grouped_case(
        torch.float32, torch.bfloat16, 9, 3, 64, seed=1
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cascade.grouped_decode_attention(
            q, k, v, table, rows, seq_lens, order, offsets, spans, scale
        )
        plain = cpu_kernels.paged_decode_attention(q, k, v, table, rows, seq_lens, scale)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, plain)
