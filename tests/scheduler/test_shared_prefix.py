"""The scheduler's shared-prefix spans: grouping from the radix tree, and Steps that carry them
(checked slot by slot by the fake executor)."""

from __future__ import annotations

import asyncio
import random
import time
from types import SimpleNamespace

from radixserve.v1 import executor_pb2 as pb
from services.scheduler.radix_cache import RadixCache
from services.scheduler.shared_prefix import MIN_SHARED_PREFIX, shared_prefixes
from tests.scheduler.fake_executor import FakeExecutor, reference
from tests.scheduler.harness import collect, params, running_scheduler


def attached(tree: RadixCache, row: int, ids: list[int], pending: bool = False) -> SimpleNamespace:
    """A running request's view of the tree, as KVCache.attach leaves it."""
    kv, node = tree.match_prefix(ids)
    tree.lock(node)
    return SimpleNamespace(row=row, node=node, num_cached=len(kv), pending_write=pending or None)


def test_groups_save_the_most_position_reads() -> None:
    tree = RadixCache()
    system, other = list(range(1000, 1100)), list(range(2000, 2080))
    tree.insert(system + [1] * 50, list(range(1, 151)))
    tree.insert(system + [2] * 50, list(range(1, 101)) + list(range(151, 201)))
    tree.insert(other, list(range(300, 380)))
    a = attached(tree, 0, system + [1] * 50 + [7])  # 150 cached
    b = attached(tree, 1, system + [1] * 40 + [8])  # 140 cached
    c = attached(tree, 2, system + [2] * 50 + [9])  # 100 + 50 cached, a different branch
    d = attached(tree, 3, [*system[:30], 5])  # 30 cached: below the minimum
    e = attached(tree, 4, [*other, 6])  # alone under its branch
    # a and b share 140 positions, c only the 100 of the system prompt: one group of three over
    # 100 saves 200 position reads, a and b alone over 140 would save 140.
    assert shared_prefixes([(a, 150), (b, 141), (c, 160), (d, 31), (e, 80)]) == [(100, [0, 1, 2])]
    assert shared_prefixes([(a, 150), (b, 141)]) == [(140, [0, 1])]
    # Capped by the slice start: a prefix the step itself computes is not shared.
    assert shared_prefixes([(a, 120), (b, 141)]) == [(100, [0, 1])]
    assert shared_prefixes([(a, 150), (b, 141)], min_len=200) == []
    # A request whose row is repointed next step stays out.
    f = attached(tree, 5, system + [1] * 50 + [3], pending=True)
    assert shared_prefixes([(a, 150), (f, 150)]) == []


def test_questions_that_begin_alike_stay_in_their_system_prompts_group() -> None:
    """Rows under one 1,000-token system prompt whose questions share a first token or two form
    one group over the system prompt, not several small ones over a token or two more."""
    tree = RadixCache()
    system = list(range(10_000, 11_000))
    questions = [[1, 2, 30 + i] for i in range(3)] + [[1, 3, 40 + i] for i in range(2)] + [[5, 6]]
    reqs = []
    for row, question in enumerate(questions):
        ids = system + question
        tree.insert(ids, list(range(1 + row * 2000, 1 + row * 2000 + len(ids))))
        reqs.append((attached(tree, row, [*ids, 99]), len(ids) + 1))
    assert shared_prefixes(reqs) == [(1000, [0, 1, 2, 3, 4, 5])]


def test_documents_under_a_common_header_keep_groups_of_their_own() -> None:
    """Two 900-token documents after a 100-token header, three rows on each: two groups over
    1,000 positions save 4,000 reads, one over the header 500."""
    tree = RadixCache()
    header = list(range(10_000, 10_100))
    docs = [list(range(20_000, 20_900)), list(range(30_000, 30_900))]
    reqs = []
    for row in range(6):
        ids = header + docs[row % 2] + [row]
        tree.insert(ids, list(range(1 + row * 2000, 1 + row * 2000 + len(ids))))
        reqs.append((attached(tree, row, [*ids, 99]), len(ids) + 1))
    assert sorted(shared_prefixes(reqs)) == [(1000, [0, 2, 4]), (1000, [1, 3, 5])]


def test_grouping_64_rows_costs_well_under_a_millisecond() -> None:
    rng = random.Random(0)
    tree, reqs, slot = RadixCache(), [], 1
    for g in range(4):
        system = [rng.randrange(50_000) for _ in range(1000)]
        for i in range(16):
            ids = system + [rng.randrange(50_000) for _ in range(rng.randint(1, 200))]
            tree.insert(ids, list(range(slot, slot + len(ids))))
            slot += len(ids)
            reqs.append((attached(tree, g * 16 + i, [*ids, 1]), len(ids) + 5))
    shared_prefixes(reqs)
    started = time.perf_counter()
    for _ in range(100):
        spans = shared_prefixes(reqs)
    per_step = (time.perf_counter() - started) / 100
    assert sorted(len(rows) for _, rows in spans) == [16, 16, 16, 16]
    assert per_step < 1e-3, f"{per_step * 1e6:.0f} µs per step"


def test_steps_carry_spans_the_fake_executor_verifies() -> None:
    """Four requests on one system prompt and two unrelated ones: after the first one caches the
    prompt, the others' slices come with spans; outputs are unchanged."""
    rng = random.Random(3)
    system = [rng.randrange(1, 250) for _ in range(120)]
    prompts = [system + [rng.randrange(1, 250) for _ in range(5 + i)] for i in range(4)]
    prompts += [[rng.randrange(1, 250) for _ in range(90)] for _ in range(2)]

    async def main() -> FakeExecutor:
        fake = FakeExecutor(4096, 16)
        async with running_scheduler(fake) as sched:
            streams = [
                sched.submit(params(f"r{i}", p, 12, ignore_eos=True)) for i, p in enumerate(prompts)
            ]
            for stream, prompt in zip(streams, prompts, strict=True):
                result = await collect(stream)
                assert result[0].tokens == reference(prompt, 12)[0]
        return fake

    fake = asyncio.run(main())
    assert not fake.errors
    spans = [(p.length, sorted(p.rows)) for s in fake.steps for p in s.shared_prefixes]
    assert spans, "no step carried a shared prefix"
    assert all(n >= MIN_SHARED_PREFIX for n, _ in spans)
    decodes = [s for s in fake.steps if _all_decode(s) and len(s.slices) == 6]
    assert decodes and all(
        [(p.length, len(p.rows)) for p in s.shared_prefixes] == [(120, 4)] for s in decodes
    )


def _all_decode(step: pb.Step) -> bool:
    return all(s.use_last_sampled for s in step.slices)
