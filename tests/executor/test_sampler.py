"""Sampling semantics over a batch: truncation, seeds, bias, penalties, logprobs, masks."""

from __future__ import annotations

import math

import pytest
import torch

from services.executor.sampler import Sampler, SampleRow, Truncation, uniform_from
from services.executor.sampling_params import SamplingParams

V = 50


def make_logits(rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def row(
    params: SamplingParams, output: list[int] | None = None, prompt: list[int] | None = None
) -> SampleRow:
    return SampleRow(params, prompt or [], output or [])


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 300) -> list[int]:
    """n draws of one request at successive output positions (its seeded stream advances)."""
    sampler = Sampler(V, torch.device("cpu"))
    return [
        int(sampler(logits.clone(), [row(params, output=[0] * i)]).token_ids[0]) for i in range(n)
    ]


def test_greedy_is_argmax() -> None:
    logits = make_logits(4)
    out = Sampler(V, torch.device("cpu"))(logits.clone(), [row(SamplingParams(temperature=0))] * 4)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_k_never_samples_outside_the_k_most_likely() -> None:
    logits = make_logits()
    allowed = set(logits[0].topk(5).indices.tolist())
    seen = set(draws(logits, SamplingParams(temperature=1.5, top_k=5, seed=1)))
    assert seen <= allowed
    assert len(seen) > 1


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = make_logits(seed=2)
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(0)
    keep = int((mass < 0.6).sum()) + 1  # the token that crosses 0.6 is kept
    allowed = set(order[:keep].tolist())
    seen = set(draws(logits, SamplingParams(temperature=1.0, top_p=0.6, seed=3)))
    assert seen <= allowed
    assert seen == allowed or len(allowed) > 3


def test_min_p_cuts_below_fraction_of_top_probability() -> None:
    logits = make_logits(seed=4)
    probs = logits[0].softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    seen = set(draws(logits, SamplingParams(temperature=1.0, min_p=0.2, seed=5)))
    assert seen <= allowed


def test_seed_gives_same_tokens_alone_and_elsewhere_in_another_batch() -> None:
    logits = make_logits(8, seed=6)
    sampler = Sampler(V, torch.device("cpu"))
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = [
        int(sampler(logits[3:4].clone(), [row(target, [1] * i)]).token_ids[0]) for i in range(20)
    ]
    others = [SamplingParams(temperature=0.7, top_k=3, seed=s) for s in range(7)]
    in_batch = []
    for i in range(20):
        rows = [row(p, [2] * i) for p in others]
        rows.insert(5, row(target, [1] * i))
        batch_logits = torch.cat([logits[:3], logits[4:6], logits[3:4], logits[6:]])
        in_batch.append(int(sampler(batch_logits.clone(), rows).token_ids[5]))
    assert in_batch == alone
    assert len(set(alone)) > 1


def test_different_seeds_differ_and_uniforms_are_in_range() -> None:
    u = uniform_from(torch.arange(1000, dtype=torch.int64), torch.zeros(1000, dtype=torch.int64))
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.05
    logits = make_logits(seed=7)
    a = draws(logits, SamplingParams(temperature=1.0, seed=1), 50)
    b = draws(logits, SamplingParams(temperature=1.0, seed=2), 50)
    assert a != b


def test_logit_bias_minus_100_bans_a_token() -> None:
    logits = make_logits(seed=8)
    top = int(logits[0].argmax())
    greedy = Sampler(V, torch.device("cpu"))(
        logits.clone(), [row(SamplingParams(temperature=0, logit_bias={top: -100.0}))]
    )
    assert int(greedy.token_ids[0]) != top
    seen = draws(logits, SamplingParams(temperature=1.0, seed=9, logit_bias={top: -100.0}), 200)
    assert top not in seen


def test_positive_bias_forces_a_token() -> None:
    logits = make_logits(seed=8)
    out = Sampler(V, torch.device("cpu"))(
        logits.clone(), [row(SamplingParams(temperature=0, logit_bias={7: 100.0}))]
    )
    assert int(out.token_ids[0]) == 7


