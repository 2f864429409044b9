"""Sampling over a whole batch at once.

Order of processing (per row): token mask → logit bias → repetition / frequency / presence
penalties → greedy argmax, or temperature → top-k / top-p / min-p → draw. Returned logprobs are the
log-softmax of the logits after penalties, bias, mask and temperature (before truncation).

Randomness is counter based: a request's n-th sampled token uses one uniform number derived from
(seed, n) only, and the draw is an inverse-CDF over the vocabulary in id order, so the same seed
gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.executor.sampling_params import SamplingParams

MASK32 = 0xFFFFFFFF


@dataclass
class SampleRow:
    """What the sampler needs of one request."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S] int64
    logprobs: torch.Tensor  # [S] float32, NaN where not requested
    top_ids: list[list[int]]  # per row, its own top_logprobs count
    top_logprobs: list[list[float]]


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def uniform_from(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in (0, 1) per row from (seed, counter); seeds are 64-bit."""
    lo, hi = seeds & MASK32, (seeds >> 32) & MASK32
    h = hash32(hash32(lo ^ hash32(hi)) ^ (counters & MASK32))
    h = hash32(h ^ 0x9E3779B9)
    return (h.double() + 0.5) / 2.0**32


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        # logits: [S, V] float32, modified in place
        params = [r.params for r in rows]
        self._apply_mask(logits, rows)
        self._apply_bias(logits, params)
        self._apply_penalties(logits, rows)
        greedy = torch.tensor([p.greedy for p in params], device=self.device)
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params])
        logits.div_(temps.to(self.device, logits.dtype)[:, None])
        token_ids = logits.argmax(-1)
        if not bool(greedy.all()):
            sampled = self._draw(logits, rows)
            token_ids = torch.where(greedy, token_ids, sampled)
        return self._logprobs(logits, token_ids, params)

    def _apply_mask(self, logits: torch.Tensor, rows: list[SampleRow]) -> None:
        for i, row in enumerate(rows):
            if row.params.token_mask_fn is not None:
                allowed = row.params.token_mask_fn(row.output_ids).to(self.device)
                logits[i].masked_fill_(~allowed[: self.vocab_size], float("-inf"))

    def _apply_bias(self, logits: torch.Tensor, params: list[SamplingParams]) -> None:
        idx = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items()]
        if idx:
            r, t, b = zip(*idx, strict=True)
            logits.index_put_(
                (torch.tensor(r), torch.tensor(t)),
                torch.tensor(b, dtype=logits.dtype),
                accumulate=True,
            )

    def _token_counts(self, ids: list[list[int]]) -> torch.Tensor:
        """[S, V] counts of each token id in each row's list."""
        width = max(1, max(len(x) for x in ids))
        padded = torch.full((len(ids), width), self.vocab_size, dtype=torch.int64)
        for i, x in enumerate(ids):
            padded[i, : len(x)] = torch.tensor(x, dtype=torch.int64)
        counts = torch.zeros((len(ids), self.vocab_size + 1), dtype=torch.float32)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
        return counts[:, : self.vocab_size].to(self.device)

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SampleRow]) -> None:
        params = [r.params for r in rows]
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = self._token_counts([r.prompt_ids + r.output_ids for r in rows]) > 0
            rep = torch.tensor([p.repetition_penalty for p in params], device=self.device)[:, None]
            penalized = torch.where(logits > 0, logits / rep, logits * rep)
            logits.copy_(torch.where(seen, penalized, logits))
        if any(p.has_penalties for p in params):
            counts = self._token_counts([r.output_ids for r in rows])
            freq = torch.tensor([p.frequency_penalty for p in params], device=self.device)[:, None]
            pres = torch.tensor([p.presence_penalty for p in params], device=self.device)[:, None]
            logits.sub_(freq * counts + pres * (counts > 0).float())

    def _truncation_mask(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """[S, V] True where top-k / top-p / min-p remove a token."""
        probs = torch.softmax(logits, -1)
        removed = torch.zeros_like(logits, dtype=torch.bool)
        ks = [p.top_k if p.top_k > 0 else self.vocab_size for p in params]
        if min(ks) < self.vocab_size:
            kth = torch.topk(logits, min(max(ks), self.vocab_size), dim=-1).values
            k_idx = torch.tensor(ks, device=self.device).clamp(max=kth.shape[1]) - 1
            removed |= logits < kth.gather(1, k_idx[:, None])
        if any(p.needs_sort for p in params):
            removed |= self._top_p_removed(probs, params)
        min_p = torch.tensor([p.min_p for p in params], device=self.device)[:, None]
        if bool((min_p > 0).any()):
            removed |= probs < min_p * probs.max(-1, keepdim=True).values
        return removed

    def _top_p_removed(self, probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        top_p = torch.tensor([p.top_p for p in params], device=self.device)[:, None]
        sorted_probs, order = probs.sort(-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_removed = mass_before >= top_p  # the top token is always kept
        return torch.zeros_like(sorted_removed).scatter_(1, order, sorted_removed)

    def _draw(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        params = [r.params for r in rows]
        truncated = logits.masked_fill(self._truncation_mask(logits, params), float("-inf"))
        probs = torch.softmax(truncated, -1).double()
        cdf = probs.cumsum(-1)
        seeds = torch.tensor([p.seed & (2**63 - 1) for p in params], dtype=torch.int64)
        counters = torch.tensor([len(r.output_ids) for r in rows], dtype=torch.int64)
        u = uniform_from(seeds, counters).to(self.device)[:, None] * cdf[:, -1:]
        return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=self.vocab_size - 1)

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
