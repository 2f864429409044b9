"""The AMX attention kernels (kernels/cpu/attention_amx.cpp) against the PyTorch references: extend
(causal, over a cached prefix, from a start key) and shared-prefix spans, at lengths on and off
the 16-row tiles and 64-key blocks, with the KV slots in runs (the tiles load keys from the pool)
and scattered (keys copied first); and where they run."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu as cpu_kernels
from kernels.cpu import cascade
from kernels.cpu.build import cpu_flags
from services.executor.attention import torch_backend
from services.executor.attention.torch_backend import TorchAttention
from services.executor.kv_pool import KVPool, RequestToTokenTable

HAS_AMX = {"amx_tile", "amx_bf16"} <= set(cpu_flags().split())
AMX = cpu_kernels.amx_module(
    torch.zeros(1, 1, 64, dtype=torch.bfloat16), torch.zeros(1, 1, 64, dtype=torch.bfloat16)
)
needs_amx = pytest.mark.skipif(AMX is None, reason="no AMX tiles here")
# One bfloat16 rounding of the unnormalised probabilities (as the AVX-512 kernel and torch's SDPA
# round them for p . v); the log-sum-exps are float32.
TOLERANCE = 2e-2

SHAPES = [(9, 3, 64), (4, 4, 64), (8, 1, 128)]  # query heads per KV head: 3, 1, 8


def pool(kv_heads: int, dim: int, scattered: bool, seed: int = 0):
    """K/V pools of 3,000 slots (slot 0 NaN: never read) and a table of 10 rows of 1,200
    positions, rows 0-5 sharing their first 300; slots in runs, or scattered."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(3000, kv_heads, dim, generator=gen).bfloat16()
    v = torch.randn(3000, kv_heads, dim, generator=gen).bfloat16()
    k[0] = v[0] = float("nan")
    if scattered:
        table = torch.randint(1, 3000, (10, 1200), generator=gen)
    else:
        table = 1 + (torch.arange(10)[:, None] * 250 + torch.arange(1200)[None, :]) % 2999
    table[1:6, :300] = table[0, :300]
    return k, v, table, gen


def three_extends(prefix: list[int], extend: list[int]):
    """Pools with scattered slots and three requests (table rows 0, 2 and 4) extending by `extend`
    tokens after `prefix` cached ones: (k, v, table, rows, prefix, extend, q), q [T, 9, 64]
    bfloat16 over 3 KV heads."""
    k, v, table, gen = pool(3, 64, scattered=True)
    extend_t = torch.tensor(extend)
    q = torch.randn(int(extend_t.sum()), 9, 64, generator=gen).bfloat16()
    return k, v, table, torch.tensor([0, 2, 4]), torch.tensor(prefix), extend_t, q


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=TOLERANCE)


@needs_amx
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), SHAPES)
@pytest.mark.parametrize("scattered", [False, True], ids=["runs", "scattered"])
def test_extend_matches_reference(heads, kv_heads, dim, scattered) -> None:
    k, v, table, gen = pool(kv_heads, dim, scattered)
    rows = torch.tensor([0, 2, 4, 7, 9])
    prefix = torch.tensor([0, 1000, 63, 5, 64])
    extend = torch.tensor([130, 1, 17, 64, 65])  # tokens: 32-token blocks and a remainder
    q = torch.randn(int(extend.sum()), heads, dim, generator=gen).bfloat16()
    args = (q, k, v, table, rows, prefix, extend, dim**-0.5)
    out = cpu_kernels.extend_attention(*args)
    assert out.dtype == torch.bfloat16
    close(out.float(), cpu_kernels.extend_attention_ref(*args).float())


@needs_amx
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), SHAPES)
@pytest.mark.parametrize("scattered", [False, True], ids=["runs", "scattered"])
def test_extend_from_a_start_key_gives_log_sum_exps(heads, kv_heads, dim, scattered) -> None:
    k, v, table, gen = pool(kv_heads, dim, scattered)
    rows, prefix = torch.tensor([0, 2, 4]), torch.tensor([300, 0, 130])
    extend, starts = torch.tensor([1, 37, 16]), torch.tensor([300, 0, 10])
    q = torch.randn(int(extend.sum()), heads, dim, generator=gen).bfloat16()
    args = (q, k, v, table, rows, starts, prefix, extend, dim**-0.5)
    for a, b in zip(
        cascade.extend_attention_lse(*args), cascade.extend_attention_lse_ref(*args), strict=True
    ):
        close(a, b)