def processed_logprob(
    params: SamplingParams, output: list[int], prompt: list[int], token: int
) -> float:
    logits = torch.zeros(1, V)
    logits[0, token] = 2.0
    logits[0, token + 1] = -2.0
    Sampler(V, torch.device("cpu"))(
        logits,
        [
            row(
                SamplingParams(**{**params.__dict__, "logprobs": True, "temperature": 0}),
                output,
                prompt,
            )
        ],
    )
    lp = torch.log_softmax(logits, -1)  # logits were processed in place
    return float(lp[0, token])


@pytest.mark.parametrize(
    ("params", "where"),
    [
        (SamplingParams(presence_penalty=1.0), "output"),
        (SamplingParams(frequency_penalty=0.5), "output"),
        (SamplingParams(repetition_penalty=1.5), "output"),
        (SamplingParams(repetition_penalty=1.5), "prompt"),
    ],
)
def test_penalties_lower_repeated_tokens(params: SamplingParams, where: str) -> None:
    token = 10
    used = [token, token, 3]
    base = processed_logprob(SamplingParams(), [], [], token)
    output, prompt = (used, []) if where == "output" else ([], used)
    penalized = processed_logprob(params, output, prompt, token)
    assert penalized < base


def test_frequency_penalty_scales_with_count_and_presence_does_not() -> None:
    sampler = Sampler(V, torch.device("cpu"))
    for params, expect_ratio in [
        (SamplingParams(temperature=0, frequency_penalty=0.5), 2.0),
        (SamplingParams(temperature=0, presence_penalty=0.5), 1.0),
    ]:
        drops = []
        for count in (1, 2):
            logits = torch.zeros(1, V)
            sampler(logits, [row(params, [4] * count)])
            drops.append(-float(logits[0, 4]))
        assert math.isclose(drops[1] / drops[0], expect_ratio, rel_tol=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0] + [0.0] * (V - 2)])
    Sampler(V, torch.device("cpu"))(
        logits, [row(SamplingParams(temperature=0, repetition_penalty=2.0), [0, 1])]
    )
    assert logits[0, 0].item() == pytest.approx(1.0)
    assert logits[0, 1].item() == pytest.approx(-4.0)


def test_logprobs_are_log_softmax_of_processed_logits() -> None:
    logits = make_logits(3, seed=10)
    params = [
        SamplingParams(temperature=0, logprobs=True, top_logprobs=4, logit_bias={1: 2.0}),
        SamplingParams(
            temperature=0.5, logprobs=True, top_logprobs=2, seed=3, frequency_penalty=1.0
        ),
        SamplingParams(temperature=1.0, seed=4),
    ]
    rows = [row(params[0]), row(params[1], [5, 5]), row(params[2])]
    processed = logits.clone()
    out = Sampler(V, torch.device("cpu"))(processed, rows)
    expected = torch.log_softmax(processed, -1)
    for i in (0, 1):
        tok = int(out.token_ids[i])
        assert out.logprobs[i].item() == pytest.approx(expected[i, tok].item(), abs=1e-5)
        k = params[i].top_logprobs
        assert out.top_ids[i] == expected[i].topk(k).indices.tolist()
        assert out.top_logprobs[i] == pytest.approx(expected[i].topk(k).values.tolist(), abs=1e-5)
    assert math.isnan(out.logprobs[2].item())
    assert out.top_ids[2] == []
    # The processing really happened: bias on row 0, temperature and penalty on row 1.
    manual = logits[1].clone()
    manual[5] -= 2 * 1.0
    assert torch.allclose(processed[1], manual / 0.5, atol=1e-6)
    assert processed[0, 1].item() == pytest.approx(logits[0, 1].item() + 2.0)


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * (V - 3)]))
    seen = draws(logits, SamplingParams(temperature=1.0, seed=99), 2000)
    freq = [seen.count(t) / len(seen) for t in range(3)]
    assert freq == pytest.approx([0.5, 0.3, 0.2], abs=0.04)


