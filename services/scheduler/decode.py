"""Decode: one new position per running request per step (or per iteration, for a step of several
decode iterations; see `continuous_steps`), and retraction when slots run out.

Each decoding request needs one KV slot per step, for its newest token. When free + evictable slots
cannot cover that, requests are retracted (fewest generated tokens first, longest prompt breaking
ties) until they can: a victim's computed tokens go into the cache as evictable entries, it returns
to the front of the queue, and it resumes later, usually from the cache.

Jump-forward: a request whose grammar forced tokens after its last one (`Req.explicit_next`)
computes them in one slice with explicit input ids (plus the sampled token before them when no
step computes it yet), sampling after the last, instead of one decode step per token.

With min_tokens, the executor first samples with the stop tokens banned; when the next token may
stop, the row is re-added with the ban lifted (the table is rewritten with the same slots, so
nothing is recomputed). That step needs the last token explicitly, so under overlap the request
sits out one step while it arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from services.scheduler.cache import KVCache
from services.scheduler.request import Req
from services.scheduler.step import Step


def slots_needed(req: Req, steps: int = 1) -> int:
    """KV slots req's next decode slice takes: its uncomputed tokens after jump-forward, else one
    per decode iteration."""
    return len(req.fill_ids) - req.num_computed if req.explicit_next else steps


def continuous_steps(running: Sequence[Req], most: int, free_slots: int, context: int) -> int:
    """Decode iterations the next Step may run for `running` (up to `most`; the caller checks
    that nothing waits and no prefill is chunked): 1 unless every decoding request just decodes
    (no grammar, no min_tokens ban, no forced tokens to compute); never past `context` positions,
    nor past `free_slots` (free and evictable KV slots) shared by the decoding requests, nor past
    the most tokens any of them may still sample (its max_tokens).

    A request may reach max_tokens (or a stop token) before the last iteration: the tokens
    after it are dropped and their slots freed with the request's, as an overlapped step's are.
    Capping the iterations at the nearest max_tokens instead would cut them to one or two
    whenever many requests run, as one of them nearly always is about to finish."""
    decoding = [r for r in running if r.wants_decode()]
    if most == 1 or not decoding:
        return 1
    if any(r.grammar is not None or r.banned or r.explicit_next for r in decoding):
        return 1
    room = min(context - r.num_computed for r in decoding)
    wanted = max(r.stop.max_tokens - r.num_scheduled_outputs for r in decoding)
    return max(1, min(most, room, wanted, free_slots // len(decoding)))


def victim_order(req: Req) -> tuple[int, int]:
    return (len(req.output), -len(req.prompt))


class DecodeManager:
    def __init__(self, cache: KVCache, retract: Callable[[Req], None]) -> None:
        self.cache = cache
        self.retract = retract  # releases req and queues it again (the scheduler's bookkeeping)

    def schedule(self, step: Step, running: Sequence[Req], steps: int = 1) -> int:
        """Adds a decode slice for every request that can take one; returns how many decoded.
        With `steps` > 1 (from `continuous_steps`, which leaves room for them all) each slice runs
        that many iterations."""
        ready = [r for r in running if r.wants_decode() and not self._awaits_last_token(r)]
        ready = self._make_room(ready, running, steps)
        decoded = 0
        for req in ready:
            if req.explicit_next:
                if not self._extend(step, req):
                    break
                decoded += 1
                continue
            slots = self.cache.allocate(steps)
            if slots is None:
                break  # requests finishing this step still hold slots; the rest wait a step
            self._decode(step, req, slots)
            decoded += 1
        if steps > 1 and decoded:
            step.repeat_decodes(steps)
        return decoded

    def _extend(self, step: Step, req: Req) -> bool:
        """After jump-forward: computes every token not computed yet (the forced ones, and the
        sampled one before them if no step computes it yet) with explicit ids, sampling after
        the last. False when the slots are not free yet."""
        assert req.row is not None
        start = req.num_computed
        ids = req.fill_ids[start:]
        assert ids, "jump-forward without tokens to compute"
        slots = self.cache.allocate(len(ids))
        if slots is None:
            return False
        req.kv += slots
        req.num_computed += len(ids)
        req.num_scheduled_outputs += 1
        req.explicit_next = False
        step.writes.append((req.row, start, slots))
        step.compute(req, start, ids, sample=True)
        return True

    def _awaits_last_token(self, req: Req) -> bool:
        return req.needs_unban() and len(req.output) < req.num_scheduled_outputs

    def _make_room(self, ready: list[Req], running: Sequence[Req], steps: int) -> list[Req]:
        """Retracts until every remaining ready request gets its slots (always keeping one): one
        per decode iteration each, or after jump-forward one per token still to compute."""
        candidates = sorted(
            (r for r in running if r in ready or r.prefilling), key=victim_order, reverse=True
        )
        while (
            self.cache.available() < sum(slots_needed(r, steps) for r in ready)
            and len(candidates) > 1
        ):
            victim = candidates.pop()
            if victim in ready:
                ready.remove(victim)
            self.retract(victim)
        return ready

    def _decode(self, step: Step, req: Req, slots: list[int]) -> None:
        """A decode slice of req over len(slots) iterations (one unless `continuous_steps`)."""
        assert req.row is not None
        start = req.num_computed  # position of the newest token, whose KV this step writes
        unban = req.needs_unban()
        req.kv += slots
        req.num_computed += len(slots)
        req.num_scheduled_outputs += len(slots)
        if unban:
            self._readd_unbanned(step, req, start)
            return
        step.writes.append((req.row, start, slots))
        step.decode(req, start)

    def _readd_unbanned(self, step: Step, req: Req, start: int) -> None:
        assert req.row is not None and len(req.fill_ids) == start + 1
        req.banned = False
        req.pending_write = None  # the full rewrite below covers it
        step.release_rows.append(req.row)
        step.add.append(req)
        step.writes.append((req.row, 0, list(req.kv)))
        step.compute(req, start, [req.output[-1]], sample=True)
