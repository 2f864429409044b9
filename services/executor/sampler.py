"""Sampling over a whole batch at once.

Order of processing (per row): logit bias → repetition / frequency / presence penalties → greedy
argmax, or temperature → top-k / top-p / min-p → draw. A grammar's token mask is applied to the
logits before they get here (`services/executor/grammar.py`). Returned logprobs are the log-softmax
of the logits after mask, penalties, bias and temperature (before truncation).

Greedy rows are an argmax and nothing else; a batch of greedy rows without logprobs never waits
for the device (no `.item()`, `.tolist()` or branch on a tensor value).

Truncation follows the full-vocabulary definition: top-k keeps the tokens whose logit is at least
the k-th largest; top-p keeps a token while the probability mass strictly before it (in descending
order of the untruncated distribution) is below p; min-p keeps tokens with probability at least
min_p × the largest. Top-k and top-p give each row a logit cutoff, read off the sorted candidates
of `torch.topk` (the largest top_k of the rows, or `candidates` tokens for top-p-only rows); a
top-p row whose candidates hold less than p of the mass is tried again with `CANDIDATE_GROWTH`
times as many, and finally with the whole vocabulary. The draw then runs over the full
vocabulary with the tokens below the cutoff (or below min-p) weighted 0.

Randomness is counter based: a request's n-th sampled token uses one uniform number derived from
(seed, n) only, and the draw is an inverse-CDF over the kept tokens in id order, so the same seed
gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.cpu import fused
from services.executor.penalties import PenaltyState, Touched, needs_penalty, touched_from_lists
from services.executor.sampling_params import SamplingParams

MASK32 = 0xFFFFFFFF
DEFAULT_CANDIDATES = 64
CANDIDATE_GROWTH = 16


@dataclass
class SampleRow:
    """What the sampler needs of one request. With `row` set and the row added to the sampler
    (`add_row`), penalty counts come from the sampler's device state, not from the lists."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    row: int | None = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S] int64, on the logits' device
    logprobs: torch.Tensor  # [S] float32 on the CPU, NaN where not requested
    top_ids: list[list[int]]  # per row, its own top_logprobs count
    top_logprobs: list[list[float]]