def reference_draw(logits: torch.Tensor, params: SamplingParams, u: float) -> tuple[int, set[int]]:
    """The definition over the full vocabulary in float64: (drawn token, kept tokens)."""
    x = logits.double() / params.temperature
    probs = x.softmax(-1)
    removed = torch.zeros_like(x, dtype=torch.bool)
    if params.top_k > 0:
        removed |= x < x.topk(min(params.top_k, x.numel())).values[-1]
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs
        removed[order[before >= params.top_p]] = True
    removed |= probs < params.min_p * probs.max()
    kept = probs.masked_fill(removed, 0.0)
    cdf = kept.cumsum(0)
    token = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype)))
    return min(token, x.numel() - 1), set(torch.nonzero(~removed).flatten().tolist())


TRUNCATIONS = [
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.7, top_p=0.5, min_p=0.05),
    SamplingParams(temperature=1.3, top_k=7),
    SamplingParams(temperature=1.0, top_k=40, top_p=0.8),
    SamplingParams(temperature=2.0, top_p=0.99),  # needs more than the candidates: full sort
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9),
]


@pytest.mark.parametrize("candidates", [16, 1024])
def test_bounded_candidates_match_the_full_vocabulary_definition(candidates: int) -> None:
    vocab, trials = 300, 60
    sampler = Sampler(vocab, torch.device("cpu"), candidates=candidates)
    gen = torch.Generator().manual_seed(21)
    mismatches = 0
    for trial in range(trials):
        logits = torch.randn(len(TRUNCATIONS), vocab, generator=gen) * (1 + trial % 4)
        params = [
            SamplingParams(**{**p.__dict__, "seed": trial * 7 + i})
            for i, p in enumerate(TRUNCATIONS)
        ]
        rows = [row(p, output=[0] * trial) for p in params]
        out = sampler(logits.clone(), rows).token_ids.tolist()
        seeds = torch.tensor([p.seed for p in params], dtype=torch.int64)
        u = uniform_from(seeds, torch.full((len(params),), trial, dtype=torch.int64)).tolist()
        for i, p in enumerate(params):
            token, kept = reference_draw(logits[i], p, u[i])
            assert out[i] in kept
            mismatches += out[i] != token
    # float32 against float64 may differ only where u falls within rounding of a CDF step
    assert mismatches <= 1


def test_candidate_truncation_keeps_exactly_the_reference_set() -> None:
    vocab = 200
    sampler = Sampler(vocab, torch.device("cpu"), candidates=8)
    gen = torch.Generator().manual_seed(5)
    for p in TRUNCATIONS[:5]:
        logits = torch.randn(1, vocab, generator=gen) * 2
        _, kept = reference_draw(logits[0], p, 0.5)
        seen = {
            int(
                sampler(
                    logits.clone(), [row(SamplingParams(**{**p.__dict__, "seed": s}))]
                ).token_ids[0]
            )
            for s in range(400)
        }
        assert seen <= kept
        assert len(seen) >= min(len(kept), 3)


def test_all_greedy_batch_never_reads_a_tensor_value_on_the_host(monkeypatch) -> None:
    def forbidden(*_a, **_k):
        raise AssertionError("host sync in the greedy path")

    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logit_bias={3: 5.0}),
        SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5),
    ]
    sampler = Sampler(V, torch.device("cpu"))
    sampler.add_row(2, params[2], [1, 2], [4])
    rows = [SampleRow(p, [1, 2], [4], row=i) for i, p in enumerate(params)]
    logits = make_logits(4, seed=12)
    expected = Sampler(V, torch.device("cpu"))(
        logits.clone(), [row(p, [4], [1, 2]) for p in params]
    )
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = sampler(logits.clone(), rows)
    monkeypatch.undo()
    assert out.token_ids.tolist() == expected.token_ids.tolist()