@needs_amx
def test_extend_writes_bfloat16_rounded_once() -> None:
    """The extend kernel writes bfloat16 itself: the same bits as its float32 sums (the kernel with
    log-sum-exps, from key 0) rounded by `Tensor.to`."""
    k, v, table, rows, prefix, extend, q = three_extends([300, 0, 130], [1, 37, 70])
    out = AMX.extend_attention(q, k, v, table, rows, prefix, extend, 0.125)
    wide, _ = AMX.extend_attention_lse(
        q, k, v, table, rows, torch.zeros(3, dtype=torch.int64), prefix, extend, 0.125
    )
    assert out.dtype == torch.bfloat16 and wide.dtype == torch.float32
    assert torch.equal(out, wide.to(torch.bfloat16))


@needs_amx
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), SHAPES)
@pytest.mark.parametrize("scattered", [False, True], ids=["runs", "scattered"])
def test_shared_prefix_matches_reference(heads, kv_heads, dim, scattered) -> None:
    k, v, table, gen = pool(kv_heads, dim, scattered)
    # groups of 1, 4, 16, 37 (two tasks of up to 32) and 2 tokens over spans of 1, 300, 64, 65
    # and 1,000 keys
    offsets = torch.tensor([0, 1, 5, 21, 58, 60])
    rows, lens = torch.tensor([0, 3, 7, 8, 9]), torch.tensor([1, 300, 64, 65, 1000])
    q = torch.randn(60, heads, dim, generator=gen).bfloat16()
    args = (q, k, v, table, rows, offsets, lens, dim**-0.5)
    for a, b in zip(
        cascade.shared_prefix_attention(*args),
        cascade.shared_prefix_attention_ref(*args),
        strict=True,
    ):
        close(a, b)


@needs_amx
def test_each_request_gets_the_same_bits_alone_or_batched() -> None:
    """A task reads one request's queries and keys only, so a request's output does not depend on
    what else the call holds."""
    k, v, table, rows, prefix, extend, q = three_extends([100, 0, 7], [5, 40, 70])
    both = cpu_kernels.extend_attention(q, k, v, table, rows, prefix, extend, 0.125)
    first = 0
    for b in range(3):
        n = int(extend[b])
        alone = cpu_kernels.extend_attention(
            q[first : first + n], k, v, table, rows[b : b + 1], prefix[b : b + 1],
            extend[b : b + 1], 0.125,
        )  # fmt: skip
        assert torch.equal(alone, both[first : first + n])
        first += n


@needs_amx
def test_tasks_of_every_kv_head_and_of_one_give_the_same_bits() -> None:
    """A call's tasks take every KV head (whole slot rows), or one head each where the threads
    would otherwise wait on each other: one task on two threads is split into three, on one thread
    it is not. Each row's sums run in the same order either way, so the outputs are the same bits,
    for extends, shared-prefix spans and decode groups."""
    k, v, table, gen = pool(3, 64, scattered=False)
    q = torch.randn(20, 9, 64, generator=gen).bfloat16()
    one = (torch.tensor([2]), torch.tensor([700]), torch.tensor([20]))  # one 20-token block
    span_args = (q, k, v, table, torch.tensor([0]), torch.tensor([0, 20]), torch.tensor([300]))
    members = torch.arange(1, 6)  # rows 1-5 share row 0's first 300 positions
    decode_args = (
        q[:6], k, v, table, torch.arange(6), torch.tensor([350, 301, 420, 999, 310, 600]),
        members, torch.tensor([0, 5]), torch.tensor([300]),
    )  # fmt: skip
    threads = torch.get_num_threads()

    def run():
        return (
            cpu_kernels.extend_attention(q, k, v, table, *one, 0.125),
            *cascade.shared_prefix_attention(*span_args, 0.125),
            AMX.cascade_decode_attention(*decode_args, 0.125)[members],
        )

    try:
        torch.set_num_threads(1)
        whole = run()
        torch.set_num_threads(2)
        split = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(whole, split, strict=True):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