@dataclass
class Truncation:
    """Per-row truncation parameters of drawn rows, as [n] device tensors."""

    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # float32, +inf = off
    min_p: torch.Tensor  # float32, 0 = off

    def rows(self, idx: torch.Tensor) -> Truncation:
        return Truncation(self.top_k[idx], self.top_p[idx], self.min_p[idx])


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def uniform_from(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One float32 uniform in (0, 1) per row from (seed, counter); seeds are 64-bit.
    The top 24 bits of the hash are used, so every value is exact in float32 and never 0 or 1."""
    lo, hi = seeds & MASK32, (seeds >> 32) & MASK32
    h = hash32(hash32(lo ^ hash32(hi)) ^ (counters & MASK32))
    h = hash32(h ^ 0x9E3779B9)
    return ((h >> 8).float() + 0.5) / 2.0**24


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of `weights` ([n, N] >= 0, unnormalized) with uniforms u ([n]):
    the first index whose cumulative weight reaches u × total. Zero-weight entries are never drawn."""
    cdf = weights.cumsum(-1)
    target = u[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=weights.shape[1] - 1)


class Sampler:
    def __init__(
        self,
        vocab_size: int,
        device: torch.device,
        candidates: int = DEFAULT_CANDIDATES,
        batch_invariant: bool = False,
    ) -> None:
        """`batch_invariant` (--enable-deterministic-inference) samples each row as a batch of
        one, so no reduction (softmax, log-sum-exp, cumulative sums) is split or ordered by the
        number of rows it runs with."""
        self.vocab_size = vocab_size
        self.batch_invariant = batch_invariant
        self.device = device
        self.candidates = candidates
        self.penalties = PenaltyState(vocab_size, device)

    def add_row(
        self, row: int, params: SamplingParams, prompt: list[int], output: list[int]
    ) -> None:
        """Starts tracking penalty counts of `row` when its params have a penalty."""
        if needs_penalty(params):
            self.penalties.add(row, prompt, output)

    def release_row(self, row: int) -> None:
        self.penalties.release(row)

    def reset(self) -> None:
        self.penalties.clear()

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        # logits: [S, V] float32, modified in place
        if self.batch_invariant and len(rows) > 1:
            outs = [self._sample(logits[i : i + 1], [row]) for i, row in enumerate(rows)]
            return SamplerOutput(
                torch.cat([o.token_ids for o in outs]),
                torch.cat([o.logprobs for o in outs]),
                [o.top_ids[0] for o in outs],
                [o.top_logprobs[0] for o in outs],
            )
        return self._sample(logits, rows)

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        params = [r.params for r in rows]
        self._apply_bias(logits, params)
        self._apply_penalties(logits, rows)
        drawn = [i for i, p in enumerate(params) if not p.greedy]
        if len(drawn) < len(rows):
            token_ids = fused.argmax(logits)
        if drawn:
            temps = [p.temperature if not p.greedy else 1.0 for p in params]
            logits.div_(self._tensor(temps, logits.dtype)[:, None])
            if len(drawn) == len(rows):
                token_ids = self._draw(logits, rows)
            else:
                idx = self._tensor(drawn, torch.int64)
                token_ids[idx] = self._draw(logits[idx], [rows[i] for i in drawn])
        out = self._logprobs(logits, token_ids, params)
        self.penalties.record([r.row for r in rows], token_ids)  # last: the only state change
        return out

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _apply_bias(self, logits: torch.Tensor, params: list[SamplingParams]) -> None:
        idx = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items()]
        if idx:
            r, t, b = zip(*idx, strict=True)
            logits.index_put_(
                (self._tensor(list(r), torch.int64), self._tensor(list(t), torch.int64)),
                self._tensor(list(b), logits.dtype),
                accumulate=True,
            )

    def _touched(self, rows: list[SampleRow]) -> Touched:
        if all(self.penalties.tracks(r.row) for r in rows):
            return self.penalties.touched([r.row for r in rows])  # type: ignore[misc]
        return touched_from_lists(
            [r.prompt_ids for r in rows], [r.output_ids for r in rows], self.device
        )

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SampleRow]) -> None:
        """Repetition on ids in the prompt or output, frequency / presence on output counts;
        only the touched ids of penalized rows are read and written."""
        pen = [i for i, r in enumerate(rows) if needs_penalty(r.params)]
        if not pen:
            return
        params = [rows[i].params for i in pen]
        touched = self._touched([rows[i] for i in pen])
        where = (self._tensor(pen, torch.int64)[:, None], touched.ids)
        x = logits[where]  # [n, L]
        counts = touched.counts
        rep = self._tensor([p.repetition_penalty for p in params], x.dtype)[:, None]
        freq = self._tensor([p.frequency_penalty for p in params], x.dtype)[:, None]
        pres = self._tensor([p.presence_penalty for p in params], x.dtype)[:, None]
        y = torch.where(x > 0, x / rep, x * rep)
        y = y - freq * counts - pres * (counts > 0).to(x.dtype)
        logits[where] = y.where(touched.valid, x)

    def _draw(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """[n] token ids drawn from `logits` ([n, V], after temperature) of non-greedy rows."""
        params = [r.params for r in rows]
        seeds = torch.tensor([p.seed & (2**63 - 1) for p in params], dtype=torch.int64)
        counters = torch.tensor([len(r.output_ids) for r in rows], dtype=torch.int64)
        u = uniform_from(seeds, counters).to(self.device)
        trunc = Truncation(
            self._tensor([p.top_k for p in params], torch.int64),
            self._tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], u.dtype),
            self._tensor([p.min_p for p in params], u.dtype),
        )
        narrow = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
        if len(narrow) == len(params):
            return self._draw_narrow(logits, trunc, u, params)
        out = self._draw_full(logits, trunc.min_p, u)
        if narrow:
            idx = self._tensor(narrow, torch.int64)
            sub = [params[i] for i in narrow]
            out[idx] = self._draw_narrow(logits[idx], trunc.rows(idx), u[idx], sub)
        return out

    def _draw_full(
        self, logits: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        """Rows without top-k / top-p: a draw over the whole vocabulary, min-p applied."""
        probs = torch.softmax(logits, -1)
        cut = min_p[:, None] * probs.max(-1, keepdim=True).values
        return inverse_cdf(probs.masked_fill(probs < cut, 0.0), u)

    def _draw_narrow(
        self,
        logits: torch.Tensor,
        trunc: Truncation,
        u: torch.Tensor,
        params: list[SamplingParams],
    ) -> torch.Tensor:
        """Rows with top-k or top-p: an inverse-CDF draw over the full vocabulary in id order,
        tokens below the row's cutoff or its min-p weighted 0."""
        lse = torch.logsumexp(logits, -1)
        probs = torch.exp(logits - lse[:, None])  # [n, V] untruncated probabilities
        drop = logits < self._cutoffs(logits, lse, trunc, params)[:, None]
        if any(p.min_p > 0 for p in params):
            top = torch.exp(logits.max(-1).values - lse)
            drop |= probs < (trunc.min_p * top)[:, None]
        return inverse_cdf(probs.masked_fill_(drop, 0.0), u)

    def _cutoffs(
        self,
        logits: torch.Tensor,
        lse: torch.Tensor,
        trunc: Truncation,
        params: list[SamplingParams],
    ) -> torch.Tensor:
        """[n] float32: the smallest logit that top-k and top-p keep, from the sorted `topk`
        candidates; rows whose top-p is not reached within them are redone with more."""
        width = max(p.top_k if p.top_k > 0 else self.candidates for p in params)
        cut, short = self._sorted_cutoffs(logits, lse, trunc, min(width, self.vocab_size))
        if all(p.top_k > 0 for p in params):
            return cut
        rows = torch.arange(len(params), device=self.device)
        while width < self.vocab_size:
            rows = rows[short]  # host sync: only sampled rows get here
            if not rows.numel():
                break
            width = min(width * CANDIDATE_GROWTH, self.vocab_size)
            sub = self._sorted_cutoffs(logits[rows], lse[rows], trunc.rows(rows), width)
            cut[rows], short = sub
        return cut

    @staticmethod
    def _sorted_cutoffs(
        logits: torch.Tensor, lse: torch.Tensor, trunc: Truncation, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cutoffs over the `width` largest logits of each row ([n, V]) with `lse` ([n]) the
        full-vocabulary log-normaliser. Returns (cutoff [n] float32, short [n] bool: top-p not
        reached within them, so tokens past them may be kept too)."""
        vals = torch.topk(logits, width, dim=-1).values  # [n, width] descending
        probs = torch.exp(vals - lse[:, None])
        mass = probs.cumsum(-1)
        kth = (trunc.top_k - 1).clamp(0, width - 1).where(trunc.top_k > 0, width - 1)
        kept_p = ((mass - probs) < trunc.top_p[:, None]).sum(-1)  # a prefix, at least 1
        last = torch.minimum(kth, kept_p - 1)
        short = (trunc.top_k == 0) & (mass[:, -1] < trunc.top_p)
        return vals.gather(1, last[:, None]).squeeze(1), short

    def _logprobs(
        self, logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
    ) -> SamplerOutput:
        n = len(params)
        out = torch.full((n,), float("nan"))
        top_ids: list[list[int]] = [[] for _ in range(n)]
        top_vals: list[list[float]] = [[] for _ in range(n)]
        want = [i for i, p in enumerate(params) if p.logprobs or p.top_logprobs]
        if not want:
            return SamplerOutput(token_ids, out, top_ids, top_vals)
        lp = torch.log_softmax(logits[want], -1)
        chosen = lp.gather(1, token_ids[want][:, None]).squeeze(1).cpu()
        out[want] = chosen
        max_n = max(params[i].top_logprobs for i in want)
        if max_n:
            vals, ids = lp.topk(max_n, dim=-1)
            vals, ids = vals.cpu().tolist(), ids.cpu().tolist()
            for j, i in enumerate(want):
                k = params[i].top_logprobs
                top_ids[i], top_vals[i] = ids[j][:k], vals[j][:k]
        return SamplerOutput(token_ids, out, top_ids, top_vals)