def test_tracked_penalty_counts_follow_sampling_and_survive_readding() -> None:
    params = SamplingParams(
        temperature=1.0, seed=3, repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.3
    )
    prompt = [1, 2, 2, 9]
    tracked, plain = Sampler(V, torch.device("cpu")), Sampler(V, torch.device("cpu"))
    tracked.add_row(5, params, prompt, [])
    output: list[int] = []
    for step in range(30):
        if step == 12:  # retraction: the row leaves and comes back with its output so far
            tracked.release_row(5)
            tracked.add_row(5, params, prompt, list(output))
        logits = make_logits(seed=100 + step)
        a, b = logits.clone(), logits.clone()
        got = tracked(a, [SampleRow(params, prompt, output, row=5)])
        want = plain(b, [row(params, list(output), prompt)])
        assert torch.equal(a, b)
        assert got.token_ids.tolist() == want.token_ids.tolist()
        output.append(int(got.token_ids[0]))
    assert len(set(output)) > 3


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0, 20.0])  # flat to peaked
def test_cutoffs_equal_a_full_sort_reference(scale: float) -> None:
    vocab = 2000
    sampler = Sampler(vocab, torch.device("cpu"), candidates=8)  # widths 8, 128, then all
    gen = torch.Generator().manual_seed(int(scale * 10))
    params = [
        SamplingParams(top_p=p, top_k=k) for p in (0.1, 0.5, 0.9, 0.999) for k in (0, 0, 3, 50)
    ]
    for _ in range(10):
        logits = torch.randn(len(params), vocab, generator=gen) * scale
        lse = torch.logsumexp(logits, -1)
        trunc = Truncation(
            torch.tensor([p.top_k for p in params]),
            torch.tensor([p.top_p for p in params]),
            torch.zeros(len(params)),
        )
        cut = sampler._cutoffs(logits, lse, trunc, params)
        vals = logits.sort(-1, descending=True).values
        probs = torch.exp(vals - lse[:, None])
        for i, p in enumerate(params):
            keep = int(((probs[i].cumsum(0) - probs[i]) < p.top_p).sum())
            if p.top_k:
                keep = min(keep, p.top_k)
            assert cut[i].item() == vals[i, keep - 1].item()


def reference_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Penalties over the full vocabulary, one row at a time."""
    out = logits.clone()
    for i, r in enumerate(rows):
        p, x = r.params, out[i]
        counts = torch.zeros(V).index_add_(
            0, torch.tensor(r.output_ids, dtype=torch.int64), torch.ones(len(r.output_ids))
        )
        seen = counts > 0
        seen[r.prompt_ids] = True
        rep = torch.tensor(p.repetition_penalty)
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        out[i] = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return out


@pytest.mark.parametrize("tracked", [False, True])
def test_penalties_equal_a_full_vocabulary_reference(tracked: bool) -> None:
    gen = torch.Generator().manual_seed(31)
    sampler = Sampler(V, torch.device("cpu"))
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.4),
        SamplingParams(temperature=0, frequency_penalty=-0.7),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, repetition_penalty=0.8, frequency_penalty=1.5),
        SamplingParams(temperature=0, presence_penalty=2.0),  # nothing touched yet
    ]
    prompts = [[1, 2, 2, 40], [], [3], [7, 8, 9, 7], []]
    outputs: list[list[int]] = [[4, 4, 1], [5, 6, 5, 5], [], [], []]
    if tracked:
        for i, p in enumerate(params):
            sampler.add_row(i, p, prompts[i], outputs[i])
    for _ in range(8):
        rows = [
            SampleRow(p, prompts[i], list(outputs[i]), row=i if tracked else None)
            for i, p in enumerate(params)
        ]
        logits = torch.randn(len(params), V, generator=gen) * 3
        expected = reference_penalties(logits, rows)
        out = sampler(logits, rows)
        assert torch.equal(logits, expected)
        for i, t in enumerate(out.token_ids.tolist()):
            outputs[i].append(t)