@needs_amx
def test_probabilities_are_rounded_to_bfloat16_for_p_v() -> None:
    """The rounding that makes p . v a bfloat16 tile product is really there (the output is off the
    float32 p . v by more than float32 rounding) and within the tolerance of one bfloat16
    rounding; the log-sum-exps use the unrounded probabilities."""
    k, v, table, gen = pool(3, 64, scattered=False)
    rows, prefix, extend, starts = (torch.tensor([x]) for x in (0, 200, 40, 3))
    q = torch.randn(40, 9, 64, generator=gen).bfloat16()
    args = (q, k, v, table, rows, starts, prefix, extend, 0.125)
    out, lse = cascade.extend_attention_lse(*args)
    want, want_lse = cascade.extend_attention_lse_ref(*args)
    assert (out - want).abs().max().item() > 1e-4
    close(out, want)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


@needs_amx
def test_the_kernel_refuses_what_it_cannot_take() -> None:
    k, v, table, _ = pool(3, 64, scattered=False)
    rows, prefix, extend = torch.tensor([0]), torch.tensor([0]), torch.tensor([2])
    with pytest.raises(RuntimeError, match="bfloat16"):
        AMX.extend_attention(torch.randn(2, 9, 64), k, v, table, rows, prefix, extend, 0.1)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        AMX.extend_attention(
            torch.randn(2, 9, 32).bfloat16(), k[..., :32].contiguous(), v[..., :32].contiguous(),
            table, rows, prefix, extend, 0.1,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="add up"):
        AMX.extend_attention(
            torch.randn(3, 9, 64).bfloat16(), k, v, table, rows, prefix, extend, 0.1
        )


def test_where_the_amx_kernel_runs(monkeypatch) -> None:
    """bfloat16 queries over bfloat16 pools at head dims that are multiples of 64, on AMX CPUs;
    never for float32 or float8, never with the kernels disabled."""
    bf16 = torch.zeros(1, 9, 64, dtype=torch.bfloat16)
    assert cpu_kernels.amx_module(bf16.float(), bf16) is None
    assert cpu_kernels.amx_module(bf16, bf16.to(torch.float8_e5m2)) is None
    assert cpu_kernels.amx_module(bf16[..., :32], bf16[..., :32]) is None
    assert cpu_kernels.amx_module(bf16, bf16) is AMX
    if AMX is not None:
        assert cpu_kernels.extend_module(bf16, bf16) is AMX
        assert cpu_kernels.extend_module(bf16.float(), bf16) is cpu_kernels.load()
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    assert cpu_kernels.amx_module(bf16, bf16) is None


@pytest.mark.skipif(not HAS_AMX, reason="no AMX on this CPU")
def test_the_amx_kernel_builds_where_the_cpu_has_amx() -> None:
    assert cpu_kernels._attention_amx.load() is not None, cpu_kernels._attention_amx.error


@pytest.mark.skipif(cpu_kernels.load() is None, reason="kernel not built")
def test_bfloat16_extends_run_the_kernel_where_the_amx_kernel_runs(monkeypatch) -> None:
    """On AMX CPUs the engine's bfloat16 extends run the AMX kernel (which beats SDPA there), and
    SDPA only where that kernel cannot run; elsewhere the C++ kernel wherever its vector code
    (AVX-512, or AVX2 with FMA and F16C) is built; RADIXSERVE_CPU_EXTEND_ATTENTION still
    decides."""
    monkeypatch.delenv("RADIXSERVE_CPU_EXTEND_ATTENTION", raising=False)

    def backend() -> TorchAttention:
        kv = KVPool(2, 64, 3, 64, torch.bfloat16, torch.device("cpu"))
        table = RequestToTokenTable(4, 64, torch.device("cpu"))
        return TorchAttention(pool=kv, table=table, num_heads=9, num_kv_heads=3, head_dim=64)

    flags = cpu_flags().split()
    if HAS_AMX:
        assert backend().use_cpu_extend_kernel == (AMX is not None)
    else:  # the AVX-512 kernel, or the AVX2 one
        vector = "avx512f" in flags or all(f in flags for f in ("avx2", "fma", "f16c"))
        assert backend().use_cpu_extend_kernel == vector
    monkeypatch.setenv("RADIXSERVE_CPU_EXTEND_ATTENTION", "sdpa")
    assert not backend().use_cpu_extend_kernel


@needs_amx
# Also 2 query heads per KV head at head dim 192: the own keys' p . v for 2 rows at a time, in
# three 64-dim chunks.
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [*SHAPES, (6, 3, 192)])
@pytest.mark.parametrize("scattered", [False, True], ids=["runs", "scattered"])
def test_cascade_decode_is_each_rows_full_attention(heads, kv_heads, dim, scattered) -> None:
    """Groups read their span once and each member its own keys after it; every row's output is
    its attention over all its keys. Groups of 1, 2, 4 and 17 members (two tasks of up to 16),
    spans of 0, 1, 65 and 300 positions, rows 1 to 700 positions past them."""
    k, v, table, gen = pool(kv_heads, dim, scattered)
    batch = 26
    rows = torch.arange(batch) % 10
    table = table[rows]  # one table row per request, the shared positions copied
    groups = [(300, [0, 1]), (65, [2, 3, 4, 5, 6]), (1, list(range(7, 24))), (64, [24, 25])]
    for span, members in groups:
        table[members, :span] = table[members[0], :span]
    rows = torch.arange(batch)
    seq_lens = torch.tensor(
        [span + 1 + int(torch.randint(0, 700, (), generator=gen)) for span, m in groups for _ in m]
    )
    # members listed out of order; a group without a span; rows 3 and 25 in no group (unwritten)
    listed = [[1, 0], [6, 2, 4, 5], list(range(23, 6, -1)), [24]]
    order = torch.tensor([b for members in listed for b in members])
    offsets = torch.tensor([0, 2, 6, 23, 24])
    spans = torch.tensor([300, 65, 1, 0])
    q = torch.randn(batch, heads, dim, generator=gen).bfloat16()
    out = AMX.cascade_decode_attention(
        q, k, v, table, rows, seq_lens, order, offsets, spans, dim**-0.5
    )
    want = cpu_kernels.paged_decode_attention_ref(q, k, v, table, rows, seq_lens, dim**-0.5)
    written = order.sort().values
    assert 3 not in written.tolist() and 25 not in written.tolist()
    assert out.dtype == torch.bfloat16
    close(out[written].float(), want[written].float())


@needs_amx
def test_cascade_decode_refuses_bad_groups() -> None:
    k, v, table, gen = pool(3, 64, scattered=False)
    q = torch.randn(2, 9, 64, generator=gen).bfloat16()
    rows, lens = torch.tensor([0, 1]), torch.tensor([10, 10])
    order, offsets = torch.tensor([0, 1]), torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match="past its group's span"):
        AMX.cascade_decode_attention(
            q, k, v, table, rows, lens, order, offsets, torch.tensor([10]), 0.1
        )
    with pytest.raises(RuntimeError, match="offsets"):
        AMX.cascade_decode_attention(
            q, k, v, table, rows, lens, order, torch.tensor([0, 1]), torch.tensor([5]), 0.1
        )


@needs_amx
def test_cascade_decode_of_float32_queries_is_each_rows_plain_attention() -> None:
    """A float32 model over a bfloat16 pool: the AMX kernel does not take its queries, so the
    groups' rows run the decode kernel over all their keys."""
    kv = KVPool(1, 64, 3, 64, torch.bfloat16, torch.device("cpu"))
    table = RequestToTokenTable(4, 64, torch.device("cpu"))
    attn = TorchAttention(pool=kv, table=table, num_heads=9, num_kv_heads=3, head_dim=64)
    assert attn.amx_cascade
    gen = torch.Generator().manual_seed(0)
    kv.k[0].copy_(torch.randn(kv.k[0].shape, generator=gen))
    kv.v[0].copy_(torch.randn(kv.v[0].shape, generator=gen))
    table.table[:3, :40] = torch.arange(1, 41)
    table.table[1:3, 10:40] += 20
    rows, lens = torch.arange(3), torch.tensor([40, 31, 12])
    part = torch_backend.KernelCascadeDecode(
        rows, lens, order=torch.tensor([0, 1, 2]), offsets=torch.tensor([0, 3]),
        spans=torch.tensor([10]),
    )  # fmt: skip
    q = torch.randn(3, 9, 64, generator=gen)
    out = attn.cascade_decode(q, kv.k[0], kv.v[0], part)
    assert out.dtype == torch.float32
    want = cpu_kernels.paged_decode_attention(q, kv.k[0], kv.v[0], table.table, rows, lens, 0.125)
    assert torch.equal(out, want)
